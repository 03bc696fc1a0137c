"""The daily refresh: age the windows, then lifecycle, RFM, churn scores and snapshots.

Each step is a function `(session, as_of, config) -> details` run in its own unit of
work, in the order of `REFRESH_STEPS`; other packages append theirs (custom segments).
Every step is idempotent for a date, so running a date twice changes nothing the
second time. The same steps run in-process (`patron refresh`, tests) or as RQ jobs (the
scheduler and `POST /v1/scores/refresh`).

Steps that neither write the same rows nor read each other's output run at the same time
(`STEP_AFTER`): the custom segments whose rules read no refreshed field beside the
windows; then lifecycle → RFM (both write `member_scores`) beside churn (its own
table), the tier review and the segments whose rules read windows or tiers but no
score; then the other custom segments beside the monthly snapshot of the RFM scores.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from rules import Rule, Vocabulary
from segments import lifecycle, predict, rfm, stats
from segments.config import ScoringConfig

log = logging.getLogger(__name__)

Step = Callable[[Session, date, ScoringConfig], dict[str, Any]]
UnitOfWork = Callable[[], AbstractContextManager[Session]]
Progress = Callable[[str, dict[str, Any]], None]


def _previous_start(session: Session, as_of: date) -> datetime | None:
    steps = session.scalar(text("SELECT steps FROM score_runs WHERE as_of = :d"), {"d": as_of})
    since = (steps or {}).get("history_since")
    return datetime.fromisoformat(since) if since else None


def step_windows(session: Session, as_of: date, config: ScoringConfig) -> dict[str, Any]:
    """Age the rolling windows to `as_of`; re-summarise purchase days of changed members."""
    aged = stats.age_windows(session, as_of, config.timezone)
    if aged["mode"] == "rebuilt":
        return aged
    aged["history"] = stats.refresh_history(
        session, _previous_start(session, as_of), config.timezone
    )
    return aged


def step_lifecycle(session: Session, as_of: date, config: ScoringConfig) -> dict[str, Any]:
    """Lifecycle stage of every member, with the changes logged."""
    return lifecycle.refresh_stages(session, as_of, config)


def step_rfm(session: Session, as_of: date, config: ScoringConfig) -> dict[str, Any]:
    """RFM scores and segments; the cut points are stored on the run."""
    cuts = rfm.score_members(session, as_of, config)
    session.execute(
        text("UPDATE score_runs SET cut_points = CAST(:c AS jsonb) WHERE as_of = :d"),
        {"c": json.dumps({k: v for k, v in cuts.items() if k != "changed"}), "d": as_of},
    )
    return {"members": cuts["members"], "changed": cuts["changed"]}


def step_churn(session: Session, as_of: date, config: ScoringConfig) -> dict[str, Any]:
    """BG/NBD and Gamma-Gamma scores; the fitted parameters are stored on the run."""
    result = predict.build_predictions(session, as_of, config)
    session.execute(
        text("UPDATE score_runs SET churn_params = CAST(:c AS jsonb) WHERE as_of = :d"),
        {"c": json.dumps(result), "d": as_of},
    )
    # Last: from the swap to the commit, readers of member_predictions wait. The run row is
    # locked above already, so recording the step cannot make them wait for a parallel step.
    predict.swap_predictions(session)
    return {"combinations": result["combinations"]}


def step_snapshot(session: Session, as_of: date, config: ScoringConfig) -> dict[str, Any]:
    """The month's RFM snapshot, at its first refresh."""
    return rfm.take_snapshot(session, as_of)


def refresh_instant(as_of: date, config: ScoringConfig) -> datetime:
    """The instant a date's refresh stands for: PATRON_REFRESH_AT on that day, local time."""
    hour, minute = (int(v) for v in config.refresh_at.split(":"))
    return datetime.combine(as_of, datetime.min.time(), tzinfo=config.zone).replace(
        hour=hour, minute=minute
    )


def _refreshed_fields(vocab: Vocabulary) -> tuple[frozenset[str], frozenset[str]]:
    """(fields the windows and tiers steps write, fields lifecycle / RFM / churn write)."""
    from segments.membership import FIELD as MEMBERSHIP_FIELD
    from segments.vocabulary import PREDICTIONS, SCORES
    from segments.vocabulary import fields as segment_fields

    scores = {f.name for f in vocab.fields() if {SCORES, PREDICTIONS} & set(f.joins)}
    # The window columns and the purchase-day history of member_stats (the segmentation
    # fields on the statistics join) move with the windows step; `tier` with the tiers step.
    windows = {
        f.name for f in segment_fields() if f.joins and not {SCORES, PREDICTIONS} & set(f.joins)
    }
    return frozenset({*windows, "tier"}), frozenset({*scores, MEMBERSHIP_FIELD})


def reads_statistics_only(rule: Rule, vocab: Vocabulary) -> bool:
    """True when a rule reads nothing the lifecycle, RFM and churn steps write (no score or
    prediction field) and no segment membership: it can be evaluated once the windows (and
    tiers) are fresh, beside those steps."""
    _, late = _refreshed_fields(vocab)
    return all(name in vocab and name not in late for name in rule.fields)


def reads_nothing_refreshed(rule: Rule, vocab: Vocabulary) -> bool:
    """True when a rule reads no field any refresh step writes (only member fields and the
    lifetime statistics the purchase path keeps): it can be evaluated from the start."""
    windows, late = _refreshed_fields(vocab)
    return all(name in vocab and name not in windows | late for name in rule.fields)


def _custom_segments(
    as_of: date, config: ScoringConfig, session: Session, *, which: str
) -> dict[str, Any]:
    try:
        custom = importlib.import_module("segments.custom")
    except ImportError:
        return {"skipped": "segments.custom is not installed"}
    refresh_all = getattr(custom, "refresh_all", None)
    if refresh_all is None:
        return {"skipped": "segments.custom has no refresh_all"}
    from service.vocabulary import default_vocabulary

    vocab = default_vocabulary()
    include: Callable[[Rule], bool] | None = None
    if which == "early":
        include = lambda rule: reads_nothing_refreshed(rule, vocab)  # noqa: E731
    elif which == "stats":
        # The early step's segments are its own: no second evaluation, no lock wait.
        include = lambda rule: (  # noqa: E731
            reads_statistics_only(rule, vocab) and not reads_nothing_refreshed(rule, vocab)
        )
    # A fixed instant per date keeps a re-run of the date a no-op there too (and makes the
    # second step replay what the first refreshed).
    outcome = refresh_all(session, refresh_instant(as_of, config), vocab, include=include)
    return {"segments": len(outcome) if isinstance(outcome, list) else outcome}


def step_custom_segments_early(
    session: Session, as_of: date, config: ScoringConfig
) -> dict[str, Any]:
    """Custom segments whose rules read no field a refresh step writes (from the start)."""
    return _custom_segments(as_of, config, session, which="early")


def step_custom_segments_stats(
    session: Session, as_of: date, config: ScoringConfig
) -> dict[str, Any]:
    """Custom segments whose rules read windows, history or tiers but no score."""
    return _custom_segments(as_of, config, session, which="stats")


def step_custom_segments(session: Session, as_of: date, config: ScoringConfig) -> dict[str, Any]:
    """Every other custom segment (those refreshed earlier for this date are replayed)."""
    return _custom_segments(as_of, config, session, which="all")


def step_tiers(session: Session, as_of: date, config: ScoringConfig) -> dict[str, Any]:
    """Tier review (campaigns.tiers): upgrades due, one-step downgrades at review dates."""
    from campaigns.tiers import review_tiers

    return dict(review_tiers(session, as_of))


# The hook list: (name, step) in order. Later steps may rely on earlier ones.
REFRESH_STEPS: list[tuple[str, Step]] = [
    # Beside the windows: they take a core of their own for several seconds.
    ("custom_segments_early", step_custom_segments_early),
    ("windows", step_windows),
    # The longest step that needs only the windows: first to start once they are fresh,
    # so it runs beside the lifecycle -> RFM -> snapshot chain rather than after it.
    ("churn", step_churn),
    ("lifecycle", step_lifecycle),
    ("rfm", step_rfm),
    ("snapshot", step_snapshot),
    # After the windows (it reads them), before segments (rules may test the tier).
    ("tiers", step_tiers),
    ("custom_segments_stats", step_custom_segments_stats),
    ("custom_segments", step_custom_segments),
]


# What each step waits for. A step may start once these have committed; one not listed
# here (appended by another package) waits for every step before it. Lifecycle, RFM and
# snapshot form one chain because they write (or read) the same member_scores rows:
# concurrent updates of one row would wait on each other's locks or deadlock.
STEP_AFTER: dict[str, tuple[str, ...]] = {
    "windows": (),
    "lifecycle": ("windows",),
    "rfm": ("windows", "lifecycle"),
    "churn": ("windows",),
    "snapshot": ("rfm",),
    "tiers": ("windows",),
    # Segments whose rules read no score start once windows and tiers are fresh, beside
    # lifecycle, RFM and churn; the others wait for those too. Rules never read the
    # monthly snapshot (it copies RFM scores aside), so it runs beside the segments.
    "custom_segments_early": (),
    "custom_segments_stats": ("windows", "tiers"),
    "custom_segments": (
        *("windows", "lifecycle", "rfm", "churn", "tiers"),
        *("custom_segments_early", "custom_segments_stats"),
    ),
}


def prerequisites(chosen: list[str]) -> dict[str, list[str]]:
    """For each chosen step (in order), the chosen steps it must wait for."""
    ordered = [n for n, _ in REFRESH_STEPS]
    result: dict[str, list[str]] = {}
    for name in chosen:
        before = STEP_AFTER.get(name)
        if before is None:
            before = tuple(ordered[: ordered.index(name)])
        result[name] = [b for b in before if b in chosen]
    return result


def steps_named(names: list[str] | None = None) -> list[tuple[str, Step]]:
    """The refresh steps, all or the named ones (in their usual order)."""
    if names is None:
        return list(REFRESH_STEPS)
    known = {n for n, _ in REFRESH_STEPS}
    unknown = set(names) - known
    if unknown:
        raise ValueError(f"unknown refresh steps {sorted(unknown)}; known: {sorted(known)}")
    return [(n, s) for n, s in REFRESH_STEPS if n in names]


def begin_run(session: Session, as_of: date, config: ScoringConfig) -> None:
    """Create (or restart) the run row of `as_of`, remembering where history resumes."""
    previous = session.scalar(
        text("SELECT max(started_at) FROM score_runs WHERE finished_at IS NOT NULL")
    )
    since = previous.isoformat() if previous else None
    session.execute(
        text(
            "INSERT INTO score_runs (as_of, started_at, config, steps)"
            " VALUES (:d, now(), CAST(:config AS jsonb), CAST(:steps AS jsonb))"
            " ON CONFLICT (as_of) DO UPDATE SET started_at = now(), finished_at = NULL,"
            " config = EXCLUDED.config, steps = EXCLUDED.steps"
        ),
        {
            "d": as_of,
            "config": json.dumps(config.as_json()),
            "steps": json.dumps({"history_since": since}),
        },
    )


def run_step(
    session: Session, name: str, step: Step, as_of: date, config: ScoringConfig
) -> dict[str, Any]:
    """Run one step and record its details and duration on the run."""
    started = time.perf_counter()
    details = step(session, as_of, config)
    details = {"seconds": round(time.perf_counter() - started, 3), **details}
    session.execute(
        text(
            "UPDATE score_runs SET steps = steps || jsonb_build_object(:name, CAST(:d AS jsonb))"
            " WHERE as_of = :as_of"
        ),
        {"name": name, "d": json.dumps(details, default=str), "as_of": as_of},
    )
    log.info("refresh %s %s: %s", as_of, name, details)
    return details


def finish_run(session: Session, as_of: date) -> None:
    """Mark the run of `as_of` complete; counts the scored members."""
    session.execute(
        text(
            "UPDATE score_runs SET finished_at = now(),"
            " scored = (SELECT count(*) FROM member_scores WHERE r IS NOT NULL)"
            " WHERE as_of = :d"
        ),
        {"d": as_of},
    )


def today(config: ScoringConfig, now: datetime | None = None) -> date:
    """The refresh date for `now`: today in the business time zone."""
    return (now or datetime.now(UTC)).astimezone(config.zone).date()


def run_refresh(
    unit_of_work: UnitOfWork,
    as_of: date | None = None,
    *,
    config: ScoringConfig | None = None,
    steps: list[str] | None = None,
    progress: Progress | None = None,
    parallel: int = 1,
) -> dict[str, Any]:
    """Run the refresh in this process, one unit of work per step; returns details per step.

    With `parallel` > 1, steps whose prerequisites (`STEP_AFTER`) are done run at the same
    time in threads, each in its own unit of work, so `unit_of_work` must hand out
    sessions on separate connections (not one shared test connection).
    """
    config = config or ScoringConfig.from_env()
    as_of = as_of or today(config)
    chosen = dict(steps_named(steps))
    waits_for = prerequisites(list(chosen))
    with unit_of_work() as session:
        begin_run(session, as_of, config)
    results: dict[str, Any] = {}

    def one(name: str) -> dict[str, Any]:
        if progress:
            progress(name, {"status": "started"})
        with unit_of_work() as session:
            details = run_step(session, name, chosen[name], as_of, config)
        if progress:
            progress(name, details)
        return details

    pending = dict(waits_for)
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        running: dict[Future[dict[str, Any]], str] = {}
        while pending or running:
            ready = [n for n, before in pending.items() if all(b in results for b in before)]
            if not ready and not running:
                raise RuntimeError(f"refresh steps wait for each other: {sorted(pending)}")
            # In order, at most `parallel` at a time: with 1 this is the plain sequence.
            for name in ready[: max(1, parallel) - len(running)]:
                del pending[name]
                running[pool.submit(one, name)] = name
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                # A failed step raises here; steps already running finish (each is its own
                # transaction), nothing after it starts, and the run stays unfinished.
                results[running.pop(future)] = future.result()
    with unit_of_work() as session:
        finish_run(session, as_of)
    return {"as_of": as_of.isoformat(), "steps": {n: results[n] for n in chosen}}


def refresh_cron(config: ScoringConfig, now: datetime | None = None) -> str:
    """A cron string for rq.cron (which reads it in this process's local time zone).

    The configured HH:MM in the business zone is converted with today's offsets; zones
    with daylight saving move by an hour on the change days, which a daily job tolerates.
    """
    here = refresh_instant(today(config, now), config).astimezone()
    return f"{here.minute} {here.hour} * * *"


def iter_step_names() -> Iterator[str]:
    """Names of the refresh steps in order (for job fan-out and the API)."""
    return (n for n, _ in REFRESH_STEPS)
