"""Before and after a campaign: preview (dry run), backtest, and the results report."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from campaigns.engine import (
    Compiled,
    audience_rule,
    bucket,
    candidates,
    compile_with_template,
    in_holdout,
)
from campaigns.models import Campaign
from rules import Scope, count_query, explain
from service.errors import NotFound, ValidationFailed
from service.models import Member
from service.vocabulary import default_vocabulary, event_facts, load_member_facts

# Two-sided 95% normal quantile, for the uplift confidence intervals.
Z95 = 1.959963984540054


def _campaign(session: Session, campaign_id: int) -> tuple[Campaign, Compiled]:
    row = session.get(Campaign, campaign_id)
    if row is None:
        raise NotFound(f"campaign {campaign_id} does not exist")
    return row, compile_with_template(session, row)


def _budget_left(row: Campaign) -> tuple[int | None, Decimal | None]:
    count = row.budget_coupons - row.issued_coupons if row.budget_coupons is not None else None
    value = row.budget_value - row.issued_value if row.budget_value is not None else None
    return count, value


def _affordable(row: Campaign, c: Compiled, wanted: int) -> int:
    if "coupon" not in c.actions:
        return wanted
    count, value = _budget_left(row)
    allowed = wanted
    if count is not None:
        allowed = min(allowed, count)
    if value is not None and c.face_value > 0:
        allowed = min(allowed, int(value // c.face_value))
    return max(allowed, 0)


def _sample(session: Session, c: Compiled, rows: list[Any], now: datetime) -> list[dict[str, Any]]:
    facts = load_member_facts(session, [r.member_id for r in rows])
    vocab = default_vocabulary()
    out = []
    for r in rows:
        f = facts.get(r.member_id, {})
        item: dict[str, Any] = {
            "member_id": f.get("external_id"),
            "outcome": "qualified" if r.reason is None else "suppressed",
            "reason": r.reason,
        }
        if c.condition is not None and c.condition.scope is Scope.MEMBER:
            item["explanation"] = explain(c.condition, vocab, f, now=now).to_json()
        out.append(item)
    return out


def preview(session: Session, campaign_id: int, now: datetime, sample: int = 10) -> dict[str, Any]:
    """What a run now would do, without writing anything."""
    row, c = _campaign(session, campaign_id)
    if c.condition is not None and c.condition.scope is not Scope.MEMBER:
        # An event condition reads the purchase: only the member part can be counted.
        audience = audience_rule(c.audience)
        size = (
            session.scalar(count_query(audience, default_vocabulary(), now))
            if audience is not None
            else session.scalar(
                select(func.count()).select_from(Member).where(Member.status == "active")
            )
        )
        return {
            "campaign_id": row.id,
            "version": row.version,
            "audience_size": size,
            "note": "the condition reads the purchase; POST .../backtest estimates issuance",
        }
    cand = candidates(c, now, "preview").subquery()
    label = func.coalesce(cand.c.reason, "eligible")
    by_reason: dict[str, int] = dict(
        session.execute(select(label, func.count()).group_by(label)).all()
    )
    audience_size = sum(by_reason.values())
    eligible = by_reason.pop("eligible", 0)
    issuing = _affordable(row, c, eligible)
    qualified_rows = session.execute(
        select(cand.c.member_id, cand.c.reason)
        .where(cand.c.reason.is_(None))
        .order_by(cand.c.member_id)
        .limit(sample)
    ).all()
    suppressed_rows = session.execute(
        select(cand.c.member_id, cand.c.reason)
        .where(cand.c.reason.is_not(None))
        .order_by(cand.c.member_id)
        .limit(sample)
    ).all()
    coupons = issuing if "coupon" in c.actions else 0
    return {
        "campaign_id": row.id,
        "version": row.version,
        "audience_size": audience_size,
        "holdout_size": by_reason.get("holdout", 0),
        "suppressed": by_reason
        | ({"budget_exhausted": eligible - issuing} if eligible > issuing else {}),
        "qualified": issuing,
        "coupons": coupons,
        "face_value": str(c.face_value * coupons),
        "budget_hit": issuing < eligible,
        "messages": issuing if "message" in c.actions else 0,
        "sample": _sample(session, c, list(qualified_rows) + list(suppressed_rows), now),
    }


def backtest(session: Session, campaign_id: int, now: datetime, days: int) -> dict[str, Any]:
    """Replay the last `days` of purchases through an event campaign to estimate issuance.

    Members are evaluated with today's facts and each purchase's own fields; caps,
    holdout and budget are applied as the engine would. It reads, never writes.
    """
    row, c = _campaign(session, campaign_id)
    if c.trigger["type"] != "purchase":
        raise ValidationFailed(
            "backtest replays purchases: only purchase-triggered campaigns",
            errors={"trigger": [c.trigger["type"]]},
        )
    since = now - timedelta(days=days)
    purchases = session.execute(
        text(
            """
            SELECT t.external_id, t.member_id, t.amount, s.code AS store, r.code AS region,
                   t.channel, t.occurred_at, t.items
            FROM transactions t JOIN stores s ON s.id = t.store_id
            LEFT JOIN regions r ON r.id = s.region_id
            WHERE t.kind = 'purchase' AND t.occurred_at >= :since AND t.occurred_at < :now
            ORDER BY t.occurred_at, t.id
            """
        ),
        {"since": since, "now": now},
    ).all()
    facts = load_member_facts(session, {p.member_id for p in purchases})
    granted: set[tuple[int, str]] = set()
    matched = holdout = capped = 0
    for p in purchases:
        f = facts.get(p.member_id)
        if f is None:
            continue
        event = event_facts(
            {
                "amount": p.amount,
                "store": p.store,
                "channel": p.channel,
                "occurred_at": p.occurred_at,
                "items": p.items or [],
            },
            region=p.region,
        )
        if c.predicate is not None and not c.predicate(f, event, now=p.occurred_at):
            continue
        matched += 1
        if c.holdout and in_holdout(c.id, p.member_id, c.holdout):
            holdout += 1
            continue
        key = (
            p.member_id,
            bucket(c.cap_period, f.get("timezone"), p.occurred_at, f"txn:{p.external_id}"),
        )
        if key in granted:
            capped += 1
            continue
        granted.add(key)
    issuing = _affordable(row, c, len(granted))
    return {
        "campaign_id": row.id,
        "days": days,
        "purchases": len(purchases),
        "matched": matched,
        "holdout": holdout,
        "cap_reached": capped,
        "qualified": issuing,
        "budget_hit": issuing < len(granted),
        "coupons": issuing if "coupon" in c.actions else 0,
        "face_value": str(c.face_value * issuing if "coupon" in c.actions else 0),
        "per_day": round(issuing / days, 2),
    }


_UPLIFT = text(
    """
    WITH firsts AS (
        SELECT member_id, min(decided_at) AS t0, bool_or(outcome = 'qualified') AS treated
        FROM decisions
        WHERE campaign_id = :cid AND (outcome = 'qualified' OR reason = 'holdout')
        GROUP BY member_id
    ), outcome AS (
        SELECT f.treated, count(t.id) > 0 AS purchased, coalesce(sum(t.amount), 0) AS revenue
        FROM firsts f
        LEFT JOIN transactions t ON t.member_id = f.member_id AND t.kind = 'purchase'
             AND t.occurred_at > f.t0
             AND t.occurred_at <= LEAST(f.t0 + make_interval(days => :days), :now)
        GROUP BY f.member_id, f.treated
    )
    SELECT treated, count(*) AS n, avg(purchased::int) AS rate,
           avg(revenue) AS revenue, coalesce(var_samp(revenue), 0) AS revenue_var
    FROM outcome GROUP BY treated
    """
)


def _interval(diff: float, se: float) -> dict[str, float]:
    return {
        "difference": round(diff, 6),
        "ci95_low": round(diff - Z95 * se, 6),
        "ci95_high": round(diff + Z95 * se, 6),
    }


def uplift(groups: Mapping[bool, Any]) -> dict[str, Any] | None:
    """Treatment minus holdout: purchase rate and revenue per member, normal 95% CIs."""
    t, h = groups.get(True), groups.get(False)
    if t is None or h is None or t.n == 0 or h.n == 0:
        return None
    p1, p0 = float(t.rate), float(h.rate)
    se_rate = math.sqrt(p1 * (1 - p1) / t.n + p0 * (1 - p0) / h.n)
    r1, r0 = float(t.revenue), float(h.revenue)
    se_rev = math.sqrt(float(t.revenue_var) / t.n + float(h.revenue_var) / h.n)
    return {
        "treatment": {
            "members": t.n,
            "purchase_rate": round(p1, 6),
            "revenue_per_member": round(r1, 2),
        },
        "holdout": {
            "members": h.n,
            "purchase_rate": round(p0, 6),
            "revenue_per_member": round(r0, 2),
        },
        "purchase_rate": _interval(p1 - p0, se_rate),
        "revenue_per_member": _interval(r1 - r0, se_rev),
    }


def report(session: Session, campaign_id: int, now: datetime) -> dict[str, Any]:
    row, c = _campaign(session, campaign_id)
    decisions = session.execute(
        text(
            "SELECT outcome, coalesce(reason, ''), count(*) FROM decisions "
            "WHERE campaign_id = :cid GROUP BY 1, 2"
        ),
        {"cid": row.id},
    ).all()
    coupons = session.execute(
        text(
            """
            SELECT count(*) AS issued,
                   count(*) FILTER (WHERE c.status = 'redeemed') AS redeemed,
                   coalesce(sum(c.face_value), 0) AS face_value
            FROM coupons c WHERE c.campaign_id = :cid
            """
        ),
        {"cid": row.id},
    ).one()
    revenue = session.scalar(
        text(
            "SELECT coalesce(sum(r.order_amount), 0) FROM coupon_redemptions r "
            "JOIN coupons c ON c.id = r.coupon_id "
            "WHERE c.campaign_id = :cid AND r.status = 'redeemed'"
        ),
        {"cid": row.id},
    )
    groups = {
        g.treated: g
        for g in session.execute(_UPLIFT, {"cid": row.id, "days": c.measure_days, "now": now})
    }
    from campaigns.outbox import message_counts

    return {
        "campaign_id": row.id,
        "name": row.name,
        "status": row.status,
        "decisions": {
            "qualified": sum(n for o, _, n in decisions if o == "qualified"),
            "suppressed": {r: n for o, r, n in decisions if o == "suppressed"},
        },
        "coupons": {
            "issued": coupons.issued,
            "redeemed": coupons.redeemed,
            "redemption_rate": round(coupons.redeemed / coupons.issued, 6)
            if coupons.issued
            else None,
            "face_value_issued": str(coupons.face_value),
            "revenue_of_redeeming_purchases": str(revenue),
        },
        "budget": {
            "coupons": row.budget_coupons,
            "value": str(row.budget_value) if row.budget_value is not None else None,
            "issued_coupons": row.issued_coupons,
            "issued_value": str(row.issued_value),
        },
        "measure_days": c.measure_days,
        "uplift": uplift(groups),
        "messages": message_counts(session, row.id),
    }


def member_decisions(session: Session, member_id: int, limit: int = 10) -> list[dict[str, Any]]:
    """The member's latest decisions, for the profile."""
    rows = session.execute(
        text(
            """
            SELECT d.id, c.name, d.campaign_version, d.outcome, d.reason, d.trigger, d.decided_at
            FROM decisions d JOIN campaigns c ON c.id = d.campaign_id
            WHERE d.member_id = :m ORDER BY d.id DESC LIMIT :n
            """
        ),
        {"m": member_id, "n": limit},
    ).all()
    return [
        {
            "id": r.id,
            "campaign": r.name,
            "version": r.campaign_version,
            "outcome": r.outcome,
            "reason": r.reason,
            "trigger": r.trigger,
            "decided_at": r.decided_at.isoformat(),
        }
        for r in rows
    ]
