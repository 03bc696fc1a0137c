"""Purchase and refund events: idempotent ingest and statistics in one transaction."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import or_, select, text
from sqlalchemy.orm import Session

from campaigns.hooks import after_purchase
from campaigns.tiers import apply_purchase as apply_tier_purchase
from segments.custom import purchase_fields, refresh_member
from segments.stats import (
    PURCHASE_WINDOW_COLUMNS,
    PURCHASE_WINDOW_FROM,
    PURCHASE_WINDOW_RETURNING,
    PURCHASE_WINDOW_UPDATE,
    PURCHASE_WINDOW_VALUES,
    apply_refund_to_windows,
)
from service.db import execute_prepared
from service.errors import Conflict, ValidationFailed
from service.models import Member, MemberStatus, Store, Transaction
from service.vocabulary import default_vocabulary


@dataclass(frozen=True)
class EventResult:
    """What the till gets back; `replayed` is true when this answers a retry."""

    status: int
    body: str
    replayed: bool


def _json_default(value: Any) -> Any:
    """For json.dumps: amounts as strings, instants in ISO 8601; anything else is refused.

    A `default` instead of converting the data first: json calls it only for the values
    it cannot encode, without copying every dict and list of a request or response.
    """
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def request_hash(payload: Mapping[str, Any]) -> bytes:
    """Hash of the canonical request, so a reused key with another body is detected."""
    canonical = json.dumps(
        dict(payload), default=_json_default, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).digest()


_INSERT = text(
    """
    INSERT INTO transactions (external_id, idempotency_key, request_hash, kind, member_id,
                              store_id, channel, occurred_at, amount, currency, items, original_id)
    SELECT :external_id, :idempotency_key, :request_hash, :kind, m.id, s.id, :channel,
           :occurred_at, :amount, :currency, CAST(:items AS jsonb), :original_id
    FROM members m, stores s
    WHERE m.external_id = :member AND m.status = 'active' AND s.code = :store
      AND (CAST(:scope_store_id AS integer) IS NULL OR s.id = :scope_store_id)
    ON CONFLICT DO NOTHING
    RETURNING id, member_id
    """
)

# A purchase in one round trip: the transaction row (as _INSERT) and, only when it was
# really inserted (not a replay; member and store found), the member_stats upsert,
# chained by a data-modifying CTE. No row back means "not inserted".
_INSERT_PURCHASE = text(
    f"""
    WITH tx AS (
        INSERT INTO transactions (external_id, idempotency_key, request_hash, kind, member_id,
                                  store_id, channel, occurred_at, amount, currency, items)
        SELECT :external_id, :idempotency_key, :request_hash, 'purchase', m.id, s.id, :channel,
               :occurred_at, :amount, :currency, CAST(:items AS jsonb)
        FROM members m, stores s
        WHERE m.external_id = :member AND m.status = 'active' AND s.code = :store
          AND (CAST(:scope_store_id AS integer) IS NULL OR s.id = :scope_store_id)
        ON CONFLICT DO NOTHING
        RETURNING id, member_id
    ), stats AS (
        INSERT INTO member_stats AS ms (member_id, first_purchase_at, last_purchase_at,
                                        purchase_count, purchase_amount, net_spend, updated_at,
                                        {PURCHASE_WINDOW_COLUMNS})
        SELECT member_id, :occurred_at, :occurred_at, 1, :amount, :amount, now(),
               {PURCHASE_WINDOW_VALUES}
        FROM tx {PURCHASE_WINDOW_FROM}
        ON CONFLICT (member_id) DO UPDATE SET
            first_purchase_at = LEAST(ms.first_purchase_at, EXCLUDED.first_purchase_at),
            last_purchase_at = GREATEST(ms.last_purchase_at, EXCLUDED.last_purchase_at),
            purchase_count = ms.purchase_count + 1,
            purchase_amount = ms.purchase_amount + EXCLUDED.purchase_amount,
            net_spend = ms.net_spend + EXCLUDED.net_spend,
            updated_at = now(),
            {PURCHASE_WINDOW_UPDATE}
        RETURNING member_id, purchase_count, net_spend, first_purchase_at, last_purchase_at,
                  {PURCHASE_WINDOW_RETURNING}
    )
    SELECT tx.id, stats.*
    FROM tx JOIN stats USING (member_id)
    """  # noqa: S608 - fixed column lists from segments.stats, values are bound parameters
)

_REFUND_STATS = text(
    """
    INSERT INTO member_stats AS ms (member_id, refund_count, refund_amount, net_spend, updated_at)
    VALUES (:member_id, 1, :amount, -CAST(:amount AS numeric), now())
    ON CONFLICT (member_id) DO UPDATE SET
        refund_count = ms.refund_count + 1,
        refund_amount = ms.refund_amount + EXCLUDED.refund_amount,
        net_spend = ms.net_spend + EXCLUDED.net_spend,
        updated_at = now()
    RETURNING purchase_count, net_spend, first_purchase_at, last_purchase_at
    """
)

# Single conditional update: two concurrent refunds can never exceed the purchase.
_CONSUME_REFUNDABLE = text(
    """
    UPDATE transactions SET refunded_amount = refunded_amount + :amount
    WHERE id = :original_id AND refunded_amount + :amount <= amount
    RETURNING amount - refunded_amount AS remaining
    """
)

_SAVE_RESPONSE = text("UPDATE transactions SET response = :response WHERE id = :id")


def _replay(
    session: Session, external_id: str, idempotency_key: str | None, digest: bytes
) -> EventResult | None:
    cond = Transaction.external_id == external_id
    if idempotency_key is not None:
        cond = or_(cond, Transaction.idempotency_key == idempotency_key)
    row = session.execute(
        select(Transaction.request_hash, Transaction.response).where(cond).limit(1)
    ).first()
    if row is None:
        return None
    if row.response is None:
        # Loaded by bulk import: there was no HTTP answer to repeat.
        body = json.dumps({"transaction_id": external_id, "status": "already_recorded"})
        return EventResult(status=200, body=body, replayed=True)
    if row.request_hash != digest:
        raise Conflict(
            "this transaction id or Idempotency-Key was already used for a different request",
            errors={"transaction_id": ["already recorded with different content"]},
        )
    return EventResult(status=201, body=row.response, replayed=True)


def _explain_missing(
    session: Session, member: str, store: str, scope_store_id: int | None
) -> ValidationFailed:
    errors: dict[str, list[str]] = {}
    status = session.scalar(select(Member.status).where(Member.external_id == member))
    if status is None:
        errors["member_id"] = [f"unknown member {member!r}"]
    elif status == MemberStatus.ERASED.value:
        errors["member_id"] = [f"member {member!r} was erased"]
    store_id = session.scalar(select(Store.id).where(Store.code == store))
    if store_id is None:
        errors["store"] = [f"unknown store {store!r}"]
    elif scope_store_id is not None and store_id != scope_store_id:
        errors["store"] = ["this API key may only record events of its own store"]
    return ValidationFailed("The event refers to something that does not exist.", errors=errors)


def _params(
    payload: Mapping[str, Any], kind: str, key: str | None, digest: bytes
) -> dict[str, Any]:
    items = payload.get("items")
    return {
        "external_id": payload["transaction_id"],
        "idempotency_key": key,
        "request_hash": digest,
        "kind": kind,
        "member": payload["member_id"],
        "store": payload["store"],
        "channel": payload["channel"],
        "occurred_at": payload["occurred_at"],
        "amount": payload["amount"],
        "currency": payload["currency"],
        "items": json.dumps(items, default=_json_default) if items is not None else None,
        "original_id": None,
    }


def _stats_body(stats: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "purchase_count": stats.purchase_count,
        "net_spend": str(stats.net_spend),
        "first_purchase_at": stats.first_purchase_at.isoformat()
        if stats.first_purchase_at
        else None,
        "last_purchase_at": stats.last_purchase_at.isoformat() if stats.last_purchase_at else None,
    }
    if "spend_30d" in stats._fields:
        # What the till can print: this member's spend in the rolling windows, now.
        body["windows"] = {
            f"{n}d": {
                "purchases": getattr(stats, f"purchases_{n}d"),
                "spend": str(getattr(stats, f"spend_{n}d")),
            }
            for n in (30, 90, 365)
        }
    return body


def record_purchase(
    session: Session,
    payload: Mapping[str, Any],
    *,
    idempotency_key: str | None = None,
    scope_store_id: int | None = None,
) -> EventResult:
    """Store a purchase once and update the member's statistics in the same transaction."""
    digest = request_hash(payload)
    params = _params(payload, "purchase", idempotency_key, digest)
    params["scope_store_id"] = scope_store_id
    del params["kind"], params["original_id"]
    stats = execute_prepared(session, _INSERT_PURCHASE, params)
    if stats is None:
        replay = _replay(session, payload["transaction_id"], idempotency_key, digest)
        if replay is not None:
            return replay
        raise _explain_missing(session, payload["member_id"], payload["store"], scope_store_id)
    now = datetime.now(UTC)
    # Tiers first: this purchase may cross a threshold; the upgrade is immediate, and
    # segments or campaigns reading the tier below see the new one.
    tier_change = apply_tier_purchase(session, stats.member_id, now, transaction_id=stats.id)
    # Segment freshness: member-scoped segments this purchase can change, same transaction.
    changed = None
    if tier_change is not None:
        changed = purchase_fields(default_vocabulary()) | {"tier"}
    segment_changes = refresh_member(session, stats.member_id, now, changed)
    body = {
        "transaction_id": payload["transaction_id"],
        "kind": "purchase",
        "member_id": payload["member_id"],
        "amount": str(payload["amount"]),
        "currency": payload["currency"],
        "occurred_at": payload["occurred_at"].isoformat(),
        "member": _stats_body(stats),
        # What the till prints: coupons issued, tier change, offers (campaigns/hooks.py).
        "rewards": after_purchase(
            session,
            member_id=stats.member_id,
            transaction_id=stats.id,
            external_id=payload["transaction_id"],
            payload=payload,
            now=now,
            tier_change=tier_change,
            entered_segments=segment_changes.entered,
        ),
    }
    text_body = json.dumps(body, default=_json_default)
    execute_prepared(session, _SAVE_RESPONSE, {"response": text_body, "id": stats.id})
    return EventResult(status=201, body=text_body, replayed=False)


def record_refund(
    session: Session,
    payload: Mapping[str, Any],
    *,
    idempotency_key: str | None = None,
    scope_store_id: int | None = None,
) -> EventResult:
    """Store a refund of an earlier purchase; refunds never exceed what was paid."""
    digest = request_hash(payload)
    replay = _replay(session, payload["transaction_id"], idempotency_key, digest)
    if replay is not None:
        return replay
    original = session.execute(
        select(Transaction.id, Transaction.kind, Transaction.currency, Member.external_id)
        .join(Member, Member.id == Transaction.member_id)
        .where(Transaction.external_id == payload["original_transaction_id"])
    ).first()
    if original is None or original.kind != "purchase":
        raise ValidationFailed(
            "a refund must reference an earlier purchase",
            errors={"original_transaction_id": ["no purchase with this transaction id"]},
        )
    if original.external_id != payload["member_id"]:
        raise ValidationFailed(
            "the original purchase belongs to another member",
            errors={"original_transaction_id": ["purchase of a different member"]},
        )
    if original.currency != payload["currency"]:
        raise ValidationFailed(
            "the refund currency differs from the purchase",
            errors={"currency": [f"must be {original.currency}"]},
        )
    params = _params(payload, "refund", idempotency_key, digest)
    params["original_id"] = original.id
    params["scope_store_id"] = scope_store_id
    inserted = session.execute(_INSERT, params).first()
    if inserted is None:
        # Lost a race with an identical retry, or the member / store is unknown.
        replay = _replay(session, payload["transaction_id"], idempotency_key, digest)
        if replay is not None:
            return replay
        raise _explain_missing(session, payload["member_id"], payload["store"], scope_store_id)
    remaining = session.execute(
        _CONSUME_REFUNDABLE, {"amount": payload["amount"], "original_id": original.id}
    ).first()
    if remaining is None:
        left = session.scalar(
            select(Transaction.amount - Transaction.refunded_amount).where(
                Transaction.id == original.id
            )
        )
        raise ValidationFailed(
            "the refund exceeds what is left to refund on the purchase",
            errors={"amount": [f"at most {left} can still be refunded"]},
        )
    stats = session.execute(
        _REFUND_STATS, {"member_id": inserted.member_id, "amount": payload["amount"]}
    ).one()
    apply_refund_to_windows(session, original.id, payload["amount"])
    body = {
        "transaction_id": payload["transaction_id"],
        "kind": "refund",
        "original_transaction_id": payload["original_transaction_id"],
        "member_id": payload["member_id"],
        "amount": str(payload["amount"]),
        "currency": payload["currency"],
        "occurred_at": payload["occurred_at"].isoformat(),
        "refundable_remaining": str(remaining.remaining),
        "member": _stats_body(stats),
    }
    text_body = json.dumps(body)
    session.execute(_SAVE_RESPONSE, {"response": text_body, "id": inserted.id})
    return EventResult(status=201, body=text_body, replayed=False)
