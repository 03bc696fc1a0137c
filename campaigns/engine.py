"""The decision engine: who gets what, for one member in a request or for millions in SQL.

Both paths apply the same checks in the same order, each enforced where a race could
break it:

1. not in audience, 2. condition failed (with the rule explanation),
3. holdout (deterministic hash of campaign × member, the same in Python and SQL),
4. cap reached (a row in campaign_grants per cap bucket: the primary key is the cap),
5. lost to a higher-priority campaign (a row in exclusivity_claims per group bucket),
6. no consent (message-only campaigns without a consented channel),
7. budget exhausted (one conditional UPDATE of the campaign's counters),
then qualified: the decision, the coupon, the tier upgrade and the outbox message are
written in the caller's transaction.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    String,
    bindparam,
    case,
    cast,
    column,
    func,
    literal,
    literal_column,
    select,
    table,
    text,
)
from sqlalchemy import insert as insert_into
from sqlalchemy.dialects.postgresql import BIT
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from campaigns import codes
from campaigns.definition import EVENT_TRIGGERS
from campaigns.models import Campaign, Reason, Status
from rules import Rule, Scope, SqlContext, compile_py, compile_sql, parse_rule
from rules.compile_py import PythonPredicate
from rules.explain import summary as explanation_summary
from service.db import execute_prepared, execute_prepared_all
from service.models import Member
from service.vocabulary import (
    default_vocabulary,
    facts_of_row,
    load_member_facts,
    preparable_facts_select,
    reads_unpreparable_facts,
    unpreparable_facts,
)

log = logging.getLogger(__name__)

CONSENT_CHANNELS = ("email", "sms", "push", "wechat")
_members = Member.__table__


# --- holdout and period buckets: one definition each, in Python and in SQL -------------


def holdout_slot(campaign_id: int, member_id: int) -> int:
    """0..9999, stable per campaign × member (first 32 bits of sha256, mod 10,000)."""
    digest = hashlib.sha256(f"{campaign_id}:{member_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 10_000


def in_holdout(campaign_id: int, member_id: int, percent: Decimal) -> bool:
    return holdout_slot(campaign_id, member_id) < int(percent * 100)


def holdout_slot_sql(campaign_id: int, member_id: ColumnElement[Any]) -> ColumnElement[Any]:
    """`holdout_slot` in SQL, bit for bit (tested against the Python one with hypothesis)."""
    key = func.concat(str(campaign_id), ":", member_id)
    hexed = func.left(func.encode(func.sha256(func.convert_to(key, "UTF8")), "hex"), 8)
    return cast(cast(func.concat("x", hexed), BIT(32)), BigInteger) % 10_000


def bucket(period: str, zone: str | None, now: datetime, evaluation: str) -> str:
    """The cap / exclusivity bucket of `now` in the member's time zone."""
    if period == "evaluation":
        return evaluation
    if period == "lifetime":
        return "life"
    local = now.astimezone(ZoneInfo(zone or "UTC"))
    if period == "year":
        return f"{local:%Y}"
    if period == "month":
        return f"{local:%Y-%m}"
    if period == "week":
        iso = local.isocalendar()
        return f"{iso.year}-W{iso.week:02d}"
    return f"{local:%Y-%m-%d}"


_SQL_FORMATS = {"year": "YYYY", "month": "YYYY-MM", "week": 'IYYY-"W"IW', "day": "YYYY-MM-DD"}


def bucket_sql(
    period: str, zone: ColumnElement[Any], now: datetime, evaluation: str
) -> ColumnElement[Any]:
    """`bucket` in SQL for a column of member time zones."""
    if period == "evaluation":
        return literal(evaluation, String)
    if period == "lifetime":
        return literal("life", String)
    local = func.timezone(func.coalesce(zone, "UTC"), literal(now))
    return func.to_char(local, _SQL_FORMATS[period])


# --- compiled campaigns --------------------------------------------------------------


@dataclass(frozen=True)
class Compiled:
    """A campaign version ready to evaluate: rules compiled, references resolved."""

    id: int
    version: int
    name: str
    kind: str
    trigger: dict[str, Any]
    priority: int
    group: str | None
    group_period: str
    cap_period: str
    holdout: Decimal
    audience: dict[str, list[str]]
    condition: Rule | None
    predicate: PythonPredicate | None
    actions: dict[str, Any]
    valid_from: datetime | None
    valid_until: datetime | None
    has_budget: bool
    face_value: Decimal
    measure_days: int
    # The coupon template (campaigns.coupons.Template) when the campaign issues coupons.
    template: Any = None
    # The condition reads facts no prepared statement may read (service.vocabulary).
    reads_unpreparable: bool = False

    def live_at(self, now: datetime) -> bool:
        return (self.valid_from is None or self.valid_from <= now) and (
            self.valid_until is None or now < self.valid_until
        )

    @property
    def message_only(self) -> bool:
        return set(self.actions) == {"message"}

    @property
    def rule_hash(self) -> str | None:
        """The condition's content hash, which decisions record (None without a condition)."""
        return self.condition.hash if self.condition is not None else None


def condition_scope(definition: Mapping[str, Any]) -> Scope:
    """Purchase-triggered conditions may read the purchase (event fields)."""
    trigger = definition["trigger"]["type"]
    return Scope.EVENT if trigger in ("purchase", "tier_change") else Scope.MEMBER


def parse_condition(definition: Mapping[str, Any]) -> Rule | None:
    source = definition.get("condition")
    if source in (None, "", {}):
        return None
    return parse_rule(source, default_vocabulary(), condition_scope(definition))


def audience_rule(audience: Mapping[str, list[str]]) -> Rule | None:
    """The audience as a rule over the member fields (segment, home store, region)."""
    leaves = [
        {"field": field_name, "op": "in", "value": list(values)}
        for key, field_name in (
            ("segments", "segment"),
            ("stores", "home_store"),
            ("regions", "region"),
        )
        if (values := audience.get(key))
    ]
    if not leaves:
        return None
    return parse_rule({"all": leaves}, default_vocabulary(), Scope.MEMBER)


def compile_campaign(row: Campaign, face_value: Decimal, template: Any = None) -> Compiled:
    d = row.definition
    rule = parse_condition(d)
    return Compiled(
        id=row.id,
        version=row.version,
        name=row.name,
        kind=row.kind,
        trigger=d["trigger"],
        priority=row.priority,
        group=row.exclusivity_group,
        group_period=d.get("exclusivity_period", "day"),
        cap_period=d.get("cap", {}).get("per", "evaluation"),
        holdout=Decimal(d.get("holdout_percent", "0")),
        audience={k: list(v) for k, v in (d.get("audience") or {}).items() if v},
        condition=rule,
        predicate=compile_py(rule, default_vocabulary()) if rule is not None else None,
        actions=d["actions"],
        valid_from=row.valid_from,
        valid_until=row.valid_until,
        has_budget=row.budget_coupons is not None or row.budget_value is not None,
        face_value=face_value,
        measure_days=int(d.get("measure_days", 30)),
        template=template,
        reads_unpreparable=rule is not None
        and reads_unpreparable_facts(default_vocabulary(), rule.fields),
    )


def face_value_of(session: Session, actions: Mapping[str, Any]) -> Decimal:
    """What one qualified decision costs against a value budget (the coupon's face value)."""
    coupon = actions.get("coupon")
    if not coupon:
        return Decimal(0)
    from campaigns.coupons import get_template

    template = get_template(session, coupon["template"])
    if template is None:
        raise LookupError(f"coupon template {coupon['template']!r} does not exist")
    return Decimal(template.face_value)


def compile_with_template(session: Session, row: Campaign) -> Compiled:
    """`compile_campaign` with the coupon template looked up (both paths use it)."""
    coupon = row.definition["actions"].get("coupon")
    template = None
    if coupon:
        from campaigns.coupons import get_template

        template = get_template(session, coupon["template"])
    face = Decimal(template.face_value) if template is not None else Decimal(0)
    return compile_campaign(row, face, template)


# The change counter and the transaction that wrote it: a rolled-back change can make
# the counter repeat, never the pair.
_GENERATION = text("SELECT generation || ':' || xmin::text FROM campaign_state")


def bump_generation(session: Session) -> None:
    """Tell every process that the set of campaigns changed (called on every change)."""
    session.execute(text("UPDATE campaign_state SET generation = generation + 1"))


class _Cache:
    """Active event-triggered campaigns, compiled once per generation per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation: str | None = None
        self._campaigns: tuple[Compiled, ...] = ()

    def get(self, session: Session, generation: str | None = None) -> tuple[Compiled, ...]:
        """The active campaigns; `generation` when the caller has just read it."""
        if generation is None:
            generation = session.execute(_GENERATION).scalar_one()
        if generation == self._generation:
            return self._campaigns
        rows = session.scalars(
            select(Campaign)
            .where(
                Campaign.status == Status.ACTIVE.value,
                Campaign.trigger_type.in_(sorted(EVENT_TRIGGERS | {"segment_entry"})),
            )
            .order_by(Campaign.priority.desc(), Campaign.id)
        ).all()
        compiled = tuple(compile_with_template(session, r) for r in rows)
        with self._lock:
            self._generation, self._campaigns = generation, compiled
        return compiled

    @property
    def generation(self) -> str | None:
        return self._generation

    @property
    def last_seen(self) -> tuple[Compiled, ...]:
        """The campaigns of the last generation read (maybe stale: no statement)."""
        return self._campaigns

    def clear(self) -> None:
        with self._lock:
            self._generation, self._campaigns = None, ()


ACTIVE = _Cache()


@functools.cache
def _facts_statement() -> Any:
    # One prepared round trip for the member's facts and the campaign-cache check: as text,
    # PostgreSQL spent ~0.6 ms planning the facts joins on every purchase. It leaves out the
    # tables a swap replaces (no prepared statement may read them; see segments.predict).
    generation = literal_column(
        "(SELECT generation || ':' || xmin::text FROM campaign_state)", String
    ).label("campaign_generation")
    return (
        preparable_facts_select()
        .add_columns(generation)
        .where(_members.c.id == bindparam("member_id", type_=BigInteger))
    )


def member_facts_and_campaigns(
    session: Session, member_id: int
) -> tuple[dict[str, Any] | None, tuple[Compiled, ...]]:
    """The member's facts and the active campaigns, in one prepared statement.

    Facts a campaign's condition reads from a table no prepared statement may read are
    added by a plain statement, only when a live campaign needs them.
    """
    row = execute_prepared(session, _facts_statement(), {"member_id": member_id})
    if row is None:
        return None, ACTIVE.get(session)
    found = dict(row._mapping)
    campaigns = ACTIVE.get(session, found.pop("campaign_generation"))
    facts = facts_of_row(found)
    if any(c.reads_unpreparable for c in campaigns):
        facts.update(unpreparable_facts(session, member_id))
    return facts, campaigns


# --- one member, inside a request ------------------------------------------------------


@dataclass
class Outcome:
    campaign: Compiled
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rewards:
    """What the member just received, for the till's receipt."""

    coupons: list[dict[str, Any]] = field(default_factory=list)
    tier_change: dict[str, Any] | None = None
    offers: list[dict[str, Any]] = field(default_factory=list)

    def merge(self, other: Rewards) -> None:
        self.coupons += other.coupons
        self.offers += other.offers
        if other.tier_change is not None:
            self.tier_change = other.tier_change


def _in_audience(c: Compiled, facts: Mapping[str, Any]) -> tuple[bool, dict[str, Any]]:
    if not c.audience:
        return True, {}
    checks = (
        ("segments", set(facts.get("segments") or ())),
        ("stores", {facts.get("home_store")}),
        ("regions", {facts.get("region")}),
    )
    for key, have in checks:
        wanted = c.audience.get(key)
        if wanted and not have & set(wanted):
            return False, {
                "audience": key,
                "wanted": wanted,
                "actual": sorted(x for x in have if x),
            }
    return True, {}


def consented_channel(actions: Mapping[str, Any], facts: Mapping[str, Any]) -> str | None:
    """The channel a message can go out on, or None (fallback order: the configured one first)."""
    message = actions.get("message") or {}
    preferred = message.get("channel")
    if preferred and preferred not in CONSENT_CHANNELS:
        return preferred  # webhooks, call-centre tasks and the log need no member consent
    order = ([preferred] if preferred else []) + [c for c in CONSENT_CHANNELS if c != preferred]
    for channel in order:
        if facts.get(f"consent.{channel}"):
            return channel
    return None


_GRANT = text(
    "INSERT INTO campaign_grants (campaign_id, member_id, bucket, granted_at) "
    "VALUES (:c, :m, :b, :now) ON CONFLICT DO NOTHING RETURNING 1"
)
_CLAIM = text(
    "INSERT INTO exclusivity_claims (group_name, member_id, bucket, campaign_id, priority, "
    "claimed_at) VALUES (:g, :m, :b, :c, :p, :now) ON CONFLICT DO NOTHING RETURNING 1"
)
_CLAIMED_BY = text(
    "SELECT c.name FROM exclusivity_claims x JOIN campaigns c ON c.id = x.campaign_id "
    "WHERE x.group_name = :g AND x.member_id = :m AND x.bucket = :b"
)
_UNGRANT = text(
    "DELETE FROM campaign_grants WHERE campaign_id = :c AND member_id = :m AND bucket = :b"
)
_UNCLAIM = text(
    "DELETE FROM exclusivity_claims WHERE group_name = :g AND member_id = :m AND bucket = :b"
)
_SPEND_BUDGET = text(
    """
    UPDATE campaigns SET issued_coupons = issued_coupons + :n, issued_value = issued_value + :v
    WHERE id = :c
      AND (budget_coupons IS NULL OR issued_coupons + :n <= budget_coupons)
      AND (budget_value IS NULL OR issued_value + :v <= budget_value)
    RETURNING 1
    """
)


def _undo(
    session: Session, c: Compiled, member_id: int, cap: str | None, group: str | None
) -> None:
    # Compensation inside the same transaction: these rows were inserted by it a moment ago.
    if cap is not None:
        execute_prepared(session, _UNGRANT, {"c": c.id, "m": member_id, "b": cap})
    if group is not None:
        execute_prepared(session, _UNCLAIM, {"g": c.group, "m": member_id, "b": group})


def _reserve(
    session: Session,
    c: Compiled,
    member_id: int,
    zone: str | None,
    now: datetime,
    period: str,
    claimed: dict[tuple[str, str], str],
) -> tuple[str | None, dict[str, Any]]:
    """Cap, exclusivity and budget, each one conditional statement (none for a campaign
    without cap, group or budget); a later refusal deletes what the earlier ones wrote.

    `claimed` holds the group buckets this evaluation already won (group, bucket → the
    winner's name): a claim there would conflict with our own row, so it is not sent."""
    cap_bucket: str | None = None
    if c.cap_period != "evaluation":
        # Without a cap the decision's own unique key (campaign × member × evaluation)
        # is the only limit, so no grant row is needed.
        cap_bucket = bucket(c.cap_period, zone, now, period)
        params = {"c": c.id, "m": member_id, "b": cap_bucket, "now": now}
        if execute_prepared(session, _GRANT, params) is None:
            return Reason.CAP_REACHED.value, {"cap": c.cap_period, "bucket": cap_bucket}
    group_bucket: str | None = None
    if c.group is not None:
        group_bucket = bucket(c.group_period, zone, now, period)
        winner_here = claimed.get((c.group, group_bucket))
        if winner_here is not None:
            # What the claim and the winner's lookup would answer, without the round trips.
            _undo(session, c, member_id, cap_bucket, None)
            return Reason.LOST_TO_HIGHER_PRIORITY.value, {
                "group": c.group,
                "bucket": group_bucket,
                "won_by": winner_here,
            }
        params = {"g": c.group, "m": member_id, "b": group_bucket}
        claim = {**params, "c": c.id, "p": c.priority, "now": now}
        if execute_prepared(session, _CLAIM, claim) is None:
            winner = execute_prepared(session, _CLAIMED_BY, params)
            _undo(session, c, member_id, cap_bucket, None)
            return Reason.LOST_TO_HIGHER_PRIORITY.value, {
                "group": c.group,
                "bucket": group_bucket,
                "won_by": winner.name if winner is not None else None,
            }
    if c.has_budget:
        coupons = 1 if "coupon" in c.actions else 0
        spend = {"c": c.id, "n": coupons, "v": c.face_value if coupons else 0}
        if execute_prepared(session, _SPEND_BUDGET, spend) is None:
            _undo(session, c, member_id, cap_bucket, group_bucket)
            return Reason.BUDGET_EXHAUSTED.value, {}
    if c.group is not None and group_bucket is not None:
        claimed[(c.group, group_bucket)] = c.name
    return None, {}


def evaluate_member(
    session: Session,
    member_id: int,
    *,
    trigger: str,
    now: datetime,
    period: str,
    event: Mapping[str, Any] | None = None,
    transaction_id: int | None = None,
    matches: Any = None,
    active: tuple[Compiled, ...] | None = None,
    facts: dict[str, Any] | None = None,
) -> Rewards:
    """Evaluate the active campaigns with this trigger for one member; write the decisions.

    `period` names the evaluation (``txn:<id>``, ``signup``, ...); `matches`, when given,
    filters campaigns further (e.g. the tier reached, the segments entered).
    """
    rewards = Rewards()
    campaigns = [
        c
        for c in (active if active is not None else ACTIVE.get(session))
        if c.trigger["type"] == trigger and c.live_at(now) and (matches is None or matches(c))
    ]
    if not campaigns:
        return rewards
    if facts is None:
        facts = load_member_facts(session, [member_id]).get(member_id)
        if facts is None:
            return rewards
    zone = facts.get("timezone")
    vocab = default_vocabulary()
    outcomes: list[Outcome] = []
    claimed: dict[tuple[str, str], str] = {}
    for c in campaigns:  # already in priority order: higher priority claims first
        ok, detail = _in_audience(c, facts)
        if not ok:
            outcomes.append(Outcome(c, Reason.NOT_IN_AUDIENCE.value, detail))
            continue
        failed = c.predicate is not None and not c.predicate(facts, event, now=now)
        if failed and c.condition is not None:
            why = explanation_summary(c.condition, vocab, facts, event, now=now)
            outcomes.append(Outcome(c, Reason.CONDITION_FAILED.value, {"explanation": why}))
            continue
        if c.holdout and in_holdout(c.id, member_id, c.holdout):
            outcomes.append(Outcome(c, Reason.HOLDOUT.value, {"holdout_percent": str(c.holdout)}))
            continue
        if c.template is not None:
            from campaigns.coupons import issuable

            unavailable = issuable(c.template, now)
            if unavailable is not None:
                outcomes.append(Outcome(c, Reason.OFFER_UNAVAILABLE.value, {"coupon": unavailable}))
                continue
        channel = consented_channel(c.actions, facts) if "message" in c.actions else None
        if c.message_only and channel is None:
            outcomes.append(
                Outcome(c, Reason.NO_CONSENT.value, {"channels": list(CONSENT_CHANNELS)})
            )
            continue
        reason, detail = _reserve(session, c, member_id, zone, now, period, claimed)
        if reason is None:
            detail = {"channel": channel} if channel else {}
        outcomes.append(Outcome(c, reason, detail))
    _write(session, member_id, outcomes, trigger, period, now, transaction_id, rewards)
    return rewards


# Every outcome of one evaluation, and the coupons and outbox messages of the qualified
# ones, in one prepared statement (one plan for any count): decisions → coupons →
# messages chained by data-modifying CTEs. A decision already recorded (the unique key per
# evaluation) gets no coupon and no message. Returns the qualified decisions just written,
# with their coupon when one was issued.
#
# Each set of rows comes as one JSON array (see `_write`), parsed once as jsonb: the
# details (explanations) are taken from it as they are. Arrays per column cost more CPU
# on both sides (psycopg2 adapts each element, PostgreSQL parses an ARRAY[...] expression
# per column and each detail again), and so does `json`, which is parsed to validate it,
# again to split it into rows and a third time for each jsonb detail.
_WRITE = text(
    """
    WITH d AS (
        INSERT INTO decisions (campaign_id, campaign_version, member_id, period, trigger,
                               outcome, reason, rule_hash, detail, transaction_id, decided_at)
        SELECT x.c, x.v, :member_id, :period, :trigger,
               CASE WHEN x.r IS NULL THEN 'qualified' ELSE 'suppressed' END, x.r, x.h, x.d,
               :transaction_id, :now
        FROM jsonb_to_recordset(CAST(:decisions AS jsonb))
             AS x(c bigint, v integer, r text, h text, d jsonb)
        ON CONFLICT ON CONSTRAINT uq_decisions_evaluation DO NOTHING
        RETURNING campaign_id, id, outcome
    ), k AS (
        INSERT INTO coupons (code, template_id, member_id, campaign_id, decision_id,
                             face_value, valid_from, valid_until, issued_at)
        SELECT y.code, y.t, :member_id, y.c, d.id, y.f, y.vf, y.vu, :now
        FROM jsonb_to_recordset(CAST(:coupons AS jsonb))
             AS y(code text, t bigint, c bigint, f numeric, vf timestamptz, vu timestamptz)
        JOIN d ON d.campaign_id = y.c
        ON CONFLICT DO NOTHING
        RETURNING id, decision_id, code, face_value, valid_from, valid_until
    ), o AS (
        INSERT INTO outbox_messages (member_id, campaign_id, decision_id, coupon_id, template,
                                     channel, kind, not_after)
        SELECT :member_id, z.c, d.id, k.id, z.t, z.ch, z.kind, k.valid_until
        FROM jsonb_to_recordset(CAST(:messages AS jsonb))
             AS z(c bigint, t text, ch text, kind text)
        JOIN d ON d.campaign_id = z.c
        LEFT JOIN k ON k.decision_id = d.id
        ON CONFLICT (decision_id, template) DO NOTHING
    )
    SELECT d.campaign_id, d.id, k.id AS coupon_id, k.code, k.face_value, k.valid_from,
           k.valid_until
    FROM d LEFT JOIN k ON k.decision_id = d.id
    WHERE d.outcome = 'qualified'
    """
)
# A coupon code taken already (about 1 in 2**74) left its message without the coupon.
_ATTACH_COUPON = text(
    "UPDATE outbox_messages SET coupon_id = :coupon_id, not_after = :not_after "
    "WHERE decision_id = :decision_id AND template = :template"
)


def _write(
    session: Session,
    member_id: int,
    outcomes: list[Outcome],
    trigger: str,
    period: str,
    now: datetime,
    transaction_id: int | None,
    rewards: Rewards,
) -> None:
    """Decisions, coupons and messages in one statement; then tiers and the rewards."""
    from campaigns.coupons import validity

    won = [o for o in outcomes if o.reason is None]
    coupons: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    for o in won:
        c = o.campaign
        if "coupon" in c.actions:
            valid_from, valid_until = validity(c.template, now)
            coupons.append(
                {
                    "code": codes.new_code(),
                    "t": c.template.id,
                    "c": c.id,
                    "f": str(c.template.face_value),
                    "vf": valid_from.isoformat(),
                    "vu": valid_until.isoformat(),
                }
            )
        message = c.actions.get("message")
        if message:
            channel = o.detail.get("channel") or message.get("channel")
            kind = message.get("kind", "marketing")
            messages.append({"c": c.id, "t": message["template"], "ch": channel, "kind": kind})
    decisions = [
        {
            "c": o.campaign.id,
            "v": o.campaign.version,
            "r": o.reason,
            "h": o.campaign.rule_hash,
            "d": o.detail or None,
        }
        for o in outcomes
    ]
    params = {
        "member_id": member_id,
        "period": period,
        "trigger": trigger,
        "transaction_id": transaction_id,
        "now": now,
        "decisions": json.dumps(decisions, default=str),
        "coupons": json.dumps(coupons),
        "messages": json.dumps(messages),
    }
    rows = execute_prepared_all(session, _WRITE, params)
    written = {int(r.campaign_id): r for r in rows}
    for o in won:  # in priority order, as evaluated
        c = o.campaign
        row = written.get(c.id)
        if row is None:
            continue  # this evaluation was decided before: nothing more to give
        if "coupon" in c.actions:
            if row.coupon_id is not None:
                shape = _coupon_shape(row, c.template)
            else:  # a code collision: the one-by-one path draws again
                found, shape = _issue(session, c, member_id, int(row.id), now)
                if "message" in c.actions:
                    session.execute(
                        _ATTACH_COUPON,
                        {
                            "coupon_id": found,
                            "not_after": _expiry(shape),
                            "decision_id": int(row.id),
                            "template": c.actions["message"]["template"],
                        },
                    )
            rewards.coupons.append(shape | {"campaign": c.name})
        if "tier" in c.actions:
            from campaigns.tiers import upgrade_tier

            change = upgrade_tier(
                session,
                member_id,
                c.actions["tier"]["to"],
                reason="campaign",
                actor=f"campaign:{c.name}",
                campaign_id=c.id,
            )
            if change is not None:
                rewards.tier_change = change
        rewards.offers.append({"campaign": c.name, "kind": c.kind})


def _coupon_shape(row: Any, template: Any) -> dict[str, Any]:
    """What the till is told of a coupon just issued (from a row with its code, face value
    and validity)."""
    from campaigns.coupons import coupon_dict

    return coupon_dict(
        row.code,
        template,
        face_value=row.face_value,
        valid_from=row.valid_from,
        valid_until=row.valid_until,
    )


def _issue(
    session: Session, c: Compiled, member_id: int, decision_id: int, now: datetime
) -> tuple[int | None, dict[str, Any]]:
    """Issue the campaign's coupon with the template compiled in (one INSERT)."""
    from campaigns import codes
    from campaigns.coupons import ISSUE_STATEMENT, issue_coupon, validity

    valid_from, valid_until = validity(c.template, now)
    params = {
        "code": codes.new_code(),
        "template_id": c.template.id,
        "member_id": member_id,
        "campaign_id": c.id,
        "decision_id": decision_id,
        "face_value": c.template.face_value,
        "valid_from": valid_from,
        "valid_until": valid_until,
        "issued_at": now,
    }
    row = execute_prepared(session, ISSUE_STATEMENT, params)
    if row is not None:
        return int(row.id), _coupon_shape(row, c.template)
    # A code collision (about 1 in 2**74): the general path draws again.
    shape = issue_coupon(
        session,
        template_code=c.template.code,
        member_id=member_id,
        campaign_id=c.id,
        decision_id=decision_id,
        issued_at=now,
    )
    found = session.execute(
        text("SELECT id FROM coupons WHERE decision_id = :d"), {"d": decision_id}
    ).scalar()
    return found, shape


def _expiry(coupon: Mapping[str, Any] | None) -> datetime | None:
    if coupon is None or coupon.get("valid_until") is None:
        return None
    value = coupon["valid_until"]
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


# --- millions of members, set-based -----------------------------------------------------


def _predicate_sql(rule: Rule | None, ctx: SqlContext) -> ColumnElement[bool] | None:
    if rule is None:
        return None
    return compile_sql(rule, default_vocabulary(), ctx.now_value, ctx).expr


def candidates(
    c: Compiled,
    now: datetime,
    period: str,
    *,
    members: Select[Any] | None = None,
) -> Select[Any]:
    """SELECT member_id, cond_ok, in_holdout, cap_bucket, group_bucket, channel, reason.

    Every audience member (optionally restricted to `members`, a Select of ids) with the
    reason the set-based checks give: condition, holdout, an existing grant (cap), a
    claim of the group by another campaign, consent. Budget is applied afterwards.
    """
    vocab = default_vocabulary()
    ctx = SqlContext(now)
    audience = audience_rule(c.audience)
    audience_where = compile_sql(audience, vocab, now, ctx).where if audience is not None else None
    if c.condition is not None and c.condition.scope is not Scope.MEMBER:
        raise ValueError("event conditions are evaluated per purchase, not in batch")
    cond = _predicate_sql(c.condition, ctx)
    source = vocab.source(Scope.MEMBER)
    assert source is not None
    m = _members.c
    cap_bucket = bucket_sql(c.cap_period, m.timezone, now, period)
    group_bucket = (
        bucket_sql(c.group_period, m.timezone, now, period) if c.group else literal(None, String)
    )
    holdout = holdout_slot_sql(c.id, m.id) < int(c.holdout * 100) if c.holdout else literal(False)
    from campaigns.models import CampaignGrant, ExclusivityClaim

    g = CampaignGrant.__table__.c
    x = ExclusivityClaim.__table__.c
    has_grant = (
        select(literal(1))
        .where(g.campaign_id == c.id, g.member_id == m.id, g.bucket == cap_bucket)
        .exists()
    )
    claimed = (
        select(literal(1))
        .where(
            x.group_name == c.group,
            x.member_id == m.id,
            x.bucket == group_bucket,
            x.campaign_id != c.id,
        )
        .exists()
        if c.group
        else literal(False)
    )
    channel = _channel_sql(c)
    whens: list[tuple[ColumnElement[bool], str]] = []
    if cond is not None:
        whens.append((~cond, Reason.CONDITION_FAILED.value))
    whens += [(holdout, Reason.HOLDOUT.value), (has_grant, Reason.CAP_REACHED.value)]
    if c.group:
        whens.append((claimed, Reason.LOST_TO_HIGHER_PRIORITY.value))
    if c.message_only:
        whens.append((channel.is_(None), Reason.NO_CONSENT.value))
    reason = case(*whens, else_=literal(None, String))
    stmt = select(
        m.id.label("member_id"),
        cap_bucket.label("cap_bucket"),
        group_bucket.label("group_bucket"),
        channel.label("channel"),
        reason.label("reason"),
    ).select_from(_with_outer_joins(source.from_clause(ctx.joins), ctx))
    scope_filter = source.where()
    if scope_filter is not None:
        stmt = stmt.where(scope_filter)
    if audience_where is not None:
        stmt = stmt.where(audience_where)
    if members is not None:
        stmt = stmt.where(m.id.in_(members))
    return stmt


def _with_outer_joins(source: Any, ctx: SqlContext) -> Any:
    # Tables the rules asked the context to LEFT JOIN (e.g. today's date per time zone).
    for joined, onclause in ctx.outer_joins:
        source = source.outerjoin(joined, onclause)
    return source


def _channel_sql(c: Compiled) -> ColumnElement[Any]:
    message = c.actions.get("message")
    if not message:
        return literal(None, String)
    preferred = message.get("channel")
    if preferred and preferred not in CONSENT_CHANNELS:
        return literal(preferred, String)
    order = ([preferred] if preferred else []) + [ch for ch in CONSENT_CHANNELS if ch != preferred]
    return case(
        *((_members.c[f"consent_{ch}"], literal(ch, String)) for ch in order),
        else_=literal(None, String),
    )


_BATCH_TEMP = "campaign_batch"
_CANDIDATE_COLUMNS = ("member_id", "cap_bucket", "group_bucket", "channel", "reason")


def run_batch(
    session: Session,
    c: Compiled,
    *,
    now: datetime,
    period: str,
    trigger: str,
    members: Select[Any] | None = None,
) -> dict[str, int]:
    """Evaluate a campaign over its audience and write everything set-based.

    One temporary table of candidates, then one statement each for grants, claims,
    the budget and the writes (decisions → coupons → outbox → tiers chained by CTEs).
    The campaign row is locked only for the budget step and the writes, so an event
    trigger competing for the last coupons waits for the batch and then finds the
    counters already spent: the budget holds exactly.
    """
    session.execute(text(f"DROP TABLE IF EXISTS {_BATCH_TEMP}"))
    session.execute(
        text(
            f"CREATE TEMP TABLE {_BATCH_TEMP} (member_id bigint PRIMARY KEY, cap_bucket text, "
            "group_bucket text, channel text, reason text, decision_id bigint, coupon_id bigint) "
            "ON COMMIT DROP"
        )
    )
    cand = candidates(c, now, period, members=members)
    target = table(_BATCH_TEMP, *(column(n) for n in _CANDIDATE_COLUMNS))
    session.execute(insert_into(target).from_select(list(_CANDIDATE_COLUMNS), cand))
    params: dict[str, Any] = {"cid": c.id, "now": now, "prio": c.priority, "grp": c.group}
    if c.template is not None:
        from campaigns.coupons import issuable

        if issuable(c.template, now) is not None:
            # Archived or expired after activation: as on the event path, nobody qualifies.
            session.execute(
                text(f"UPDATE {_BATCH_TEMP} SET reason = 'offer_unavailable' WHERE reason IS NULL")  # noqa: S608
            )
    fast_keys = _skip_row_key_checks(session, c)
    if c.cap_period != "evaluation":
        # Cap: a grant per eligible member; a conflict means the cap was reached meanwhile.
        # (Without a cap the decisions' unique key per run is the limit: no grants.)
        _grant_batch(session, params)
    if c.group:
        session.execute(
            text(
                f"""
                WITH x AS (
                    INSERT INTO exclusivity_claims (group_name, member_id, bucket, campaign_id,
                                                    priority, claimed_at)
                    SELECT :grp, member_id, group_bucket, :cid, :prio, :now
                    FROM {_BATCH_TEMP} WHERE reason IS NULL
                    ON CONFLICT DO NOTHING RETURNING member_id
                ), lost AS (
                    UPDATE {_BATCH_TEMP} t SET reason = 'lost_to_higher_priority'
                    WHERE t.reason IS NULL
                      AND NOT EXISTS (SELECT 1 FROM x WHERE x.member_id = t.member_id)
                    RETURNING t.member_id, t.cap_bucket
                )
                DELETE FROM campaign_grants g USING lost
                WHERE g.campaign_id = :cid AND g.member_id = lost.member_id
                  AND g.bucket = lost.cap_bucket
                """  # noqa: S608
            ),
            params,
        )
    eligible = session.execute(
        text(f"SELECT count(*) FROM {_BATCH_TEMP} WHERE reason IS NULL")  # noqa: S608
    ).scalar_one()
    coupons = "coupon" in c.actions
    row = session.execute(
        text(
            "SELECT budget_coupons, budget_value, issued_coupons, issued_value "
            "FROM campaigns WHERE id = :cid FOR UPDATE"
        ),
        params,
    ).one()
    allowed = eligible
    if coupons and row.budget_coupons is not None:
        allowed = min(allowed, row.budget_coupons - row.issued_coupons)
    if coupons and row.budget_value is not None and c.face_value > 0:
        allowed = min(allowed, int((row.budget_value - row.issued_value) // c.face_value))
    allowed = max(allowed, 0)
    if allowed < eligible:
        # Members beyond the budget, in a stable order, lose their grant and claim.
        session.execute(
            text(
                f"""
                WITH over AS (
                    SELECT member_id, cap_bucket, group_bucket FROM {_BATCH_TEMP}
                    WHERE reason IS NULL ORDER BY member_id OFFSET :allowed
                ), marked AS (
                    UPDATE {_BATCH_TEMP} t SET reason = 'budget_exhausted'
                    FROM over WHERE t.member_id = over.member_id RETURNING t.member_id
                ), ungrant AS (
                    DELETE FROM campaign_grants g USING over
                    WHERE g.campaign_id = :cid AND g.member_id = over.member_id
                      AND g.bucket = over.cap_bucket
                )
                DELETE FROM exclusivity_claims x USING over
                WHERE x.campaign_id = :cid AND x.group_name = :grp
                  AND x.member_id = over.member_id AND x.bucket = over.group_bucket
                """  # noqa: S608
            ),
            {**params, "allowed": allowed},
        )
    counts = _write_batch(session, c, now=now, period=period, trigger=trigger)
    if coupons and c.has_budget:
        session.execute(
            _SPEND_BUDGET,
            {"c": c.id, "n": counts["coupons"], "v": c.face_value * counts["coupons"]},
        )
    if "tier" in c.actions:
        from campaigns.tiers import upgrade_tier_sql

        batch = table(_BATCH_TEMP, column("member_id"), column("decision_id"))
        qualified = select(batch.c.member_id).where(batch.c.decision_id.is_not(None))
        counts["tier_upgrades"] = upgrade_tier_sql(
            session, qualified, c.actions["tier"]["to"], c.id, now
        )
    if fast_keys:
        session.execute(text("SET LOCAL session_replication_role = origin"))
    counts["eligible"] = int(eligible)
    counts["budget_allowed"] = int(allowed)
    return counts


_GRANT_BATCH = text(
    f"""
    WITH g AS (
        INSERT INTO campaign_grants (campaign_id, member_id, bucket, granted_at)
        SELECT :cid, member_id, cap_bucket, :now FROM {_BATCH_TEMP} WHERE reason IS NULL
        ON CONFLICT DO NOTHING RETURNING member_id
    )
    UPDATE {_BATCH_TEMP} t SET reason = 'cap_reached'
    WHERE t.reason IS NULL AND NOT EXISTS (SELECT 1 FROM g WHERE g.member_id = t.member_id)
    """  # noqa: S608 - fixed temp table name
)


def _grant_batch(session: Session, params: dict[str, Any]) -> None:
    session.execute(_GRANT_BATCH, params)


# Tables a batch run writes: replica mode would also silence triggers of their own.
_BATCH_TABLES = ("decisions", "coupons", "outbox_messages", "campaign_grants", "exclusivity_claims")


def _skip_row_key_checks(session: Session, c: Compiled) -> bool:
    """Let the run skip PostgreSQL's per-row foreign-key triggers, when that is safe.

    Every row the run writes references the campaign (locked FOR UPDATE by the run),
    the coupon template (locked here FOR KEY SHARE) and members read from the members
    table in this transaction (members are never deleted: erasure keeps the row). The
    RI triggers would look each of those up again per row and lock every member row,
    which costs about as much as the writes themselves. Skipping them needs
    session_replication_role (superuser or GRANT SET ON PARAMETER); without it, or when
    the tables carry triggers of their own, the checks stay on.
    """
    own = session.execute(
        text(
            "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal "
            "AND tgrelid = ANY(CAST(:t AS regclass[]))"
        ),
        {"t": list(_BATCH_TABLES)},
    ).scalar_one()
    if own:
        return False
    try:
        with session.begin_nested():
            session.execute(text("SET LOCAL session_replication_role = replica"))
    except DBAPIError:
        return False
    if c.template is not None:
        session.execute(
            text("SELECT 1 FROM coupon_templates WHERE id = :t FOR KEY SHARE"),
            {"t": c.template.id},
        )
    return True


_CODES_TEMP = "campaign_codes"


def _load_codes(session: Session) -> None:
    """One fresh code per candidate still eligible, sorted, into a temp table by COPY.

    Drawn in Python with numpy (codes.bulk_codes): per row, the SQL function's two UUIDs,
    md5 and arithmetic cost about as much CPU as writing the coupon itself.
    """
    needed = session.execute(
        text(f"SELECT count(*) FROM {_BATCH_TEMP} WHERE reason IS NULL")  # noqa: S608
    ).scalar_one()
    session.execute(text(f"DROP TABLE IF EXISTS {_CODES_TEMP}"))
    session.execute(
        text(
            f"CREATE TEMP TABLE {_CODES_TEMP} (n bigint GENERATED ALWAYS AS IDENTITY,"
            " code text NOT NULL) ON COMMIT DROP"
        )
    )
    if not needed:
        return
    data = io.BytesIO(b"\n".join(codes.bulk_codes(int(needed)).tolist()) + b"\n")
    cursor = session.connection().connection.cursor()
    try:
        cursor.copy_expert(f"COPY {_CODES_TEMP} (code) FROM STDIN", data)
    finally:
        cursor.close()


def _write_batch(
    session: Session, c: Compiled, *, now: datetime, period: str, trigger: str
) -> dict[str, int]:
    """Decisions, then coupons and outbox rows for the qualified ones, in one statement."""
    parts = [
        f"""
        d AS (
            INSERT INTO decisions (campaign_id, campaign_version, member_id, period, trigger,
                                   outcome, reason, rule_hash, detail, decided_at)
            SELECT :cid, :ver, member_id, :period, :trigger,
                   CASE WHEN reason IS NULL THEN 'qualified' ELSE 'suppressed' END,
                   reason, :rule_hash,
                   NULL,  -- the channel chosen is on the outbox row; no per-row JSON here
                   :now
            FROM {_BATCH_TEMP}
            ON CONFLICT ON CONSTRAINT uq_decisions_evaluation DO NOTHING
            RETURNING id, member_id, outcome
        )"""  # noqa: S608
    ]
    params: dict[str, Any] = {
        "cid": c.id,
        "ver": c.version,
        "period": period,
        "trigger": trigger,
        "rule_hash": c.condition.hash if c.condition else None,
        "now": now,
    }
    if "coupon" in c.actions:
        from campaigns.coupons import validity

        template = c.template
        if template is None:
            raise LookupError(f"coupon template {c.actions['coupon']['template']!r} does not exist")
        valid_from, valid_until = validity(template, now)
        _load_codes(session)
        # The n-th qualified decision gets the n-th code; rows go in in code order (see
        # codes.bulk_codes). A code already taken (2^-74 per pair) is skipped by the unique
        # index and that decision goes without a coupon, as with patron_coupon_code().
        parts.append(
            f"""
        c AS (
            INSERT INTO coupons (code, template_id, member_id, campaign_id, decision_id,
                                 face_value, valid_from, valid_until, issued_at)
            SELECT k.code, :tid, q.member_id, :cid, q.id, :fv, :vf, :vu, :now
            FROM (SELECT id, member_id, row_number() OVER () AS n
                  FROM d WHERE d.outcome = 'qualified') AS q
            JOIN {_CODES_TEMP} k ON k.n = q.n
            ORDER BY k.n
            ON CONFLICT DO NOTHING
            RETURNING id, decision_id
        )"""  # noqa: S608 - fixed temp table name
        )
        params |= {"tid": template.id, "fv": c.face_value, "vf": valid_from, "vu": valid_until}
    else:
        parts.append("c AS (SELECT NULL::bigint AS id, NULL::bigint AS decision_id WHERE false)")
        valid_until = None
    message = c.actions.get("message")
    if message:
        parts.append(
            f"""
        o AS (
            INSERT INTO outbox_messages (member_id, campaign_id, decision_id, coupon_id, template,
                                         channel, kind, not_after)
            SELECT d.member_id, :cid, d.id, c.id, :tmpl, t.channel, :mkind, :not_after
            FROM d JOIN {_BATCH_TEMP} t ON t.member_id = d.member_id
            LEFT JOIN c ON c.decision_id = d.id
            WHERE d.outcome = 'qualified'
            ON CONFLICT DO NOTHING
            RETURNING 1
        )"""  # noqa: S608
        )
        params |= {
            "tmpl": message["template"],
            "mkind": message.get("kind", "marketing"),
            "not_after": valid_until,
        }
    else:
        parts.append("o AS (SELECT 1 WHERE false)")
    if "tier" in c.actions:
        # Only the tier step reads which members were decided qualified in this run.
        parts.append(
            f"""
        marked AS (
            UPDATE {_BATCH_TEMP} t SET decision_id = d.id, coupon_id = c.id
            FROM d LEFT JOIN c ON c.decision_id = d.id
            WHERE t.member_id = d.member_id AND d.outcome = 'qualified'
            RETURNING 1
        )"""  # noqa: S608
        )
    else:
        parts.append("marked AS (SELECT 1 WHERE false)")
    sql = (
        "WITH "  # noqa: S608 - fixed CTE text; values are bound parameters
        + ",".join(parts)
        + """
        SELECT (SELECT count(*) FROM d) AS decisions,
               (SELECT count(*) FROM d WHERE outcome = 'qualified') AS qualified,
               (SELECT count(*) FROM c) AS coupons,
               (SELECT count(*) FROM o) AS messages,
               (SELECT count(*) FROM marked) AS marked
        """
    )
    row = session.execute(text(sql), params).one()
    by_reason: dict[str, int] = dict(
        session.execute(
            text(
                f"SELECT coalesce(reason, 'qualified'), count(*) FROM {_BATCH_TEMP} "  # noqa: S608
                "GROUP BY 1"
            )
        ).all()
    )
    return {
        "decisions": row.decisions,
        "qualified": row.qualified,
        "coupons": row.coupons,
        "messages": row.messages,
        **{f"reason_{k}": v for k, v in by_reason.items() if k != "qualified"},
    }
