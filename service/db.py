"""Engine, sessions and the unit of work: one session per request / job / command.

Services take the session as an argument and never commit; the edge that
opened the unit of work commits once, or rolls back on any exception.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, current_app
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from service.config import Config

EXTENSION_KEY = "patron.db"


def normalise_url(url: str) -> str:
    """Accept plain `postgresql://` URLs (what most tools print) and pick psycopg2."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def make_engine(config: Config) -> Engine:
    """Create the engine for a resolved config (no connection is opened here)."""
    if not config.database_url:
        raise RuntimeError("database_url is not resolved; call service.embedded.resolve first")
    engine = create_engine(
        normalise_url(config.database_url),
        pool_size=config.db_pool_size,
        max_overflow=config.db_pool_size,
        pool_pre_ping=True,
        future=True,
    )
    _guard_fork(engine)
    return engine


def _guard_fork(engine: Engine) -> None:
    # Connections must never cross fork() (gunicorn workers, RQ work horses):
    # a pooled connection opened by another pid is invalidated instead of reused.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: object, connection_record: object) -> None:
        connection_record.info["pid"] = os.getpid()  # type: ignore[attr-defined]

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: object, connection_record: object, proxy: object) -> None:
        if connection_record.info["pid"] != os.getpid():  # type: ignore[attr-defined]
            from sqlalchemy import exc

            connection_record.dbapi_connection = None  # type: ignore[attr-defined]
            connection_proxy = proxy
            connection_proxy.dbapi_connection = None  # type: ignore[attr-defined]
            raise exc.DisconnectionError("connection opened in another process")


class Database:
    """The app's engine and session factory; tests swap the factory for a savepoint one."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.session_factory: sessionmaker[Session] = sessionmaker(
            bind=engine, expire_on_commit=False
        )

    @contextmanager
    def unit_of_work(self) -> Iterator[Session]:
        session = self.session_factory()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()


def init_app(app: Flask, engine: Engine) -> None:
    app.extensions[EXTENSION_KEY] = Database(engine)


def get_db(app: Flask | None = None) -> Database:
    db: Database = (app or current_app).extensions[EXTENSION_KEY]
    return db


@contextmanager
def unit_of_work() -> Iterator[Session]:
    """Open the one session of the current request / job / command and commit at its end."""
    with get_db().unit_of_work() as session:
        yield session
