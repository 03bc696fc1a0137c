"""gunicorn embedded as a library so `patron serve` needs no separate config file."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication


class PatronServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # Each worker builds its own app (and engine) after the fork.
        from service.app import create_app

        return create_app()


def run(host: str, port: int, workers: int, threads: int = 1) -> None:
    """Serve the API; blocks until gunicorn exits."""
    PatronServer(
        {
            "bind": f"{host}:{port}",
            "workers": workers,
            "threads": threads,
            "worker_class": "gthread" if threads > 1 else "sync",
            "accesslog": None,
            "preload_app": False,
            "timeout": 60,
            "graceful_timeout": 20,
        }
    ).run()
