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

import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2
import redis
from rq import Queue
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from campaigns import policy, templates
from campaigns.channels import Channel, Outcome, Outgoing, Result, build_channels
from campaigns.channels.config import MessagingConfig
from campaigns.channels.ratelimit import RateLimiter
from service.db import PREPARE_OPTION, REPREPARE_AFTER_EXECUTIONS, REPREPARE_AFTER_SECONDS

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

# The claim: due rows of the job not taken by another worker, then their members in id
# order (no deadlocks). Locking the members makes "count the recent contacts, then take
# a slot" atomic per member; FOR NO KEY UPDATE does not block purchases (their foreign
# key checks take KEY SHARE locks). The policy runs in the next statement, whose fresh
# snapshot sees the contacts of any worker that held these members before us.
_CLAIM = """
WITH claimed AS MATERIALIZED (
    SELECT id, member_id FROM outbox_messages
    WHERE id = ANY(%(ids)s) AND status IN ('queued', 'deferred') AND not_before <= now()
    ORDER BY id
    FOR UPDATE SKIP LOCKED
),
locked AS MATERIALIZED (
    SELECT m.id FROM members m
    WHERE m.id IN (SELECT member_id FROM claimed)
    ORDER BY m.id
    FOR NO KEY UPDATE
)
SELECT array_agg(id ORDER BY id) FROM claimed, (SELECT count(*) FROM locked) AS l
"""
_COUPONS = """
SELECT c.id, c.code, c.face_value, c.valid_from, c.valid_until,
       t.kind, t.percent_off, t.amount_off
FROM coupons c LEFT JOIN coupon_templates t ON t.id = c.template_id
WHERE c.id = ANY(%(ids)s)
"""
# Outcomes of a chunk, one row each from parallel arrays.
_OUTCOME = """
UPDATE outbox_messages o SET
    status = v.status,
    sent_channel = COALESCE(v.channel, o.sent_channel),
    not_before = COALESCE(v.not_before, o.not_before),
    reason = v.reason,
    last_error = v.error,
    overrides = CASE WHEN v.overrides <> '' THEN string_to_array(v.overrides, ',')
                     ELSE o.overrides END,
    attempts = v.attempts,
    lease_until = NULL,
    contacted_at = CASE WHEN v.status = 'sent' AND o.kind = 'marketing'
                        THEN CASE WHEN o.status = 'sending' THEN o.contacted_at ELSE now() END
                   END,
    sent_at = CASE WHEN v.status = 'sent' THEN now() END,
    provider_id = COALESCE(v.provider_id, o.provider_id),
    dispatched_at = CASE WHEN v.status IN ('queued', 'deferred') THEN NULL
                         ELSE o.dispatched_at END,
    updated_at = now()
FROM unnest(%(ids)s::bigint[], %(statuses)s::text[], %(channels)s::text[],
            %(reasons)s::text[], %(errors)s::text[], %(not_befores)s::timestamptz[],
            %(providers)s::text[], %(overrides)s::text[], %(attempts)s::integer[])
     AS v(id, status, channel, reason, error, not_before, provider_id, overrides, attempts)
WHERE o.id = v.id
"""


_PYFORMAT = re.compile(r"%\((\w+)\)s")


@dataclass(frozen=True)
class _Statement:
    """A worker statement and its server-side prepared form (see `_run`)."""

    text: str
    name: str
    prepare: str
    execute: str

    @classmethod
    def of(cls, sql: str) -> _Statement:
        order: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) not in order:
                order.append(match.group(1))
            return f"${order.index(match.group(1)) + 1}"

        body = _PYFORMAT.sub(number, sql)
        name = "patron_msg_" + hashlib.sha1(body.encode(), usedforsecurity=False).hexdigest()[:16]
        args = ", ".join(f"%({key})s" for key in order)
        return cls(sql, name, f"PREPARE {name} AS {body}", f"EXECUTE {name} ({args})")


def _run(conn: Connection, statement: _Statement, params: Mapping[str, Any]) -> Any:
    """Execute on `conn` (in its transaction) with a raw DB-API cursor; return the cursor.

    The policy statement takes PostgreSQL longer to plan than to run for a chunk, so each
    pooled connection PREPAREs the worker's statements once and re-prepares them now and
    then (as `service.db.execute_prepared` does, whose reasons apply). Rows come back as
    plain tuples: no per-row result objects on this path.
    """
    cursor = conn.connection.cursor()
    if not conn.get_execution_options().get(PREPARE_OPTION, True):
        cursor.execute(statement.text, params)
        return cursor
    state: dict[str, list[float]] = conn.connection.info.setdefault("patron_prepared", {})
    entry = state.get(statement.name)
    now = time.monotonic()
    try:
        if entry is None:
            cursor.execute(statement.prepare)
            entry = state[statement.name] = [now, 0]
        elif entry[1] >= REPREPARE_AFTER_EXECUTIONS or now - entry[0] >= REPREPARE_AFTER_SECONDS:
            cursor.execute(f"DEALLOCATE {statement.name}; {statement.prepare}")
            entry[0], entry[1] = now, 0
        entry[1] += 1
        cursor.execute(statement.execute, params)
    except psycopg2.Error as exc:
        if exc.pgcode == "26000":  # the prepared statement is gone
            state.pop(statement.name, None)
        raise
    return cursor


# Inside the claiming transaction the rows are ours (locked); after an external send an
# outcome only counts if the row is still this attempt's (its lease was not taken over).
_APPLY = _Statement.of(_OUTCOME)
_RECORD = _Statement.of(_OUTCOME + " AND o.status = 'sending' AND o.attempts = v.attempts")
_CLAIM_STATEMENT = _Statement.of(_CLAIM)
_COUPONS_STATEMENT = _Statement.of(_COUPONS)


class _Outcomes:
    """A chunk's outcomes as the parallel arrays `_OUTCOME` takes (no object per row)."""

    __slots__ = (
        "attempts",
        "channels",
        "errors",
        "ids",
        "not_befores",
        "overrides",
        "providers",
        "reasons",
        "statuses",
    )

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.statuses: list[str] = []
        self.channels: list[str | None] = []
        self.reasons: list[str | None] = []
        self.errors: list[str | None] = []
        self.not_befores: list[datetime | None] = []
        self.providers: list[str | None] = []
        self.overrides: list[str | None] = []
        self.attempts: list[int] = []

    def __len__(self) -> int:
        return len(self.ids)

    def add(
        self,
        message_id: int,
        status: str,
        channel: str | None,
        attempts: int,
        *,
        reason: str | None = None,
        error: str | None = None,
        not_before: datetime | None = None,
        provider_id: str | None = None,
        overrides: str | None = None,
    ) -> None:
        self.ids.append(message_id)
        self.statuses.append(status)
        self.channels.append(channel)
        self.reasons.append(reason)
        self.errors.append(error[:500] if error else None)
        self.not_befores.append(not_before)
        self.providers.append(provider_id)
        self.overrides.append(overrides)
        self.attempts.append(attempts)

    def params(self) -> dict[str, list[Any]]:
        return {name: getattr(self, name) for name in self.__slots__}

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for status in self.statuses:
            counts[status] += 1
        return counts


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
    # Channels sent after the claim commits (the others complete inside it).
    external: frozenset[str] = frozenset()
    chunk: _Statement | None = None
    zones: list[str] | None = None

    def __post_init__(self) -> None:
        self.external = frozenset(n for n, c in self.channels.items() if not c.in_transaction)
        self.chunk = _Statement.of(policy.chunk_sql(self.config, self.external))

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


def _add_outcome(
    rt: Runtime,
    out: _Outcomes,
    outcome: Outcome,
    channel: str,
    attempts: int,
    now: datetime,
    overrides: str | None = None,
) -> None:
    """The row change for a channel's answer; `attempts` counts this attempt."""
    if outcome.result == Result.SENT:
        out.add(
            outcome.message_id,
            "sent",
            channel,
            attempts,
            provider_id=outcome.provider_id,
            overrides=overrides,
        )
    elif outcome.result == Result.PERMANENT:
        out.add(
            outcome.message_id,
            "failed",
            channel,
            attempts,
            reason=policy.Reason.PERMANENT_ERROR.value,
            error=outcome.error,
        )
    elif attempts >= rt.config.max_attempts:
        out.add(
            outcome.message_id,
            "dead",
            channel,
            attempts,
            reason=policy.Reason.MAX_ATTEMPTS.value,
            error=outcome.error,
        )
    else:
        wait = _backoff(rt.config, attempts, outcome.retry_after)
        out.add(
            outcome.message_id,
            "deferred",
            channel,
            attempts,
            reason=policy.Reason.RETRY.value,
            error=outcome.error,
            not_before=now + timedelta(seconds=wait),
        )


def _zones(rt: Runtime, session: Session) -> list[str]:
    """Zone names PostgreSQL and zoneinfo both know (read once per process)."""
    if rt.zones is None:
        from zoneinfo import available_timezones

        cursor = session.connection().connection.cursor()
        cursor.execute("SELECT name FROM pg_timezone_names")
        rt.zones = sorted({r[0] for r in cursor.fetchall()} & available_timezones() | {"UTC"})
    return rt.zones


def _load_coupons(rt: Runtime, session: Session, ids: list[int]) -> dict[int, dict[str, Any]]:
    if not ids:
        return {}
    if rt.coupons_table is None:
        cursor = session.connection().connection.cursor()
        cursor.execute(
            "SELECT to_regclass('coupons') IS NOT NULL "
            "AND to_regclass('coupon_templates') IS NOT NULL"
        )
        found = cursor.fetchone()
        rt.coupons_table = bool(found and found[0])
    if not rt.coupons_table:
        return {}
    cursor = _run(session.connection(), _COUPONS_STATEMENT, {"ids": ids})
    names = [d[0] for d in cursor.description]
    return {row[0]: dict(zip(names, row, strict=True)) for row in cursor.fetchall()}


def _context(
    roots: frozenset[str], row: tuple[Any, ...], coupons: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """Template variables (only `roots`) for a send row of `policy.chunk_sql`."""
    coupon_id, timezone, attributes = row[4], row[18], row[22]
    member = {
        "external_id": row[12],
        "name": row[13],
        "gender": row[14],
        "birth_date": row[15],
        "email": row[16],
        "phone": row[17],
        "timezone": timezone,
        "locale": row[19],
        "tier": row[20],
        "tags": row[21],
        # Decoded only for templates that print the member.
        "attributes": (
            json.loads(attributes) if "member" in roots and attributes not in (None, "{}") else {}
        ),
        "store_code": row[23],
        "store_name": row[24],
        "region_name": row[25],
    }
    coupon = None
    if coupon_id and "coupon" in roots:
        found = coupons.get(coupon_id)
        coupon = templates.coupon_context(found, timezone or "UTC") if found else None
    message = {"id": row[1], "channel": row[6], "kind": row[7], "template": row[5]}
    message["campaign_id"] = row[3]
    payload = row[8] if isinstance(row[8], dict) else None
    return templates.build_context(
        member, coupon=coupon, payload=payload, message=message, roots=roots
    )


def _deliver_chunk(rt: Runtime, ids: list[int]) -> dict[str, int]:
    config = rt.config
    counts: dict[str, int] = defaultdict(int)
    external: dict[str, list[Outgoing]] = defaultdict(list)
    attempts_of: dict[int, int] = {}
    done = _Outcomes()
    with Session(rt.engine) as session, session.begin():
        claimed = _run(session.connection(), _CLAIM_STATEMENT, {"ids": ids}).fetchone()[0]
        if not claimed:
            return {}
        assert rt.chunk is not None
        params: dict[str, Any] = {
            "ids": claimed,
            "now": datetime.now(UTC),
            "lease": config.lease_seconds,
        }
        if "%(zones)s" in rt.chunk.text:
            params["zones"] = _zones(rt, session)
        rows = _run(session.connection(), rt.chunk, params).fetchall()
        sends = []
        for row in rows:
            if row[0] == "send":
                sends.append(row)
            else:  # deferred or suppressed by the statement itself
                counts[row[0]] += 1
        coupons = _load_coupons(rt, session, sorted({r[4] for r in sends if r[4]}))
        variants = rt.variants.variants(session, {r[5] for r in sends})
        chosen: dict[tuple[str, str, str | None], templates.Variant | None] = {}
        in_tx: dict[str, list[tuple[Outgoing, str | None]]] = defaultdict(list)
        for row in sends:
            message_id, member_id, campaign_id, _, template, channel, kind = row[1:8]
            attempts, overrides, locale = row[9], row[10], row[19]
            key = (template, channel, locale)
            if key not in chosen:
                chosen[key] = templates.choose(
                    variants.get(template, []), channel, locale, config.default_locale
                )
            variant = chosen[key]
            if variant is None:
                done.add(
                    message_id,
                    "failed",
                    channel,
                    attempts - 1,
                    reason=policy.Reason.TEMPLATE_MISSING.value,
                    error=f"no variant of template {template!r} for {channel}",
                )
                continue
            compiled = templates.compiled(variant)
            try:
                subject, body = compiled.render(_context(compiled.roots, row, coupons))
            except Exception as exc:  # any template error: the message cannot be built
                done.add(
                    message_id,
                    "failed",
                    channel,
                    attempts - 1,
                    reason=policy.Reason.RENDER_ERROR.value,
                    error=f"{type(exc).__name__}: {exc}",
                )
                continue
            outgoing = Outgoing(
                message_id=message_id,
                channel=channel,
                to=row[11] or "",
                subject=subject,
                body=body,
                member_id=member_id,
                member_external_id=row[12],
                campaign_id=campaign_id,
                template=template,
                locale=variant.locale,
                kind=kind,
                payload=row[8] if isinstance(row[8], dict) else {},
            )
            attempts_of[message_id] = attempts
            if channel in rt.external:
                external[channel].append(outgoing)
            else:
                in_tx[channel].append((outgoing, overrides))
        # Channels that complete inside this transaction (log, no-op, call-centre tasks):
        # their effect and the recorded outcome commit together.
        now = datetime.now(UTC)
        for channel, pending in in_tx.items():
            outcomes = rt.channels[channel].send_many([p[0] for p in pending], session=session)
            for (_, overrides), outcome in zip(pending, outcomes, strict=True):
                attempts = attempts_of[outcome.message_id]
                _add_outcome(rt, done, outcome, channel, attempts, now, overrides)
        if done:
            _run(session.connection(), _APPLY, done.params())
        for status, count in done.counts().items():
            counts[status] += count

    for channel, items in external.items():
        for status, count in _send_external(rt, channel, items, attempts_of).items():
            counts[status] += count
    return dict(counts)


def _send_external(
    rt: Runtime, channel: str, items: list[Outgoing], attempts_of: dict[int, int]
) -> dict[str, int]:
    """Send outside any transaction; record outcomes as they arrive, in groups.

    Whatever answers arrived while the previous group was being written goes into the
    next UPDATE (group commit): one statement per group however fast the provider is,
    and a killed worker leaves unrecorded (sent, then resent after the lease with the
    same idempotency key) only the sends in flight plus one group.
    """
    counts: dict[str, int] = defaultdict(int)
    settings = rt.config.channels[channel]
    sender = rt.channels[channel]
    pending = list(items)
    while pending:
        take = len(pending)
        if settings.rate > 0 and rt.limiter is not None:
            take = rt.limiter.acquire(channel, settings.rate, len(pending))
            if take == 0:
                continue
        batch, pending = pending[:take], pending[take:]
        for arrived in sender.send_groups(batch):
            out = _Outcomes()
            now = datetime.now(UTC)
            for outcome in arrived:
                _add_outcome(rt, out, outcome, channel, attempts_of[outcome.message_id], now)
            _record(rt, channel, out)
            for status, count in out.counts().items():
                counts[status] += count
    return counts


def _record(rt: Runtime, channel: str, out: _Outcomes) -> None:
    with rt.engine.begin() as conn:
        recorded = _run(conn, _RECORD, out.params()).rowcount
    if recorded != len(out):
        log.warning(
            "%d outcomes on %s arrived after their lease was taken over",
            len(out) - recorded,
            channel,
        )


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
