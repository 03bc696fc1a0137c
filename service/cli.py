"""The `patron` command: serve, worker, scheduler, db, import, refresh, keys, demo."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from service.config import Config


def _resolved_config() -> Config:
    from service import embedded

    config = embedded.resolve(Config.from_env())
    # Child processes (gunicorn workers, RQ work horses) must reach the same servers.
    embedded.export_env(config)
    return config


def _engine(config: Config) -> Any:
    from service.db import make_engine

    return make_engine(config)


def _migrate_if_embedded(config_before: Config, engine: Any) -> None:
    from service import migrate

    if config_before.embedded:
        migrate.upgrade(engine)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Patron: membership / CRM rules engine."""


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="heads", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION."""
    from service import migrate

    engine = _engine(_resolved_config())
    migrate.upgrade(engine, revision)
    click.echo(f"database at revision {migrate.current(engine)}")


@db.command("current")
def db_current() -> None:
    """Print the schema revision."""
    from service import migrate

    click.echo(migrate.current(_engine(_resolved_config())) or "(empty)")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=int)
@click.option("--threads", default=1, show_default=True, type=int)
def serve(host: str, port: int, workers: int, threads: int) -> None:
    """Serve the HTTP API with gunicorn."""
    before = Config.from_env()
    config = _resolved_config()
    _migrate_if_embedded(before, _engine(config))
    from service.gunicorn_app import run

    run(host=host, port=port, workers=workers, threads=threads)


@main.command()
@click.option("--burst", is_flag=True, help="Exit when the queues are empty.")
@click.option("--queue", "queues", multiple=True, help="Queues to listen on (repeatable).")
def worker(burst: bool, queues: tuple[str, ...]) -> None:
    """Run an RQ worker for background jobs."""
    config = _resolved_config()
    from service.jobs import run_worker

    run_worker(config, queues=list(queues) or None, burst=burst)


@main.command()
@click.option("--once", is_flag=True, help="Run due periodic work once and exit.")
def scheduler(once: bool) -> None:
    """Run the periodic-job scheduler."""
    config = _resolved_config()
    from service.jobs import run_scheduler

    run_scheduler(config, once=once)


@main.group("import")
def import_() -> None:
    """Bulk-load stores, members or transactions from CSV or NDJSON."""


def _import(kind: str, file: Path, rejects: Path | None, fmt: str | None) -> None:
    from service import importer

    config = _resolved_config()
    engine = _engine(config)
    _migrate_if_embedded(Config.from_env(), engine)
    try:
        report = importer.run_import(engine, kind, file, rejects_path=rejects, fmt=fmt)
    except importer.ImportFailed as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(report.summary())
    if report.rejected:
        sys.exit(3)


for _kind in ("stores", "members", "transactions"):

    def _make(kind: str) -> Any:
        @click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
        @click.option(
            "--rejects",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Where to write rejected rows (default: FILE.rejects.csv).",
        )
        @click.option("--format", "fmt", type=click.Choice(["csv", "ndjson"]), default=None)
        def command(file: Path, rejects: Path | None, fmt: str | None) -> None:
            _import(kind, file, rejects, fmt)

        command.__doc__ = f"Import {kind} from FILE (CSV or NDJSON); bad rows go to a reject file."
        return import_.command(kind)(command)

    _make(_kind)


@main.group()
def keys() -> None:
    """API keys."""


@keys.command("create")
@click.option(
    "--role",
    required=True,
    type=click.Choice(["admin", "marketer", "approver", "pos", "analyst"]),
)
@click.option("--store", "store", default=None, help="Limit the key to one store's data.")
@click.option("--name", default=None, help="A label for the key (default: the role).")
def keys_create(role: str, store: str | None, name: str | None) -> None:
    """Create an API key; it is printed once, alone on the last line."""
    from service.auth import create_key
    from service.errors import PatronError

    config = _resolved_config()
    engine = _engine(config)
    _migrate_if_embedded(Config.from_env(), engine)
    from sqlalchemy.orm import Session

    try:
        with Session(engine) as session, session.begin():
            raw = create_key(session, role, name or role, store)
    except PatronError as exc:
        raise click.ClickException(exc.detail) from None
    click.echo(f"Created {role} key" + (f" for store {store}" if store else "") + ".", err=False)
    click.echo("Store it now; it cannot be shown again:")
    click.echo(raw)


@main.command()
@click.option(
    "--as-of",
    "as_of",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help="The refresh date (default: today in PATRON_TIMEZONE).",
)
@click.option("--step", "steps", multiple=True, help="Run only these steps (repeatable).")
@click.option(
    "--rebuild", is_flag=True, help="First rebuild every statistic from the transactions."
)
def refresh(as_of: Any, steps: tuple[str, ...], rebuild: bool) -> None:
    """Refresh rolling windows and scores (RFM, lifecycle, churn, segments) with progress."""
    import time
    from contextlib import contextmanager

    from sqlalchemy.orm import Session

    from segments import stats
    from segments.config import ConfigError, ScoringConfig
    from segments.refresh import run_refresh, steps_named
    from segments.refresh import today as refresh_today

    config = _resolved_config()
    engine = _engine(config)
    _migrate_if_embedded(Config.from_env(), engine)
    try:
        scoring = ScoringConfig.from_env()
        chosen = list(steps) or None
        steps_named(chosen)
    except (ConfigError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    day = as_of.date() if as_of else refresh_today(scoring)

    @contextmanager
    def unit() -> Any:
        with Session(engine) as session, session.begin():
            yield session

    if rebuild:
        started = time.perf_counter()
        with unit() as session:
            stats.rebuild_all_stats(session, day, timezone=scoring.timezone)
        click.echo(f"rebuilt statistics from transactions in {time.perf_counter() - started:.1f}s")

    def progress(name: str, details: dict[str, Any]) -> None:
        if details.get("status") == "started":
            click.echo(f"{name:<16}…", nl=False)
            return
        extra = ", ".join(f"{k}={v}" for k, v in details.items() if k != "seconds")
        click.echo(f" {details['seconds']:.1f}s  {extra}")

    click.echo(f"Refreshing scores as of {day} ({scoring.timezone})")
    started = time.perf_counter()
    run_refresh(unit, day, config=scoring, steps=chosen, progress=progress)
    click.echo(f"done in {time.perf_counter() - started:.1f}s")


@main.group("embedded")
def embedded_group() -> None:
    """The embedded PostgreSQL and Redis used when no servers are configured."""


@embedded_group.command("stop")
def embedded_stop() -> None:
    """Stop the embedded servers (their data stays under PATRON_DATA_DIR)."""
    from service import embedded

    config = Config.from_env()
    stopped = embedded.stop(config.data_dir)
    click.echo(f"stopped: {', '.join(stopped) or 'nothing was running'} ({config.data_dir})")


@main.command()
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--no-serve", is_flag=True, help="Load and report, then exit.")
def demo(port: int, no_serve: bool) -> None:
    """Start everything on embedded servers, load demo data and serve the API."""
    from service.demo import run_demo

    run_demo(port=port, serve=not no_serve)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
