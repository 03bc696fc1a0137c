"""Event triggers: what the purchase and sign-up requests call, inside their transaction."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from campaigns.engine import ACTIVE, Compiled, Rewards, evaluate_member, member_facts_and_campaigns
from service.vocabulary import event_facts, store_region


def _wants(trigger: str, campaigns: tuple[Compiled, ...]) -> bool:
    return any(c.trigger["type"] == trigger for c in campaigns)


# Store code → region code; stores do not change region often, and a stale answer only
# lasts until this process's campaign cache is rebuilt (any campaign change).
_REGIONS: dict[str, str | None] = {}
_REGIONS_GENERATION: list[str | None] = [None]


def _region(session: Session, store: str) -> str | None:
    generation = ACTIVE.generation
    if _REGIONS_GENERATION[0] != generation:
        _REGIONS.clear()
        _REGIONS_GENERATION[0] = generation
    if store not in _REGIONS:
        if len(_REGIONS) > 10_000:
            _REGIONS.clear()
        _REGIONS[store] = store_region(session, store)
    return _REGIONS[store]


def after_purchase(
    session: Session,
    *,
    member_id: int,
    transaction_id: int,
    external_id: str,
    payload: Mapping[str, Any],
    now: datetime,
    tier_change: Mapping[str, Any] | None,
    entered_segments: list[str] | None,
) -> dict[str, Any]:
    """Purchase, tier-change and segment-entry campaigns for this member; the till's rewards."""
    facts = None
    if _wants("purchase", ACTIVE.last_seen):
        # The usual case with purchase campaigns: the facts come with the cache check.
        facts, campaigns = member_facts_and_campaigns(session, member_id)
    else:
        campaigns = ACTIVE.get(session)
    rewards = Rewards()
    period = f"txn:{external_id}"
    if _wants("purchase", campaigns):
        event = event_facts(payload, region=_region(session, payload["store"]))
        rewards.merge(
            evaluate_member(
                session,
                member_id,
                trigger="purchase",
                now=now,
                period=period,
                event=event,
                transaction_id=transaction_id,
                active=campaigns,
                facts=facts,
            )
        )
    if tier_change is not None and _wants("tier_change", campaigns):
        reached = tier_change.get("to")
        rewards.merge(
            evaluate_member(
                session,
                member_id,
                trigger="tier_change",
                now=now,
                period=f"tier:{reached}:{external_id}",
                event=event_facts(payload),
                transaction_id=transaction_id,
                matches=lambda c: c.trigger.get("to") in (None, reached),
                active=campaigns,
            )
        )
    if entered_segments and _wants("segment_entry", campaigns):
        entered = set(entered_segments)
        rewards.merge(
            evaluate_member(
                session,
                member_id,
                trigger="segment_entry",
                now=now,
                period=period,
                transaction_id=transaction_id,
                matches=lambda c: c.trigger.get("segment") in entered,
                active=campaigns,
            )
        )
    return {
        "coupons": rewards.coupons,
        "tier_change": dict(tier_change) if tier_change is not None else rewards.tier_change,
        "offers": rewards.offers,
    }


def after_signup(session: Session, *, member_id: int, now: datetime) -> dict[str, Any]:
    """Sign-up campaigns (a welcome coupon, a welcome message) for a new member."""
    rewards = evaluate_member(session, member_id, trigger="signup", now=now, period="signup")
    return {
        "coupons": rewards.coupons,
        "tier_change": rewards.tier_change,
        "offers": rewards.offers,
    }
