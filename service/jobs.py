"""Job runtime: RQ workers and the periodic scheduler.

Jobs take ids and ISO strings, open their own app context and unit of work,
and are enqueued only after the transaction that caused them has committed.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from flask import Flask
from rq import Queue, Worker
from rq.cron import CronScheduler

from service.config import Config
from service.redis_client import make_redis

log = logging.getLogger(__name__)

_APP: Flask | None = None
_APP_PID: int | None = None

F = TypeVar("F", bound=Callable[..., Any])


def job_app() -> Flask:
    """The app of this process, rebuilt after a fork so no connection crosses it."""
    global _APP, _APP_PID
    if _APP is None or os.getpid() != _APP_PID:
        from service.app import create_app

        _APP = create_app()
        _APP_PID = os.getpid()
    return _APP


def job(fn: F) -> F:
    """Run the job body inside an app context of this process."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with job_app().app_context():
            return fn(*args, **kwargs)

    return cast(F, wrapper)


@job
def heartbeat() -> str:
    """Record that the scheduler and a worker are alive (shown by `/readyz` later)."""
    from service.redis_client import get_redis

    stamp = datetime.now(UTC).isoformat()
    get_redis().set("patron:heartbeat", stamp, ex=600)
    return stamp


def _campaign_tick() -> Any:
    # Imported late: campaigns import this module for the job decorator.
    from campaigns.jobs import campaign_tick_job

    return campaign_tick_job()


# Periodic jobs: (function, seconds between runs). The campaign tick runs due scheduled,
# calendar and segment-entry campaigns (each run is keyed, so a late tick catches up once).
PERIODIC: list[tuple[Callable[..., Any], int]] = [(heartbeat, 60), (_campaign_tick, 60)]


def daily_jobs() -> list[tuple[Callable[..., Any], str]]:
    """Jobs run once a day: (function, cron string in this process's local time)."""
    from segments.config import ScoringConfig
    from segments.jobs import refresh_job
    from segments.refresh import refresh_cron

    # The score refresh at PATRON_REFRESH_AT in PATRON_TIMEZONE.
    return [(refresh_job, refresh_cron(ScoringConfig.from_env()))]


def run_worker(config: Config, queues: list[str] | None = None, burst: bool = False) -> None:
    """Process jobs from the given queues (default: the configured one)."""
    if config.redis_url is None:
        raise RuntimeError("redis_url is not resolved")
    connection = make_redis(config.redis_url)
    names = queues or [config.queue_name]
    worker = Worker([Queue(n, connection=connection) for n in names], connection=connection)
    worker.work(burst=burst, with_scheduler=True)


def run_scheduler(config: Config, once: bool = False) -> None:
    """Enqueue periodic jobs on their schedule (or once, for cron-driven deployments)."""
    if config.redis_url is None:
        raise RuntimeError("redis_url is not resolved")
    connection = make_redis(config.redis_url)
    if once:
        # Interval jobs only: a deployment calling `--once` from cron every few minutes
        # schedules the daily refresh itself (`patron refresh`).
        queue = Queue(config.queue_name, connection=connection)
        for func, _ in PERIODIC:
            queue.enqueue(func)
        log.info("enqueued %d periodic jobs", len(PERIODIC))
        return
    cron = CronScheduler(connection=connection)
    for func, interval in PERIODIC:
        cron.register(func, queue_name=config.queue_name, interval=interval)
    for func, spec in daily_jobs():
        cron.register(func, queue_name=config.queue_name, cron=spec, job_timeout=1800)
    cron.start()
