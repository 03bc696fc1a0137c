"""The engine: idle pooled connections are checked before use; hot statements are prepared."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.orm import Session

from service import db as db_module
from service.config import Config
from service.db import execute_prepared, execute_prepared_all, make_engine


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_connection_idle_too_long_is_pinged_and_replaced_when_dead(config: Config, engine: Engine):
    pooled = make_engine(replace(config, db_pool_size=1, db_ping_idle_seconds=0))
    try:
        first = _backend_pid(pooled)
        with engine.connect() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
            for _ in range(50):
                gone = admin.execute(
                    text("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = :pid"),
                    {"pid": first},
                ).scalar_one()
                if gone:
                    break
                time.sleep(0.05)
        # The dead pooled connection fails its ping and is swapped for a fresh one.
        assert _backend_pid(pooled) != first
    finally:
        pooled.dispose()


@pytest.mark.parametrize(("idle_seconds", "pings"), [(60.0, 0), (0.0, 2)])
def test_recently_used_connection_is_not_pinged(
    config: Config, monkeypatch: pytest.MonkeyPatch, idle_seconds: float, pings: int
):
    pooled = make_engine(replace(config, db_pool_size=1, db_ping_idle_seconds=idle_seconds))
    calls: list[object] = []
    real_ping = pooled.dialect.do_ping

    def counting_ping(dbapi_connection: object) -> bool:
        calls.append(dbapi_connection)
        return bool(real_ping(dbapi_connection))

    monkeypatch.setattr(pooled.dialect, "do_ping", counting_ping)
    try:
        pids = {_backend_pid(pooled) for _ in range(3)}  # a new connection, then reused twice
        assert len(pids) == 1
        assert len(calls) == pings
    finally:
        pooled.dispose()


_ADD = text("SELECT CAST(:a AS integer) + CAST(:b AS integer) AS total, '100%' AS pct")


def _prepared_names(session: Session) -> list[str]:
    rows = session.execute(text("SELECT name FROM pg_prepared_statements")).scalars()
    return [name for name in rows if name.startswith("patron_")]


def test_hot_statements_are_prepared_once_per_connection(config: Config):
    pooled = make_engine(replace(config, db_pool_size=1))
    try:
        with Session(pooled) as session:
            row = execute_prepared(session, _ADD, {"a": 2, "b": 3})
            assert (row.total, row.pct) == (5, "100%")
            session.rollback()  # prepared statements outlive transactions
            assert execute_prepared(session, _ADD, {"a": 4, "b": None}).total is None
            assert len(_prepared_names(session)) == 1
        with Session(pooled) as session:  # same pooled connection: not prepared again
            assert execute_prepared(session, _ADD, {"b": 1, "a": 1}).total == 2
            assert len(_prepared_names(session)) == 1
    finally:
        pooled.dispose()


def test_prepared_statements_are_renewed_so_plans_follow_table_growth(
    config: Config, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(db_module, "REPREPARE_AFTER_EXECUTIONS", 3)
    pooled = make_engine(replace(config, db_pool_size=1))
    try:
        with Session(pooled) as session:
            for a in range(7):  # prepared at 1, renewed before 4 and 7
                assert execute_prepared(session, _ADD, {"a": a, "b": 1}).total == a + 1
            runs = session.execute(
                text(
                    "SELECT generic_plans + custom_plans FROM pg_prepared_statements"
                    " WHERE name LIKE 'patron_%'"
                )
            ).scalar_one()
            assert runs == 1
    finally:
        pooled.dispose()


def test_a_vanished_prepared_statement_is_prepared_again(config: Config):
    pooled = make_engine(replace(config, db_pool_size=1))
    try:
        with Session(pooled) as session:
            execute_prepared(session, _ADD, {"a": 1, "b": 1})
            session.execute(text("DEALLOCATE ALL"))  # what a pooling proxy might do
            session.commit()
            with pytest.raises(DBAPIError):
                execute_prepared(session, _ADD, {"a": 1, "b": 1})
            session.rollback()
            assert execute_prepared(session, _ADD, {"a": 1, "b": 2}).total == 3
    finally:
        pooled.dispose()


def test_prepared_statements_can_be_turned_off(config: Config):
    plain = make_engine(replace(config, db_pool_size=1, db_prepared_statements=False))
    try:
        with Session(plain) as session:
            assert execute_prepared(session, _ADD, {"a": 20, "b": 22}).total == 42
            assert _prepared_names(session) == []
    finally:
        plain.dispose()


_DOUBLES = text("SELECT x, x * 2 AS twice FROM unnest(CAST(:xs AS integer[])) AS u(x) ORDER BY x")


@pytest.mark.parametrize("prepared", [True, False])
def test_statements_returning_many_rows_run_prepared_or_plain(config: Config, prepared: bool):
    pooled = make_engine(replace(config, db_pool_size=1, db_prepared_statements=prepared))
    try:
        with Session(pooled) as session:
            rows = execute_prepared_all(session, _DOUBLES, {"xs": [3, 1, 2]})
            assert [(r.x, r.twice) for r in rows] == [(1, 2), (2, 4), (3, 6)]
            # Another array length, an empty one: the same prepared statement.
            assert execute_prepared_all(session, _DOUBLES, {"xs": [5, None]})[0].twice == 10
            assert execute_prepared_all(session, _DOUBLES, {"xs": []}) == []
            assert len(_prepared_names(session)) == (1 if prepared else 0)
    finally:
        pooled.dispose()


def test_prepared_rows_errors_and_cursor_events_are_as_through_sqlalchemy(config: Config):
    # execute_prepared runs on the DB-API cursor: what callers and benchmarks read of
    # SQLAlchemy's execution must still be there.
    pooled = make_engine(replace(config, db_pool_size=1))
    seen: list[str] = []
    event.listen(pooled, "after_cursor_execute", lambda conn, cur, sql, *_: seen.append(sql))
    try:
        with Session(pooled) as session:
            row = execute_prepared(session, _ADD, {"a": 1, "b": 2})
            assert row == (3, "100%") and row[0] == 3
            assert row._fields == ("total", "pct")
            assert row._mapping == {"total": 3, "pct": "100%"}
            with pytest.raises(AttributeError):
                _ = row.missing
            assert [s.split()[0] for s in seen] == ["PREPARE", "EXECUTE"]
            with pytest.raises(DataError):  # division by zero: SQLAlchemy's class for it
                execute_prepared(session, text("SELECT 1 / CAST(:a AS integer) AS q"), {"a": 0})
    finally:
        pooled.dispose()
