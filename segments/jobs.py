"""RQ jobs of the daily refresh: one job that starts the run and chains one job per step."""

from __future__ import annotations

import logging
from datetime import date
from typing import Any

from flask import current_app
from rq import Queue, get_current_job
from rq.job import Job

from segments import refresh
from segments.config import ScoringConfig
from service.db import unit_of_work
from service.jobs import job
from service.redis_client import get_redis

log = logging.getLogger(__name__)

# Long enough for the 1M-member refresh on a busy machine; the step is one transaction.
STEP_TIMEOUT = 1800


def _queue() -> Queue:
    return Queue(current_app.config["PATRON"].queue_name, connection=get_redis())


def enqueue_refresh(as_of: date | None = None, steps: list[str] | None = None) -> Job:
    """Enqueue the refresh of `as_of` (default: today in the business zone); after commit."""
    return _queue().enqueue(
        refresh_job,
        as_of.isoformat() if as_of else None,
        steps,
        job_timeout=STEP_TIMEOUT,
        meta={"kind": "scores.refresh"},
    )


@job
def refresh_job(as_of: str | None = None, steps: list[str] | None = None) -> dict[str, Any]:
    """Start the run of `as_of` and chain one job per step (each its own transaction)."""
    config = ScoringConfig.from_env()
    day = date.fromisoformat(as_of) if as_of else refresh.today(config)
    chosen = [n for n, _ in refresh.steps_named(steps)]
    with unit_of_work() as session:
        refresh.begin_run(session, day, config)
    queue = _queue()
    # Each step waits for its prerequisites only (refresh.STEP_AFTER), so with two or more
    # workers independent steps run side by side; "finish" waits for all of them.
    waits_for = {**refresh.prerequisites(chosen), "finish": chosen}
    jobs: dict[str, Job] = {}
    for name in [*chosen, "finish"]:
        jobs[name] = queue.enqueue(
            refresh_step_job,
            name,
            day.isoformat(),
            depends_on=[jobs[b] for b in waits_for[name]] or None,
            job_timeout=STEP_TIMEOUT,
            meta={"kind": "scores.refresh.step", "step": name},
        )
    ids = [jobs[name].id for name in [*chosen, "finish"]]
    current = get_current_job()
    if current is not None:
        names = [*chosen, "finish"]
        current.meta.update(
            {
                "kind": "scores.refresh",
                "as_of": day.isoformat(),
                "steps": dict(zip(names, ids, strict=True)),
            }
        )
        current.save_meta()
    log.info("refresh %s: enqueued %d steps", day, len(ids))
    return {"as_of": day.isoformat(), "step_jobs": ids}


@job
def refresh_step_job(name: str, as_of: str) -> dict[str, Any]:
    """Run one refresh step (or "finish") for `as_of`."""
    config = ScoringConfig.from_env()
    day = date.fromisoformat(as_of)
    with unit_of_work() as session:
        if name == "finish":
            refresh.finish_run(session, day)
            return {"step": name, "as_of": as_of}
        step = dict(refresh.REFRESH_STEPS)[name]
        details = refresh.run_step(session, name, step, day, config)
    return {"step": name, "as_of": as_of, **details}


def job_status(job_id: str) -> dict[str, Any] | None:
    """Status of a refresh job and of each of its step jobs; None if unknown."""
    connection = get_redis()
    try:
        parent = Job.fetch(job_id, connection=connection)
    except Exception:  # rq raises NoSuchJobError (and others for foreign keys)
        return None
    if parent.meta.get("kind") != "scores.refresh":
        return None
    steps = []
    for name, step_id in (parent.meta.get("steps") or {}).items():
        try:
            status = Job.fetch(step_id, connection=connection).get_status(refresh=False)
            state = str(status.value if status is not None else "unknown")
        except Exception:
            state = "expired"
        steps.append({"step": name, "job_id": step_id, "status": state})
    parent_status = parent.get_status(refresh=False)
    overall = str(parent_status.value if parent_status is not None else "unknown")
    if steps and overall == "finished":
        states = {s["status"] for s in steps}
        if "failed" in states:
            overall = "failed"
        elif states != {"finished"}:
            overall = "running"
    result = parent.latest_result() if parent.is_failed else None
    return {
        "job_id": job_id,
        "status": overall,
        "as_of": parent.meta.get("as_of"),
        "steps": steps,
        "error": result.exc_string if result is not None else None,
    }
