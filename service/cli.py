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
@click.option("--once", is_flag=True, help="Dispatch what is due now, sweep once, and exit.")
def dispatcher(once: bool) -> None:
    """Move committed outbox messages into RQ delivery jobs; re-hand lost or stuck ones."""
    import logging
    import signal
    import threading

    from campaigns.channels.config import MessagingConfig, MessagingConfigError
    from campaigns.dispatch import run_dispatcher
    from service.logging_setup import configure
    from service.redis_client import make_redis

    config = _resolved_config()
    configure(config.log_level, config.log_json)
    engine = _engine(config)
    _migrate_if_embedded(Config.from_env(), engine)
    try:
        messaging = MessagingConfig.from_env()
    except MessagingConfigError as exc:
        raise click.ClickException(str(exc)) from None
    assert config.redis_url is not None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger(__name__).info("dispatcher started (queue %s)", messaging.queue_name)
    totals = run_dispatcher(engine, make_redis(config.redis_url), messaging, stop=stop, once=once)
    click.echo("dispatcher: " + ", ".join(f"{k}={v}" for k, v in totals.items()))


@main.command("delivery-worker")
@click.option("--burst", is_flag=True, help="Exit when the queue is empty.")
def delivery_worker(burst: bool) -> None:
    """Run message delivery jobs in this process (no fork per job: faster than `worker`)."""
    from campaigns.channels.config import MessagingConfig, MessagingConfigError
    from campaigns.dispatch import run_delivery_worker
    from service.logging_setup import configure

    config = _resolved_config()
    configure(config.log_level, config.log_json)
    try:
        messaging = MessagingConfig.from_env()
    except MessagingConfigError as exc:
        raise click.ClickException(str(exc)) from None
    assert config.redis_url is not None
    run_delivery_worker(config.redis_url, messaging, burst=burst)


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
@click.option(
    "--parallel",
    type=click.IntRange(1, 8),
    # Three, also on two cores: the steps wait on I/O and on each other's commits, and a
    # third keeps the cores busy (1M members: 13.6 s against 18.1 s with two).
    default=3,
    show_default=True,
    help="Independent steps run at the same time, each on its own connection.",
)
def refresh(as_of: Any, steps: tuple[str, ...], rebuild: bool, parallel: int) -> None:
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
        # Whole lines: with --parallel above 1 steps start and end interleaved.
        if details.get("status") == "started":
            click.echo(f"{name:<16} started")
            return
        extra = ", ".join(f"{k}={v}" for k, v in details.items() if k != "seconds")
        click.echo(f"{name:<16} {details['seconds']:.1f}s  {extra}")

    click.echo(f"Refreshing scores as of {day} ({scoring.timezone})")
    started = time.perf_counter()
    run_refresh(unit, day, config=scoring, steps=chosen, progress=progress, parallel=parallel)
    click.echo(f"done in {time.perf_counter() - started:.1f}s")


@main.group()
def tiers() -> None:
    """Loyalty tiers."""


@tiers.command("review")
@click.option(
    "--as-of",
    "as_of",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help="The review date (default: today in PATRON_TIMEZONE).",
)
def tiers_review(as_of: Any) -> None:
    """Run the tier review now: upgrades due, one-step downgrades of members due for review."""
    from sqlalchemy.orm import Session

    from campaigns.tiers import review_tiers
    from segments.config import ConfigError, ScoringConfig
    from segments.refresh import today as refresh_today

    config = _resolved_config()
    engine = _engine(config)
    _migrate_if_embedded(Config.from_env(), engine)
    try:
        day = as_of.date() if as_of else refresh_today(ScoringConfig.from_env())
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    with Session(engine) as session, session.begin():
        counts = review_tiers(session, day)
    click.echo(f"tier review as of {day}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


@main.group()
def coupons() -> None:
    """Coupons: bulk bearer codes."""


@coupons.command("generate")
@click.option("--template", "template", required=True, help="The coupon template's code.")
@click.option("--count", required=True, type=click.IntRange(1, 10_000_000))
@click.option("--label", default="", help="A note shown with the batch.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the codes (one per line, display form) to this file.",
)
def coupons_generate(template: str, count: int, label: str, out: Path | None) -> None:
    """Generate COUNT bearer codes from a template in one transaction; prints the batch id."""
    import time

    from sqlalchemy.orm import Session

    from campaigns import coupons as coupon_service
    from service.errors import PatronError

    config = _resolved_config()
    engine = _engine(config)
    _migrate_if_embedded(Config.from_env(), engine)
    started = time.perf_counter()
    try:
        with Session(engine) as session, session.begin():
            batch, _ = coupon_service.create_batch(
                session, template, count, actor="cli", label=label
            )
            batch = coupon_service.fill_batch(session, batch["id"])
    except PatronError as exc:
        raise click.ClickException(exc.detail) from None
    click.echo(
        f"batch {batch['id']}: {batch['generated']} codes for {template} "
        f"in {time.perf_counter() - started:.1f}s"
    )
    if out is not None:
        _write_codes(engine, batch["id"], out)


@coupons.command("export")
@click.option("--batch", "batch_id", required=True, type=int)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def coupons_export(batch_id: int, out: Path) -> None:
    """Write a batch's codes to a file (one per line, display form)."""
    _write_codes(_engine(_resolved_config()), batch_id, out)


def _write_codes(engine: Any, batch_id: int, out: Path) -> None:
    from sqlalchemy.orm import Session

    from campaigns import coupons as coupon_service
    from service.errors import PatronError

    n = 0
    try:
        with Session(engine) as session, session.begin(), out.open("w") as fh:
            fh.write("code\n")
            for code in coupon_service.batch_codes(session, batch_id):
                fh.write(code + "\n")
                n += 1
    except PatronError as exc:
        raise click.ClickException(exc.detail) from None
    click.echo(f"wrote {n} codes to {out}")


@main.group("campaigns")
def campaigns_group() -> None:
    """Campaign runs: the scheduler's tick, or one campaign now."""


@campaigns_group.command("tick")
def campaigns_tick() -> None:
    """Run every scheduled, calendar and segment-entry campaign that is due now."""
    from datetime import UTC, datetime

    from campaigns.runs import tick
    from segments.config import ScoringConfig
    from service.db import Database

    config = _resolved_config()
    engine = _engine(config)
    _migrate_if_embedded(Config.from_env(), engine)

    results = tick(
        Database(engine).unit_of_work, datetime.now(UTC), ScoringConfig.from_env().timezone
    )
    for r in results:
        click.echo(
            f"campaign {r['campaign_id']} run {r['run_key']}: {r.get('qualified')} qualified"
        )
    click.echo(f"{len(results)} run(s)")


@campaigns_group.command("run")
@click.argument("campaign_id", type=int)
@click.option("--run-key", default=None, help="Idempotency key (default manual:<UTC date>).")
def campaigns_run(campaign_id: int, run_key: str | None) -> None:
    """Run one active batch campaign over its audience now (idempotent per run key)."""
    from datetime import UTC, datetime

    from sqlalchemy.orm import Session

    from campaigns.runs import run_campaign
    from service.errors import PatronError

    config = _resolved_config()
    engine = _engine(config)
    _migrate_if_embedded(Config.from_env(), engine)
    now = datetime.now(UTC)
    try:
        with Session(engine) as session, session.begin():
            counts = run_campaign(
                session, campaign_id, run_key=run_key or f"manual:{now.date()}", now=now
            )
    except (PatronError, LookupError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(", ".join(f"{k}={v}" for k, v in counts.items()))


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
