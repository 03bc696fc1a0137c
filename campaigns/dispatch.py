"""Delivery: the dispatcher, the sweeper and the worker job.

* The **dispatcher** (`patron dispatcher`) marks due, committed outbox rows as
  dispatched and enqueues them as RQ jobs of `batch_size` messages (one job, many
  messages). It reads PostgreSQL and writes Redis; the API never does.
* The **sweeper** (run by the dispatcher loop) hands out again rows whose job
  was lost (dispatched long ago, never claimed: Redis restarted, no worker) and
  rows whose worker died mid-send (`sending` past its lease).
* The **worker job** (`deliver_job`, on any RQ worker) claims its rows with
  `FOR UPDATE SKIP LOCKED` and a conditional status change, locks the members'
  rows (so two workers cannot both take a member's last frequency-cap slot),
  applies the contact policy, renders, sends and records each outcome with an
  update fenced on (status = 'sending', attempts), so a slow worker whose lease
  was taken over can never overwrite the newer attempt.

A message is only sent again after its lease expired without an outcome (the
worker was killed between the provider's answer and the commit); it then goes
out with the same idempotency key, which the provider uses to drop the copy.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from rq import Queue
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from campaigns import policy, templates
from campaigns.channels import Channel, Outcome, Outgoing, Result, build_channels
from campaigns.channels.config import MessagingConfig
from campaigns.channels.ratelimit import RateLimiter

log = logging.getLogger(__name__)

JOB_FUNCTION = "campaigns.dispatch.deliver_job"
JOB_TIMEOUT = 1800
RESULT_TTL = 600

# --- dispatcher ---------------------------------------------------------------------

_MARK = text(
    """
    UPDATE outbox_messages SET dispatched_at = now()
    WHERE id IN (
        SELECT id FROM outbox_messages
        WHERE status IN ('queued', 'deferred') AND dispatched_at IS NULL
          AND not_before <= now()
        ORDER BY not_before
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    RETURNING id
    """
)
_UNMARK = text(
    """
    UPDATE outbox_messages SET dispatched_at = NULL
    WHERE id = ANY(:ids) AND status IN ('queued', 'deferred')
    """
)


def enqueue_batches(queue: Queue, ids: Sequence[int], batch_size: int) -> int:
    """Enqueue `ids` as jobs of at most `batch_size` messages in one Redis round trip."""
    ordered = sorted(ids)
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    if not batches:
        return 0
    datas = [
        Queue.prepare_data(
            JOB_FUNCTION,
            args=(batch,),
            timeout=JOB_TIMEOUT,
            result_ttl=RESULT_TTL,
            description=f"deliver {len(batch)} messages ({batch[0]}…{batch[-1]})",
        )
        for batch in batches
    ]
    with queue.connection.pipeline() as pipe:
        queue.enqueue_many(datas, pipeline=pipe)
        pipe.execute()
    return len(batches)


def dispatch_once(engine: Engine, queue: Queue, config: MessagingConfig) -> tuple[int, int]:
    """Hand up to `dispatch_limit` due messages to RQ; returns (messages, jobs).

    The rows are marked in a committed transaction first; if Redis then refuses the
    jobs, the marks are undone (and, should that fail too, the sweeper undoes them).
    """
    with Session(engine) as session, session.begin():
        ids = list(session.execute(_MARK, {"limit": config.dispatch_limit}).scalars())
    if not ids:
        return 0, 0
    try:
        jobs = enqueue_batches(queue, ids, config.batch_size)
    except redis.RedisError:
        with Session(engine) as session, session.begin():
            session.execute(_UNMARK, {"ids": ids})
        raise
    return len(ids), jobs


_REDISPATCH = text(
    """
    UPDATE outbox_messages SET dispatched_at = NULL
    WHERE status IN ('queued', 'deferred') AND dispatched_at IS NOT NULL
      AND dispatched_at < now() - make_interval(secs => :seconds)
    """
)
_RECLAIM = text(
    """
    UPDATE outbox_messages SET
        status = CASE WHEN attempts >= :max_attempts THEN 'dead' ELSE 'deferred' END,
        reason = CASE WHEN attempts >= :max_attempts THEN 'max_attempts' ELSE 'lease_expired' END,
        last_error = 'the worker stopped before reporting the outcome',
        lease_until = NULL, contacted_at = NULL, dispatched_at = NULL,
        not_before = now(), updated_at = now()
    WHERE status = 'sending' AND lease_until < now()
    """
)


def sweep(engine: Engine, config: MessagingConfig) -> dict[str, int]:
    """Hand out again what a lost job or a dead worker left behind."""
    with Session(engine) as session, session.begin():
        redispatched_result: Any = session.execute(
            _REDISPATCH, {"seconds": config.redispatch_seconds}
        )
        redispatched = redispatched_result.rowcount
        reclaimed_result: Any = session.execute(_RECLAIM, {"max_attempts": config.max_attempts})
        reclaimed = reclaimed_result.rowcount
    if redispatched or reclaimed:
        log.warning(
            "sweeper: %d messages dispatched again, %d sends reclaimed after their lease",
            redispatched,
            reclaimed,
        )
    return {"redispatched": redispatched, "reclaimed": reclaimed}


def message_queue(connection: redis.Redis, config: MessagingConfig) -> Queue:
    return Queue(config.queue_name, connection=connection)


def run_dispatcher(
    engine: Engine,
    connection: redis.Redis,
    config: MessagingConfig,
    *,
    stop: threading.Event | None = None,
    once: bool = False,
) -> dict[str, int]:
    """Dispatch and sweep until `stop` is set (or one round with `once`)."""
    stop = stop or threading.Event()
    queue = message_queue(connection, config)
    totals = {"messages": 0, "jobs": 0, "redispatched": 0, "reclaimed": 0}
    sweep_every = max(1.0, min(config.redispatch_seconds, config.lease_seconds) / 2)
    next_sweep = 0.0
    failures = 0
    while not stop.is_set():
        busy = False
        try:
            if time.monotonic() >= next_sweep:
                for key, value in sweep(engine, config).items():
                    totals[key] += value
                next_sweep = time.monotonic() + sweep_every
            messages, jobs = dispatch_once(engine, queue, config)
            totals["messages"] += messages
            totals["jobs"] += jobs
            busy = messages >= config.dispatch_limit
            failures = 0
        except (redis.RedisError, OperationalError, DBAPIError) as exc:
            # Redis or PostgreSQL is away: the rows stay in the outbox; try again later.
            failures += 1
            log.warning("dispatcher: %s (%s); retrying", type(exc).__name__, exc)
            stop.wait(min(10.0, 0.5 * 2 ** min(failures, 5)))
            continue
        if once:
            if not busy:
                break
            continue
        if not busy:
            stop.wait(config.dispatch_interval)
    return totals


# --- worker ---------------------------------------------------------------------------

_CLAIM = text(
    """
    SELECT o.id, o.member_id, o.campaign_id, o.coupon_id, o.template, o.channel, o.kind,
           o.not_after, o.payload, o.attempts
    FROM outbox_messages o
    WHERE o.id = ANY(:ids) AND o.status IN ('queued', 'deferred') AND o.not_before <= now()
    ORDER BY o.id
    FOR UPDATE SKIP LOCKED
    """
)
# Locking the members (in id order: no deadlocks) makes "count the recent contacts,
# then take a slot" atomic per member; FOR NO KEY UPDATE does not block purchases
# (their foreign-key checks take KEY SHARE locks). It also reads consent as of now.
_MEMBERS = text(
    """
    SELECT m.id, m.external_id, m.name, m.gender, m.birth_date, m.email, m.phone,
           m.timezone, m.locale, m.tier, m.tags, m.attributes, m.status,
           m.consent_email, m.consent_sms, m.consent_push, m.consent_wechat,
           s.code AS store_code, s.name AS store_name, r.name AS region_name
    FROM members m
    LEFT JOIN stores s ON s.id = m.home_store_id
    LEFT JOIN regions r ON r.id = s.region_id
    WHERE m.id = ANY(:ids)
    ORDER BY m.id
    FOR NO KEY UPDATE OF m
    """
)
# One index probe per member (LATERAL): with `member_id = ANY(...)` the planner, misled
# by statistics that lag behind a busy outbox, chose to scan every sent message instead.
_CONTACTS = text(
    """
    SELECT m.member_id, o.sent_channel, o.contacted_at
    FROM unnest(CAST(:ids AS bigint[])) AS m(member_id)
    CROSS JOIN LATERAL (
        SELECT sent_channel, contacted_at FROM outbox_messages
        WHERE member_id = m.member_id AND kind = 'marketing'
          AND status IN ('sending', 'sent') AND contacted_at IS NOT NULL
          AND contacted_at > :since
    ) o
    """
)
_COUPONS = text(
    """
    SELECT c.id, c.code, c.face_value, c.valid_from, c.valid_until,
           t.kind, t.percent_off, t.amount_off
    FROM coupons c LEFT JOIN coupon_templates t ON t.id = c.template_id
    WHERE c.id = ANY(:ids)
    """
)
_APPLY_COLUMNS = """
    status = v.status,
    sent_channel = COALESCE(v.sent_channel, o.sent_channel),
    not_before = COALESCE(v.not_before, o.not_before),
    reason = v.reason,
    last_error = v.last_error,
    overrides = CASE WHEN v.overrides = '' THEN o.overrides
                     ELSE string_to_array(v.overrides, ',') END,
    attempts = o.attempts + v.attempt,
    lease_until = v.lease_until,
    contacted_at = v.contacted_at,
    sent_at = v.sent_at,
    provider_id = COALESCE(v.provider_id, o.provider_id),
    dispatched_at = CASE WHEN v.status IN ('queued', 'deferred') THEN NULL
                         ELSE o.dispatched_at END,
    updated_at = now()
"""
_APPLY_FROM = """
    FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS text[]),
                CAST(:channels AS text[]), CAST(:not_befores AS timestamptz[]),
                CAST(:reasons AS text[]), CAST(:errors AS text[]), CAST(:overrides AS text[]),
                CAST(:attempt AS integer[]), CAST(:leases AS timestamptz[]),
                CAST(:contacted AS timestamptz[]), CAST(:sent AS timestamptz[]),
                CAST(:providers AS text[]), CAST(:expected AS integer[]))
         AS v(id, status, sent_channel, not_before, reason, last_error, overrides, attempt,
              lease_until, contacted_at, sent_at, provider_id, expected)
"""
# Inside the claiming transaction: the rows are locked by us.
_APPLY = text(f"UPDATE outbox_messages o SET {_APPLY_COLUMNS} {_APPLY_FROM} WHERE o.id = v.id")  # noqa: S608
# After an external send: only if the row is still this attempt's.
_RECORD = text(
    f"UPDATE outbox_messages o SET {_APPLY_COLUMNS} {_APPLY_FROM} "  # noqa: S608
    "WHERE o.id = v.id AND o.status = 'sending' AND o.attempts = v.expected"
)


@dataclass
class _Change:
    id: int
    status: str
    channel: str | None = None
    not_before: datetime | None = None
    reason: str | None = None
    error: str | None = None
    overrides: str = ""
    attempt: int = 0
    lease_until: datetime | None = None
    contacted_at: datetime | None = None
    sent_at: datetime | None = None
    provider_id: str | None = None
    expected: int = 0


def _params(changes: Sequence[_Change]) -> dict[str, list[Any]]:
    return {
        "ids": [c.id for c in changes],
        "statuses": [c.status for c in changes],
        "channels": [c.channel for c in changes],
        "not_befores": [c.not_before for c in changes],
        "reasons": [c.reason for c in changes],
        "errors": [c.error[:500] if c.error else None for c in changes],
        "overrides": [c.overrides for c in changes],
        "attempt": [c.attempt for c in changes],
        "leases": [c.lease_until for c in changes],
        "contacted": [c.contacted_at for c in changes],
        "sent": [c.sent_at for c in changes],
        "providers": [c.provider_id for c in changes],
        "expected": [c.expected for c in changes],
    }


@dataclass
class Runtime:
    """What a worker process keeps between jobs: engine, channels, caches, limiter."""

    engine: Engine
    config: MessagingConfig
    channels: dict[str, Channel]
    limiter: RateLimiter | None
    variants: templates.VariantCache = field(default_factory=templates.VariantCache)
    coupons_table: bool | None = None
    pid: int = field(default_factory=os.getpid)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


def make_runtime(
    engine: Engine, config: MessagingConfig, connection: redis.Redis | None
) -> Runtime:
    return Runtime(
        engine=engine,
        config=config,
        channels=build_channels(config),
        limiter=RateLimiter(connection) if connection is not None else None,
    )


_RUNTIME: Runtime | None = None


def process_runtime() -> Runtime:
    """This process's runtime, built from the environment (rebuilt after a fork)."""
    global _RUNTIME
    if _RUNTIME is None or _RUNTIME.pid != os.getpid():
        from rq import get_current_job

        from service.config import Config
        from service.db import make_engine

        config = Config.from_env()
        current = get_current_job()
        connection = current.connection if current is not None else None
        if connection is None and config.redis_url:
            from service.redis_client import make_redis

            connection = make_redis(config.redis_url)
        _RUNTIME = make_runtime(make_engine(config), MessagingConfig.from_env(), connection)
    return _RUNTIME


def deliver_job(ids: list[int]) -> dict[str, int]:
    """RQ job: deliver these outbox messages (those still due and unclaimed)."""
    return deliver(process_runtime(), ids)


def deliver(rt: Runtime, ids: Iterable[int]) -> dict[str, int]:
    """Claim, check, send and record the given messages, chunk by chunk."""
    totals: dict[str, int] = defaultdict(int)
    ordered = sorted(set(ids))
    size = rt.config.chunk_size
    for start in range(0, len(ordered), size):
        for key, value in _deliver_chunk(rt, ordered[start : start + size]).items():
            totals[key] += value
    return dict(totals)


def _backoff(config: MessagingConfig, attempts: int, retry_after: float | None) -> float:
    delay = min(config.retry_max_seconds, config.retry_base_seconds * 2 ** max(0, attempts - 1))
    # Jitter spreads the retries of a provider outage instead of returning all at once.
    delay = random.uniform(delay / 2, delay)
    return max(delay, retry_after or 0.0)


def _outcome_change(
    rt: Runtime, outcome: Outcome, attempts: int, channel: str, now: datetime, contacted: Any
) -> _Change:
    """The row change for a channel's answer; `attempts` counts this attempt."""
    if outcome.result == Result.SENT:
        return _Change(
            outcome.message_id,
            "sent",
            channel=channel,
            sent_at=now,
            contacted_at=contacted,
            provider_id=outcome.provider_id,
            expected=attempts,
        )
    if outcome.result == Result.PERMANENT:
        return _Change(
            outcome.message_id,
            "failed",
            channel=channel,
            reason=policy.Reason.PERMANENT_ERROR.value,
            error=outcome.error,
            expected=attempts,
        )
    if attempts >= rt.config.max_attempts:
        return _Change(
            outcome.message_id,
            "dead",
            channel=channel,
            reason=policy.Reason.MAX_ATTEMPTS.value,
            error=outcome.error,
            expected=attempts,
        )
    wait = _backoff(rt.config, attempts, outcome.retry_after)
    return _Change(
        outcome.message_id,
        "deferred",
        channel=channel,
        reason=policy.Reason.RETRY.value,
        error=outcome.error,
        not_before=now + timedelta(seconds=wait),
        expected=attempts,
    )


def _load_coupons(rt: Runtime, session: Session, ids: list[int]) -> dict[int, Mapping[str, Any]]:
    if not ids:
        return {}
    if rt.coupons_table is None:
        rt.coupons_table = bool(
            session.execute(
                text(
                    "SELECT to_regclass('coupons') IS NOT NULL "
                    "AND to_regclass('coupon_templates') IS NOT NULL"
                )
            ).scalar()
        )
    if not rt.coupons_table:
        return {}
    return {row["id"]: dict(row) for row in session.execute(_COUPONS, {"ids": ids}).mappings()}


def _deliver_chunk(rt: Runtime, ids: list[int]) -> dict[str, int]:
    config = rt.config
    counts: dict[str, int] = defaultdict(int)
    external: dict[str, list[tuple[Outgoing, int, Any]]] = defaultdict(list)
    with Session(rt.engine) as session, session.begin():
        rows: list[Any] = list(session.execute(_CLAIM, {"ids": ids}).mappings())
        if not rows:
            return counts
        now = datetime.now(UTC)
        member_ids = sorted({r["member_id"] for r in rows})
        members: dict[int, Any] = {
            m["id"]: dict(m) for m in session.execute(_MEMBERS, {"ids": member_ids}).mappings()
        }
        longest = max((c.cap_days for c in config.channels.values()), default=7.0)
        contacts: dict[int, dict[str, list[datetime]]] = defaultdict(lambda: defaultdict(list))
        for member_id, channel, at in session.execute(
            _CONTACTS, {"ids": member_ids, "since": now - timedelta(days=longest)}
        ):
            contacts[member_id][channel].append(at)
        coupons = _load_coupons(
            rt, session, sorted({r["coupon_id"] for r in rows if r["coupon_id"]})
        )
        variants = rt.variants.variants(session, {r["template"] for r in rows})

        changes: list[_Change] = []
        in_tx: dict[str, list[tuple[Outgoing, int, Any, str]]] = defaultdict(list)
        lease = now + timedelta(seconds=config.lease_seconds)
        for row in rows:
            member = members[row["member_id"]]
            decision = policy.decide(row, member, contacts[row["member_id"]], config, now)
            if decision.action != "send":
                status = "deferred" if decision.action == "defer" else "suppressed"
                error = None
                if status == "suppressed" and decision.reason in ("frequency_cap", "quiet_hours"):
                    error = "the next allowed moment is after the offer expires"
                changes.append(
                    _Change(
                        row["id"],
                        status,
                        channel=decision.channel,
                        not_before=decision.not_before,
                        reason=decision.reason,
                        error=error,
                    )
                )
                counts[status] += 1
                continue
            channel = decision.channel
            assert channel is not None
            variant = templates.choose(
                variants.get(row["template"], []), channel, member["locale"], config.default_locale
            )
            if variant is None:
                changes.append(
                    _Change(
                        row["id"],
                        "failed",
                        channel=channel,
                        reason=policy.Reason.TEMPLATE_MISSING.value,
                        error=f"no variant of template {row['template']!r} for {channel}",
                    )
                )
                counts["failed"] += 1
                continue
            coupon = templates.coupon_context(
                coupons.get(row["coupon_id"]) if row["coupon_id"] else None,
                member["timezone"] or "UTC",
            )
            context = templates.build_context(
                member,
                coupon=coupon,
                payload=row["payload"],
                message={**row, "channel": channel},
            )
            try:
                subject, body = templates.render(variant, context)
            except Exception as exc:  # any template error: the message cannot be built
                changes.append(
                    _Change(
                        row["id"],
                        "failed",
                        channel=channel,
                        reason=policy.Reason.RENDER_ERROR.value,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                )
                counts["failed"] += 1
                continue
            marketing = row["kind"] == "marketing"
            contacted = now if marketing else None
            if marketing:
                # Later messages of this chunk for the member see this slot as taken.
                contacts[row["member_id"]][channel].append(now)
            outgoing = Outgoing(
                message_id=row["id"],
                channel=channel,
                to=policy.contact_point(channel, member) or "",
                subject=subject,
                body=body,
                member_id=row["member_id"],
                member_external_id=member["external_id"],
                campaign_id=row["campaign_id"],
                template=row["template"],
                locale=variant.locale,
                kind=row["kind"],
                payload=dict(row["payload"] or {}),
            )
            attempts = row["attempts"] + 1
            overrides = ",".join(decision.overrides)
            if rt.channels[channel].in_transaction:
                in_tx[channel].append((outgoing, attempts, contacted, overrides))
                continue
            external[channel].append((outgoing, attempts, contacted))
            changes.append(
                _Change(
                    row["id"],
                    "sending",
                    channel=channel,
                    overrides=overrides,
                    attempt=1,
                    lease_until=lease,
                    contacted_at=contacted,
                )
            )
        # Channels that complete inside this transaction (log, no-op, call-centre tasks).
        for channel, pending in in_tx.items():
            outcomes = rt.channels[channel].send_many([p[0] for p in pending], session=session)
            for (_, attempts, contacted, overrides), outcome in zip(pending, outcomes, strict=True):
                change = _outcome_change(rt, outcome, attempts, channel, now, contacted)
                change.attempt = 1
                change.overrides = overrides
                changes.append(change)
                counts[change.status] += 1
        if changes:
            session.execute(_APPLY, _params(changes))

    for channel, items in external.items():
        for status, count in _send_external(rt, channel, items).items():
            counts[status] += count
    return counts


def _send_external(
    rt: Runtime, channel: str, items: list[tuple[Outgoing, int, Any]]
) -> dict[str, int]:
    """Send outside any transaction; record outcomes in small groups as they arrive.

    Recording every `concurrency` outcomes bounds what a killed worker leaves
    ambiguous (sent, not recorded: resent after the lease with the same key) to
    at most 2 × concurrency messages, at one small UPDATE per group.
    """
    counts: dict[str, int] = defaultdict(int)
    settings = rt.config.channels[channel]
    by_id = {o.message_id: (attempts, contacted) for o, attempts, contacted in items}
    pending = [o for o, _, _ in items]
    group = max(1, settings.concurrency)
    while pending:
        take = len(pending)
        if settings.rate > 0 and rt.limiter is not None:
            take = rt.limiter.acquire(channel, settings.rate, len(pending))
            if take == 0:
                continue
        batch, pending = pending[:take], pending[take:]
        done: list[Outcome] = []
        for outcome in rt.channels[channel].send_iter(batch):
            done.append(outcome)
            if len(done) >= group:
                _record(rt, channel, done, by_id, counts)
                done = []
        if done:
            _record(rt, channel, done, by_id, counts)
    return counts


def _record(
    rt: Runtime,
    channel: str,
    outcomes: list[Outcome],
    by_id: dict[int, tuple[int, Any]],
    counts: dict[str, int],
) -> None:
    now = datetime.now(UTC)
    changes = [
        _outcome_change(rt, o, by_id[o.message_id][0], channel, now, by_id[o.message_id][1])
        for o in outcomes
    ]
    with Session(rt.engine) as session, session.begin():
        result: Any = session.execute(_RECORD, _params(changes))
        recorded = result.rowcount
    if recorded != len(changes):
        log.warning(
            "%d outcomes on %s arrived after their lease was taken over",
            len(changes) - recorded,
            channel,
        )
    for change in changes:
        counts[change.status] += 1


def queue_metrics(connection: redis.Redis, config: MessagingConfig) -> dict[str, Any]:
    """RQ depth and failures of the message queue (for /readyz and the stats endpoint)."""
    queue = message_queue(connection, config)
    return {
        "name": queue.name,
        "depth": queue.count,
        "started": queue.started_job_registry.count,
        "failed": queue.failed_job_registry.count,
    }


def run_delivery_worker(redis_url: str, config: MessagingConfig, *, burst: bool = False) -> None:
    """An RQ worker that runs jobs in its own process (no fork per job).

    A forking worker rebuilds the database engine, channels and compiled templates for
    every job; delivery jobs are short and many, so keeping them pays (the benchmark's
    workers run this way). A SIGKILL loses nothing either way: the sweeper reclaims
    the rows after their lease.
    """
    from rq import SimpleWorker

    from service.redis_client import make_redis

    connection = make_redis(redis_url)
    worker = SimpleWorker([message_queue(connection, config)], connection=connection)
    worker.work(burst=burst, with_scheduler=False)


def deliver_now(engine: Engine, connection: redis.Redis, config: MessagingConfig) -> dict[str, int]:
    """Dispatch everything due and run the jobs in this process until the queue is empty.

    For the embedded demo and one-off operations; production runs `patron dispatcher`
    and workers instead.
    """
    from rq import SimpleWorker

    totals = run_dispatcher(engine, connection, config, once=True)
    SimpleWorker([message_queue(connection, config)], connection=connection).work(
        burst=True, with_scheduler=False
    )
    return totals


_SUMMARY = text(
    """
    SELECT status, COALESCE(sent_channel, channel, '-') AS channel, reason, count(*) AS n
    FROM outbox_messages GROUP BY 1, 2, 3 ORDER BY 4 DESC
    """
)


def outbox_summary(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(_SUMMARY).mappings()]
