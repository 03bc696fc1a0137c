"""Engine, sessions and the unit of work: one session per request / job / command.

Services take the session as an argument and never commit; the edge that
opened the unit of work commits once, or rolls back on any exception.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from flask import Flask, current_app
from sqlalchemy import ClauseElement, Connection, Dialect, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from service.config import Config

EXTENSION_KEY = "patron.db"
# Engine execution option: may `execute_prepared` use server-side prepared statements?
PREPARE_OPTION = "patron_prepared_statements"


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
        future=True,
        execution_options={PREPARE_OPTION: config.db_prepared_statements},
    )
    _guard_fork(engine)
    _ping_idle_connections(engine, config.db_ping_idle_seconds)
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


def _ping_idle_connections(engine: Engine, idle_seconds: float) -> None:
    # Pessimistic disconnect handling like pool_pre_ping, but only for connections that sat
    # idle in the pool: pool_pre_ping adds a round trip to every checkout (one in five of a
    # purchase's). A connection this process used a moment ago is alive. The cost: after a
    # database restart, a connection idle for less than `idle_seconds` fails its first
    # statement (one 500 per worker at most), and SQLAlchemy then invalidates the pool.
    @event.listens_for(engine, "checkin")
    def _on_checkin(dbapi_connection: Any, connection_record: Any) -> None:
        if connection_record is not None:
            connection_record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, connection_record: Any, proxy: object) -> None:
        checked_in_at = connection_record.info.get("checked_in_at")
        if checked_in_at is None or time.monotonic() - checked_in_at < idle_seconds:
            return  # brand new, or used a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool discards this connection and checks out a fresh one.
            raise DisconnectionError("pooled connection failed its liveness check") from exc


@dataclass(frozen=True)
class _Prepared:
    statement: ClauseElement  # kept alive so its id() is never reused
    text: str  # the statement for the driver, with %(name)s placeholders
    prepare: str  # PREPARE <name> AS <the statement with $n placeholders>
    execute: str  # EXECUTE <name> (%(a)s, %(b)s, ...)
    name: str


_PREPARED: dict[int, _Prepared] = {}
_PYFORMAT = re.compile(r"%\((\w+)\)s")


def _prepared(statement: ClauseElement, dialect: Dialect) -> _Prepared:
    found = _PREPARED.get(id(statement))
    if found is None:
        sql = str(statement.compile(dialect=dialect))
        order: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) not in order:
                order.append(match.group(1))
            return f"${order.index(match.group(1)) + 1}"

        # Still a driver-level string: psycopg2 turns the compiler's %% back into %.
        body = _PYFORMAT.sub(number, sql)
        name = "patron_" + hashlib.sha1(body.encode(), usedforsecurity=False).hexdigest()[:16]
        args = ", ".join(f"%({key})s" for key in order)
        found = _PREPARED[id(statement)] = _Prepared(
            statement=statement,
            text=sql,
            prepare=f"PREPARE {name} AS {body}",
            execute=f"EXECUTE {name} ({args})" if order else f"EXECUTE {name}",
            name=name,
        )
    return found


# A cached generic plan keeps the table sizes it was planned with: a statement prepared
# while `transactions` was nearly empty would keep scanning it sequentially as it grows
# (until autoanalyze invalidates the plan, which on a busy server can take long). Each
# connection therefore re-prepares after this many executions or seconds.
REPREPARE_AFTER_EXECUTIONS = 1000
REPREPARE_AFTER_SECONDS = 60.0


def execute_prepared(session: Session, statement: ClauseElement, params: Mapping[str, Any]) -> Any:
    """Run a hot-path statement (`text()` or a Core select without expanding parameters) in
    the session's transaction; return its first row (None without rows).

    PostgreSQL parses and plans a statement sent as text on every call; for the purchase
    statements that is over a third of the database's CPU per request. Here each pooled
    connection PREPAREs the statement (prepared statements belong to the database session
    and survive rollbacks), EXECUTEs it, and re-prepares it now and then so that its
    plan follows the tables' growth. Pass statements that live as long as the process
    (module level or cached): they are compiled once and cached by identity.

    The statement runs on a DB-API cursor of the session's connection, not through
    SQLAlchemy's execution: building SQLAlchemy's result for a row of the purchase's facts
    (36 columns) cost twice the round trip itself. psycopg2 binds the values exactly as
    for `session.execute(statement, params)`; rows are tuples with the columns also as
    attributes (`_Row`, with `_fields` and `_mapping`) and carry no type processing beyond
    psycopg2's own; errors are SQLAlchemy's (`DBAPIError` and its subclasses), and the
    engine's before/after_cursor_execute listeners still see each statement (without an
    execution context).

    Behind a transaction-pooling proxy (PgBouncer in transaction mode) server-side
    prepared statements do not work: PATRON_DB_PREPARED_STATEMENTS=0 sends plain text.
    """
    rows = _run_prepared(session, statement, params)
    return rows[0] if rows else None


def execute_prepared_all(
    session: Session, statement: ClauseElement, params: Mapping[str, Any]
) -> list[Any]:
    """`execute_prepared` for a statement returning many rows (e.g. one per campaign): all
    of them. Array parameters must be CAST in the statement (`CAST(:ids AS bigint[])`), so
    that the prepared statement has one type per parameter."""
    return _run_prepared(session, statement, params)


class _Row(tuple[Any, ...]):
    """A result row of `execute_prepared`: a tuple whose columns are also attributes."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()
    _index: Mapping[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return self[self._index[name]]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def _mapping(self) -> dict[str, Any]:
        return dict(zip(self._fields, self, strict=True))


_ROW_TYPES: dict[tuple[str, ...], type[_Row]] = {}


def _row_type(names: tuple[str, ...]) -> type[_Row]:
    found = _ROW_TYPES.get(names)
    if found is None:
        index = {name: i for i, name in enumerate(names)}
        found = _ROW_TYPES[names] = type(
            "Row", (_Row,), {"__slots__": (), "_fields": names, "_index": index}
        )
    return found


def _run_prepared(
    session: Session, statement: ClauseElement, params: Mapping[str, Any]
) -> list[Any]:
    conn = session.connection()
    prepared = _prepared(statement, conn.dialect)
    cursor = conn.connection.cursor()
    try:
        if not conn.get_execution_options().get(PREPARE_OPTION, True):
            _execute(conn, cursor, prepared.text, params)
        else:
            _execute_prepared(conn, cursor, prepared, params)
        if cursor.description is None:
            return []
        row = _row_type(tuple(column[0] for column in cursor.description))
        return [row(values) for values in cursor.fetchall()]
    finally:
        cursor.close()


def _execute_prepared(
    conn: Connection, cursor: Any, prepared: _Prepared, params: Mapping[str, Any]
) -> None:
    # name -> [monotonic time prepared, executions since]; lives as long as the connection
    state: dict[str, list[float]] = conn.connection.info.setdefault("patron_prepared", {})
    entry = state.get(prepared.name)
    now = time.monotonic()
    try:
        if entry is None:
            _execute(conn, cursor, prepared.prepare, {})
            entry = state[prepared.name] = [now, 0]
        elif entry[1] >= REPREPARE_AFTER_EXECUTIONS or now - entry[0] >= REPREPARE_AFTER_SECONDS:
            _execute(conn, cursor, f"DEALLOCATE {prepared.name}; {prepared.prepare}", {})
            entry[0], entry[1] = now, 0
        entry[1] += 1
        _execute(conn, cursor, prepared.execute, params)
    except DBAPIError as exc:
        if getattr(exc.orig, "pgcode", None) == "26000":  # the prepared statement is gone
            state.pop(prepared.name, None)
        raise


def _execute(conn: Connection, cursor: Any, sql: str, params: Mapping[str, Any]) -> None:
    """cursor.execute with SQLAlchemy's cursor events and exceptions. Always with a
    mapping, even an empty one: psycopg2 then turns the compiler's %% back into %."""
    events = conn.dispatch
    if events.before_cursor_execute:
        for listener in events.before_cursor_execute:
            listener(conn, cursor, sql, params, None, False)
    try:
        cursor.execute(sql, params)
    except conn.dialect.loaded_dbapi.Error as exc:
        invalidated = conn.dialect.is_disconnect(exc, conn.connection.dbapi_connection, cursor)
        if invalidated:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            sql,
            params,
            exc,
            conn.dialect.loaded_dbapi.Error,
            connection_invalidated=invalidated,
            dialect=conn.dialect,
        ) from exc
    if events.after_cursor_execute:
        events.after_cursor_execute(conn, cursor, sql, params, None, False)


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
