"""Fixtures: a migrated real PostgreSQL, a clean Redis db, and one savepoint per test.

Servers come from DATABASE_URL / REDIS_URL when set (CI); otherwise the embedded
ones are started under .patron-test-data, exactly like the application does.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.serving import make_server

from service import embedded, migrate
from service.app import create_app
from service.auth import create_key
from service.config import Config
from service.db import get_db, make_engine
from service.redis_client import get_redis
from service.stores import upsert_store

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def config() -> Config:
    base = Config.from_env(
        testing=True,
        log_json=False,
        log_level="WARNING",
        data_dir=Path(os.environ.get("PATRON_DATA_DIR", ROOT / ".patron-test-data")),
    )
    resolved = embedded.resolve(base)
    return replace(resolved, db_pool_size=10)


@pytest.fixture(scope="session")
def engine(config: Config) -> Iterator[Engine]:
    eng = make_engine(config)
    with eng.begin() as conn:
        # A fresh schema per run: migrations are part of what is tested.
        conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    migrate.upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def app(config: Config, engine: Engine) -> Iterator[Flask]:
    application = create_app(config, engine=engine)
    redis = get_redis(application)
    redis.flushdb()
    yield application
    redis.flushdb()


@pytest.fixture
def connection(engine: Engine) -> Iterator[Connection]:
    conn = engine.connect()
    trans = conn.begin()
    yield conn
    trans.rollback()
    conn.close()


@pytest.fixture
def db_app(app: Flask, connection: Connection) -> Iterator[Flask]:
    """The app with every unit of work joined to this test's transaction (savepoints)."""
    db = get_db(app)
    original = db.session_factory
    db.session_factory = sessionmaker(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    app.extensions["patron.keycache"].clear()
    yield app
    db.session_factory = original
    app.extensions["patron.keycache"].clear()


@pytest.fixture
def session(db_app: Flask) -> Iterator[Session]:
    s = get_db(db_app).session_factory()
    yield s
    s.close()


@pytest.fixture
def client(db_app: Flask) -> FlaskClient:
    return db_app.test_client()


def unique(prefix: str = "T") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(session: Session) -> str:
    """A store created in this test's transaction; returns its code."""
    code = unique("S")
    upsert_store(session, code, "Test store", "East", actor="test")
    session.flush()
    return code


KeyFactory = Callable[..., dict[str, str]]


@pytest.fixture
def auth(session: Session) -> KeyFactory:
    """`auth("pos", store="S-1")` creates a key and returns the request headers."""

    def make(role: str, store: str | None = None) -> dict[str, str]:
        raw = create_key(session, role, f"test-{role}", store)
        session.flush()
        return {"Authorization": f"Bearer {raw}"}

    return make


def purchase_payload(member: str, store: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "member_id": member,
        "transaction_id": unique("POS"),
        "amount": "128.50",
        "currency": "CNY",
        "store": store,
        "channel": "pos",
        "occurred_at": "2026-11-01T10:00:00+08:00",
        "items": [{"sku": "A-1", "category": "shoes", "quantity": 1, "amount": "128.50"}],
    }
    body.update(overrides)
    return body


class LiveServer:
    """A real threaded HTTP server on loopback whose requests commit for real."""

    def __init__(self, app: Flask) -> None:
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.thread.join()


@pytest.fixture(scope="session")
def live_app(config: Config, engine: Engine) -> Flask:
    """A second app instance with normal (committing) sessions, for concurrency tests."""
    return create_app(config, engine=engine)


@pytest.fixture
def live_server(live_app: Flask) -> Iterator[LiveServer]:
    with LiveServer(live_app) as server:
        yield server


@pytest.fixture
def committed(engine: Engine) -> Callable[..., Any]:
    """Run a function in its own committed transaction (data visible to live servers)."""

    def run(fn: Callable[[Session], Any]) -> Any:
        with Session(engine) as s, s.begin():
            return fn(s)

    return run
