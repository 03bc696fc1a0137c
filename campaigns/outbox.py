"""The outbox: messages written in the transaction of the decision that caused them.

Campaigns write rows (here with `queue_message`, or set-based with
`INSERT … SELECT … ON CONFLICT DO NOTHING`); the dispatcher hands committed rows to
workers (campaigns.dispatch). Nothing here talks to Redis, so writing a message
costs the purchase request one INSERT.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from campaigns.channels.config import CHANNELS
from campaigns.models_messaging import MessageKind, MessageStatus, OutboxMessage
from service.audit import record as audit
from service.cursors import decode_id, encode_id
from service.errors import Conflict, NotFound, ValidationFailed
from service.models import Member

_QUEUE = text(
    """
    INSERT INTO outbox_messages (member_id, campaign_id, decision_id, coupon_id, template,
                                 channel, kind, not_after, payload)
    VALUES (:member_id, :campaign_id, :decision_id, :coupon_id, :template, :channel, :kind,
            :not_after, CAST(:payload AS jsonb))
    ON CONFLICT (decision_id, template) DO NOTHING
    RETURNING id
    """
)
_EXISTING = text(
    "SELECT id FROM outbox_messages WHERE decision_id = :decision_id AND template = :template"
)


def queue_message(
    session: Session,
    *,
    member_id: int,
    template: str,
    channel: str | None = None,
    kind: str = "marketing",
    campaign_id: int | None = None,
    decision_id: int | None = None,
    coupon_id: int | None = None,
    not_after: datetime | None = None,
    payload: dict[str, Any] | None = None,
) -> int | None:
    """Write one message in the caller's transaction; return its id.

    Idempotent on (decision_id, template): a second call for the same decision returns
    the first message's id. Without a decision id every call writes a new message.
    """
    if channel is not None and channel not in CHANNELS:
        raise ValidationFailed(
            f"unknown channel {channel!r}", errors={"channel": [f"one of {', '.join(CHANNELS)}"]}
        )
    if kind not in (MessageKind.MARKETING.value, MessageKind.TRANSACTIONAL.value):
        raise ValidationFailed(
            f"unknown kind {kind!r}", errors={"kind": ["marketing or transactional"]}
        )
    params = {
        "member_id": member_id,
        "campaign_id": campaign_id,
        "decision_id": decision_id,
        "coupon_id": coupon_id,
        "template": template,
        "channel": channel,
        "kind": kind,
        "not_after": not_after,
        "payload": json.dumps(payload or {}, default=str),
    }
    inserted = session.execute(_QUEUE, params).scalar()
    if inserted is not None:
        return int(inserted)
    existing = session.execute(_EXISTING, params).scalar()
    return int(existing) if existing is not None else None


def message_counts(session: Session, campaign_id: int) -> dict[str, Any]:
    """A campaign's messages by status, and by status and reason (for the report)."""
    rows = session.execute(
        select(OutboxMessage.status, OutboxMessage.reason, func.count())
        .where(OutboxMessage.campaign_id == campaign_id)
        .group_by(OutboxMessage.status, OutboxMessage.reason)
    ).all()
    by_status: dict[str, int] = {s.value: 0 for s in MessageStatus}
    by_reason: dict[str, dict[str, int]] = {}
    for status, reason, count in rows:
        by_status[status] = by_status.get(status, 0) + count
        if reason is not None:
            by_reason.setdefault(status, {})[reason] = count
    return {"total": sum(by_status.values()), "by_status": by_status, "by_reason": by_reason}


def message_dict(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "member_id": row.member_external_id,
        "campaign_id": row.campaign_id,
        "decision_id": row.decision_id,
        "coupon_id": row.coupon_id,
        "template": row.template,
        "channel": row.sent_channel or row.channel,
        "preferred_channel": row.channel,
        "kind": row.kind,
        "status": row.status,
        "reason": row.reason,
        "last_error": row.last_error,
        "attempts": row.attempts,
        "overrides": list(row.overrides or []),
        "not_before": row.not_before,
        "not_after": row.not_after,
        "sent_at": row.sent_at,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "provider_id": row.provider_id,
    }


def _columns() -> Any:
    return select(
        OutboxMessage.id,
        Member.external_id.label("member_external_id"),
        OutboxMessage.campaign_id,
        OutboxMessage.decision_id,
        OutboxMessage.coupon_id,
        OutboxMessage.template,
        OutboxMessage.channel,
        OutboxMessage.sent_channel,
        OutboxMessage.kind,
        OutboxMessage.status,
        OutboxMessage.reason,
        OutboxMessage.last_error,
        OutboxMessage.attempts,
        OutboxMessage.overrides,
        OutboxMessage.not_before,
        OutboxMessage.not_after,
        OutboxMessage.sent_at,
        OutboxMessage.created_at,
        OutboxMessage.updated_at,
        OutboxMessage.provider_id,
    ).join(Member, Member.id == OutboxMessage.member_id)


def _cursor(value: int) -> str:
    return encode_id("o", value)


def _decode(cursor: str) -> int:
    return decode_id("o", cursor)


def list_messages(
    session: Session,
    *,
    member: str | None = None,
    campaign_id: int | None = None,
    status: str | None = None,
    channel: str | None = None,
    limit: int = 100,
    cursor: str | None = None,
    scope_store_id: int | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Messages newest first, filtered; keyset pagination on the id."""
    stmt = _columns()
    if member is not None:
        member_id = session.scalar(select(Member.id).where(Member.external_id == member))
        if member_id is None:
            raise NotFound(f"member {member!r} does not exist", errors={"member_id": ["unknown"]})
        stmt = stmt.where(OutboxMessage.member_id == member_id)
    if campaign_id is not None:
        stmt = stmt.where(OutboxMessage.campaign_id == campaign_id)
    if status is not None:
        stmt = stmt.where(OutboxMessage.status == status)
    if channel is not None:
        stmt = stmt.where(
            func.coalesce(OutboxMessage.sent_channel, OutboxMessage.channel) == channel
        )
    if scope_store_id is not None:
        stmt = stmt.where(Member.home_store_id == scope_store_id)
    if cursor is not None:
        stmt = stmt.where(OutboxMessage.id < _decode(cursor))
    rows = session.execute(stmt.order_by(OutboxMessage.id.desc()).limit(limit + 1)).all()
    page = [message_dict(r) for r in rows[:limit]]
    return page, (_cursor(rows[limit - 1].id) if len(rows) > limit else None)


def get_message(session: Session, message_id: int) -> dict[str, Any]:
    row = session.execute(_columns().where(OutboxMessage.id == message_id)).first()
    if row is None:
        raise NotFound(f"message {message_id} does not exist")
    return message_dict(row)


def member_messages(session: Session, member_id: int, limit: int = 20) -> list[dict[str, Any]]:
    """The member's latest messages with their delivery status (for the profile)."""
    rows = session.execute(
        _columns()
        .where(OutboxMessage.member_id == member_id)
        .order_by(OutboxMessage.id.desc())
        .limit(limit)
    ).all()
    return [
        {
            k: v
            for k, v in message_dict(r).items()
            if k
            in (
                "id",
                "campaign_id",
                "template",
                "channel",
                "kind",
                "status",
                "reason",
                "not_before",
                "sent_at",
                "created_at",
            )
        }
        for r in rows
    ]


def retry_message(session: Session, message_id: int, *, actor: str) -> dict[str, Any]:
    """Give a failed or dead message another round of attempts (staff action, audited)."""
    moved = session.execute(
        update(OutboxMessage)
        .where(
            OutboxMessage.id == message_id,
            OutboxMessage.status.in_((MessageStatus.FAILED.value, MessageStatus.DEAD.value)),
        )
        .values(
            status=MessageStatus.QUEUED.value,
            attempts=0,
            not_before=func.now(),
            dispatched_at=None,
            lease_until=None,
            reason=None,
            updated_at=func.now(),
        )
        .returning(OutboxMessage.id)
    ).first()
    if moved is None:
        current = get_message(session, message_id)  # 404 when unknown
        raise Conflict(
            f"message {message_id} is {current['status']}; only failed or dead ones are retried",
            errors={"status": [current["status"]]},
        )
    audit(session, actor, "message.retried", "message", str(message_id))
    return get_message(session, message_id)
