"""gunicorn embedded as a library so `patron serve` needs no separate config file."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication


def _create_app() -> Any:
    # Each worker builds its own app (and engine) after the fork.
    from service.app import create_app

    return create_app()


class PatronServer(BaseApplication):
    def __init__(self, options: dict[str, Any], loader: Callable[[], Any] = _create_app) -> None:
        self.options = options
        self.loader = loader
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        app = self.loader()
        # Everything built so far (modules, app, schemas, mappers: ~140k objects) lives
        # as long as the worker. Freezing it keeps it out of the garbage collector's
        # full passes, each of which would otherwise stall a request for ~0.1 s.
        gc.freeze()
        return app


def server_options(host: str, port: int, workers: int, threads: int = 1) -> dict[str, Any]:
    """The gunicorn settings of `patron serve` (the benchmarks reuse them for a fair baseline)."""
    return {
        "bind": f"{host}:{port}",
        "workers": workers,
        "threads": threads,
        "worker_class": "gthread" if threads > 1 else "sync",
        "accesslog": None,
        "preload_app": False,
        "timeout": 60,
        "graceful_timeout": 20,
    }


def run(host: str, port: int, workers: int, threads: int = 1) -> None:
    """Serve the API; blocks until gunicorn exits."""
    PatronServer(server_options(host, port, workers, threads)).run()
