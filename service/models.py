"""Tables of the foundation: stores, members, transactions, statistics, keys, audit."""

from __future__ import annotations

import enum
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names so Alembic migrations are reproducible.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Money = Numeric(14, 2)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Role(enum.StrEnum):
    ADMIN = "admin"
    MARKETER = "marketer"
    APPROVER = "approver"
    POS = "pos"
    ANALYST = "analyst"


class MemberStatus(enum.StrEnum):
    ACTIVE = "active"
    ERASED = "erased"


class TransactionKind(enum.StrEnum):
    PURCHASE = "purchase"
    REFUND = "refund"


class SalesChannel(enum.StrEnum):
    POS = "pos"
    ECOM = "ecom"


GENDERS = ("female", "male", "other")
CONSENT_CHANNELS = ("email", "sms", "push", "wechat")


def _now() -> Any:
    return func.now()


class Region(Base):
    """A region of the chain (headquarters → regions → stores)."""

    __tablename__ = "regions"
    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class Store(Base):
    __tablename__ = "stores"
    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    region_id: Mapped[int] = mapped_column(ForeignKey("regions.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class Member(Base):
    __tablename__ = "members"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    external_id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(200))
    gender: Mapped[str | None] = mapped_column(String(16))
    birth_date: Mapped[date | None] = mapped_column(Date)
    phone: Mapped[str | None] = mapped_column(String(32))
    email: Mapped[str | None] = mapped_column(String(254))
    timezone: Mapped[str] = mapped_column(String(64), server_default="UTC")
    locale: Mapped[str] = mapped_column(String(16), server_default="zh-CN")
    home_store_id: Mapped[int | None] = mapped_column(ForeignKey("stores.id"))
    consent_email: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    consent_sms: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    consent_push: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    consent_wechat: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    tier: Mapped[str | None] = mapped_column(String(32))
    tags: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=text("'{}'"))
    attributes: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'"))
    status: Mapped[str] = mapped_column(String(16), server_default=MemberStatus.ACTIVE.value)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    erased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint("gender IN ('female', 'male', 'other')", name="gender"),
        CheckConstraint("status IN ('active', 'erased')", name="status"),
        Index("ix_members_home_store_id_id", "home_store_id", "id"),
        Index("ix_members_tier_id", "tier", "id"),
        Index("ix_members_tags", "tags", postgresql_using="gin"),
        # The few members not active: scoring leaves them out by an anti-join with this.
        Index("ix_members_not_active", "id", postgresql_where=text("status <> 'active'")),
    )


class Transaction(Base):
    """A purchase or a refund; `external_id` is the POS transaction id (idempotent ingest)."""

    __tablename__ = "transactions"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    external_id: Mapped[str] = mapped_column(String(64), unique=True)
    # Unique where present (partial index): bulk-imported rows have none and cost nothing.
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # sha256 of the canonical request: a replayed key with a different body is a conflict.
    request_hash: Mapped[bytes | None] = mapped_column(LargeBinary)
    kind: Mapped[str] = mapped_column(String(16))
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"))
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id"))
    channel: Mapped[str] = mapped_column(String(8))
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    amount: Mapped[Decimal] = mapped_column(Money)
    currency: Mapped[str] = mapped_column(String(3))
    items: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    original_id: Mapped[int | None] = mapped_column(ForeignKey("transactions.id"))
    # For purchases: what has been refunded so far, raised by a conditional UPDATE so
    # concurrent refunds can never exceed the purchase.
    refunded_amount: Mapped[Decimal] = mapped_column(Money, server_default=text("0"))
    # The answer given to the client as sent (text, not jsonb, so a replay is byte-identical).
    response: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())

    __table_args__ = (
        CheckConstraint("kind IN ('purchase', 'refund')", name="kind"),
        CheckConstraint("channel IN ('pos', 'ecom')", name="channel"),
        # A fully discounted sale is still a purchase (it counts for frequency); a refund
        # of nothing is not an event.
        CheckConstraint("amount >= 0 AND (kind = 'purchase' OR amount > 0)", name="amount_sign"),
        CheckConstraint("refunded_amount >= 0 AND refunded_amount <= amount", name="refund_bound"),
        CheckConstraint(
            "(kind = 'refund') = (original_id IS NOT NULL)", name="refund_has_original"
        ),
        Index("ix_transactions_member_id_occurred_at", "member_id", "occurred_at"),
        # The daily window ageing reads one day of purchases per window by time, from the
        # index alone (segments.stats._AGE): the heap is in member order after an import,
        # so one day's purchases would cost one random page read each.
        Index(
            "ix_transactions_occurred_at",
            "occurred_at",
            postgresql_include=["member_id", "kind", "amount", "refunded_amount"],
        ),
        Index(
            "uq_transactions_idempotency_key",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )


class MemberStats(Base):
    """One row per member, maintained in the same transaction as each purchase/refund."""

    __tablename__ = "member_stats"
    member_id: Mapped[int] = mapped_column(
        ForeignKey("members.id", ondelete="CASCADE"), primary_key=True
    )
    first_purchase_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_purchase_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    purchase_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    purchase_amount: Mapped[Decimal] = mapped_column(Money, server_default=text("0"))
    refund_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    refund_amount: Mapped[Decimal] = mapped_column(Money, server_default=text("0"))
    # Lifetime spend net of refunds.
    net_spend: Mapped[Decimal] = mapped_column(Money, server_default=text("0"))
    # Rolling windows (segments.stats): purchases since local midnight N-1 days before the
    # windows' as-of date, spend net of what was refunded on those purchases. Kept by
    # every purchase / refund and aged by the daily refresh.
    purchases_30d: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    purchases_90d: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    purchases_365d: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    spend_30d: Mapped[Decimal] = mapped_column(Money, server_default=text("0"))
    spend_90d: Mapped[Decimal] = mapped_column(Money, server_default=text("0"))
    spend_365d: Mapped[Decimal] = mapped_column(Money, server_default=text("0"))
    # Purchase history summaries that do not age (recomputed by the daily refresh for
    # members whose row changed): distinct local purchase days, median gap between them.
    purchase_days: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    median_interpurchase_days: Mapped[Decimal | None] = mapped_column(Numeric(8, 1))
    # The distinct local purchase days, sorted; each purchase adds its day, and the daily
    # refresh derives the two summaries above from it. NULL: not known yet (read from the
    # transactions at the next refresh).
    purchase_dates: Mapped[list[date] | None] = mapped_column(ARRAY(Date))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # sha256 of the full key: keys are 256 random bits, so a slow KDF adds nothing.
    key_hash: Mapped[bytes] = mapped_column(LargeBinary, unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    role: Mapped[str] = mapped_column(String(16))
    store_id: Mapped[int | None] = mapped_column(ForeignKey("stores.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint("role IN ('admin', 'marketer', 'approver', 'pos', 'analyst')", name="role"),
    )


class AuditEntry(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    entity_type: Mapped[str] = mapped_column(String(64))
    entity_id: Mapped[str] = mapped_column(String(200))
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'"))

    __table_args__ = (Index("ix_audit_log_entity", "entity_type", "entity_id", "at"),)


class RuleVersion(Base):
    """One immutable version of a saved rule; an edit adds the next version, never updates."""

    __tablename__ = "rule_versions"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(Integer)
    scope: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(Text, server_default="")
    # The normalised tree (canonical JSON) and its text form, as validated when saved.
    rule: Mapped[dict[str, Any]] = mapped_column(JSONB)
    text: Mapped[str] = mapped_column(Text)
    # sha256 (hex) of the canonical JSON: the same content always has the same hash.
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    created_by: Mapped[str] = mapped_column(String(200))

    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_rule_versions_name_version"),
        CheckConstraint("scope IN ('member', 'event')", name="scope"),
        CheckConstraint("version >= 1", name="version_positive"),
    )
