"""The `patron` command: keys, db, embedded servers."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.orm import Session

from service import embedded
from service.cli import main
from service.config import Config
from service.models import ApiKey
from service.stores import upsert_store
from tests.conftest import unique


@pytest.fixture
def cli_env(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", config.database_url or "")
    monkeypatch.setenv("REDIS_URL", config.redis_url or "")


def test_keys_create_prints_the_key_once_on_the_last_line(cli_env: None, engine: Engine):
    store = unique("S")
    with Session(engine) as s, s.begin():
        upsert_store(s, store, "CLI", "East", actor="test")
    result = CliRunner().invoke(main, ["keys", "create", "--role", "pos", "--store", store])
    assert result.exit_code == 0, result.output
    raw = result.output.strip().splitlines()[-1]
    assert raw.startswith("ptn_") and " " not in raw
    with Session(engine) as s:
        row = s.scalars(
            select(ApiKey).where(ApiKey.key_hash == hashlib.sha256(raw.encode()).digest())
        ).one()
        assert row.role == "pos" and row.store_id is not None
        stored = s.execute(text("SELECT string_agg(name || prefix, '') FROM api_keys")).scalar()
        assert raw not in (stored or "")


def test_keys_create_rejects_unknown_role_and_store(cli_env: None):
    bad_role = CliRunner().invoke(main, ["keys", "create", "--role", "superuser"])
    assert bad_role.exit_code == 2 and "superuser" in bad_role.output
    bad_store = CliRunner().invoke(main, ["keys", "create", "--role", "pos", "--store", "NOPE"])
    assert bad_store.exit_code == 1 and "NOPE" in bad_store.output


def test_db_upgrade_is_idempotent(cli_env: None):
    first = CliRunner().invoke(main, ["db", "upgrade"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, ["db", "current"])
    assert again.exit_code == 0 and again.output.strip() in first.output


def test_help_lists_the_everyday_commands():
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("serve", "worker", "scheduler", "db", "import", "keys", "demo"):
        assert command in result.stdout


@pytest.mark.slow
def test_embedded_servers_start_migrate_and_are_reused(tmp_path: Path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    cfg = Config.from_env(env={"PATRON_DATA_DIR": str(data_dir)})
    assert cfg.embedded
    try:
        first = embedded.resolve(cfg)
        assert first.database_url and first.redis_url
        eng = create_engine(first.database_url)
        # Embedded URLs name a unix socket (%-encoded path): migrations must cope.
        from service import migrate

        migrate.upgrade(eng)
        assert migrate.current(eng)
        with eng.begin() as conn:
            conn.execute(text("CREATE TABLE kept (v int)"))
            conn.execute(text("INSERT INTO kept VALUES (42)"))
        eng.dispose()
        import redis

        redis.Redis.from_url(first.redis_url).set("kept", "yes")
        # A second process-level resolve reuses the same servers and data.
        second = embedded.resolve(cfg)
        assert second.database_url == first.database_url
        assert second.redis_url == first.redis_url
        eng = create_engine(second.database_url or "")
        with eng.connect() as conn:
            assert conn.execute(text("SELECT v FROM kept")).scalar() == 42
        eng.dispose()
        assert redis.Redis.from_url(second.redis_url or "").get("kept") == b"yes"
    finally:
        stopped = embedded.stop(data_dir)
    assert set(stopped) == {"postgres", "redis"}
    # After a stop, the next run (a new process) starts them again on the same data.
    script = (
        "from service import embedded; from service.config import Config; "
        "from sqlalchemy import create_engine, text; "
        f"c = embedded.resolve(Config.from_env(env={{'PATRON_DATA_DIR': {str(data_dir)!r}}})); "
        "conn = create_engine(c.database_url).connect(); "
        "print(conn.execute(text('SELECT v FROM kept')).scalar())"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
        assert out.stdout.strip() == "42", out.stderr
    finally:
        embedded.stop(data_dir)
