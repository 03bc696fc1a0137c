"""Messaging tables: the outbox, templates per channel and locale, call-centre tasks."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from service.models import Base


class MessageStatus(enum.StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    DEFERRED = "deferred"
    SUPPRESSED = "suppressed"
    DEAD = "dead"


class MessageKind(enum.StrEnum):
    MARKETING = "marketing"
    TRANSACTIONAL = "transactional"


# Statuses the dispatcher may hand to a worker once `not_before` has passed.
DUE_STATUSES = (MessageStatus.QUEUED.value, MessageStatus.DEFERRED.value)
FINAL_STATUSES = ("sent", "failed", "suppressed", "dead")


class OutboxMessage(Base):
    """One message to one member; its id is the idempotency key given to providers.

    Written by campaigns in the transaction of the decision that caused it; every
    column a campaign batch does not name has a default.
    """

    __tablename__ = "outbox_messages"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"))
    campaign_id: Mapped[int | None] = mapped_column(BigInteger)
    decision_id: Mapped[int | None] = mapped_column(BigInteger)
    coupon_id: Mapped[int | None] = mapped_column(BigInteger)
    template: Mapped[str] = mapped_column(Text)
    # Preferred channel; NULL means the member's first consented channel in the
    # configured fallback order.
    channel: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text, server_default=MessageKind.MARKETING.value)
    status: Mapped[str] = mapped_column(Text, server_default=MessageStatus.QUEUED.value)
    not_before: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Offer expiry: a message that cannot go out before this is suppressed, not sent late.
    not_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # --- delivery state (owned by the dispatcher and the workers) ---
    # When the dispatcher put the row into an RQ job; NULL = not in any job.
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Incremented by every claim: the fencing token of a send attempt.
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # A worker owns a `sending` row until then; the sweeper reclaims it afterwards.
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The channel actually used (after consent / contact fallback).
    sent_channel: Mapped[str | None] = mapped_column(Text)
    # When the message took a slot of the member's frequency cap (sending or sent).
    contacted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Reason code of the last non-send outcome (deferred, suppressed, failed, dead).
    reason: Mapped[str | None] = mapped_column(Text)
    last_error: Mapped[str | None] = mapped_column(Text)
    provider_id: Mapped[str | None] = mapped_column(Text)
    # Contact rules a transactional message was allowed to override (recorded).
    overrides: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        UniqueConstraint("decision_id", "template", name="uq_outbox_messages_decision_template"),
        CheckConstraint("kind IN ('marketing', 'transactional')", name="kind"),
        CheckConstraint(
            "status IN ('queued', 'sending', 'sent', 'failed', 'deferred', 'suppressed', 'dead')",
            name="status",
        ),
        Index("ix_outbox_messages_member_id_id", "member_id", "id"),
        Index("ix_outbox_messages_campaign_id_status", "campaign_id", "status"),
        Index("ix_outbox_messages_coupon_id", "coupon_id"),
        # The dispatcher's work list: due rows not yet in a job.
        Index(
            "ix_outbox_messages_due",
            "not_before",
            postgresql_where=text("status IN ('queued', 'deferred') AND dispatched_at IS NULL"),
        ),
        # The sweeper's lists: rows in a job for too long, sends whose lease expired.
        Index(
            "ix_outbox_messages_dispatched",
            "dispatched_at",
            postgresql_where=text("status IN ('queued', 'deferred') AND dispatched_at IS NOT NULL"),
        ),
        Index(
            "ix_outbox_messages_lease",
            "lease_until",
            postgresql_where=text("status = 'sending'"),
        ),
        # Frequency cap: a member's marketing contacts per channel in the window.
        Index(
            "ix_outbox_messages_contacts",
            "member_id",
            "sent_channel",
            "contacted_at",
            postgresql_where=text(
                "kind = 'marketing' AND status IN ('sending', 'sent') AND contacted_at IS NOT NULL"
            ),
        ),
        Index("ix_outbox_messages_status_id", "status", "id"),
    )


class MessageTemplate(Base):
    """The text of one template name for one channel and locale (Jinja2, sandboxed)."""

    __tablename__ = "message_templates"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    channel: Mapped[str] = mapped_column(String(32))
    locale: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(Text, server_default="")
    body: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_by: Mapped[str] = mapped_column(String(200))

    __table_args__ = (
        UniqueConstraint("name", "channel", "locale", name="uq_message_templates_variant"),
    )


class TaskStatus(enum.StrEnum):
    OPEN = "open"
    CLAIMED = "claimed"
    CLOSED = "closed"


class CallTask(Base):
    """A call-centre follow-up created by the call_centre channel; one per message."""

    __tablename__ = "call_tasks"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    message_id: Mapped[int] = mapped_column(BigInteger, unique=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"))
    campaign_id: Mapped[int | None] = mapped_column(BigInteger)
    subject: Mapped[str] = mapped_column(Text, server_default="")
    script: Mapped[str] = mapped_column(Text, server_default="")
    phone: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), server_default=TaskStatus.OPEN.value)
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str | None] = mapped_column(String(32))
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        CheckConstraint("status IN ('open', 'claimed', 'closed')", name="status"),
        CheckConstraint(
            "outcome IS NULL OR outcome IN ('reached', 'no_answer', 'declined', 'wrong_number')",
            name="outcome",
        ),
        Index("ix_call_tasks_status_id", "status", "id"),
        Index("ix_call_tasks_member_id", "member_id"),
    )
