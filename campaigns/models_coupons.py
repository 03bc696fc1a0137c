"""Coupon tables: templates, coupons (member or bearer), bulk batches and redemptions."""

from __future__ import annotations

import enum
from datetime import datetime, time
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    SmallInteger,
    String,
    Text,
    Time,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, mapped_column

from service.models import Base, Money


class CouponKind(enum.StrEnum):
    PERCENT = "percent"
    AMOUNT = "amount"
    FREE_ITEM = "free_item"


class CouponStatus(enum.StrEnum):
    ISSUED = "issued"
    REDEEMED = "redeemed"
    VOID = "void"


class RedemptionStatus(enum.StrEnum):
    # 'pending' exists only inside the redeeming transaction (see campaigns.coupons.redeem).
    PENDING = "pending"
    REDEEMED = "redeemed"
    ROLLED_BACK = "rolled_back"


class CouponTemplate(Base):
    """What a coupon gives and where / when it can be used. Immutable once created."""

    __tablename__ = "coupon_templates"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, server_default="")
    kind: Mapped[str] = mapped_column(String(16))
    percent_off: Mapped[Decimal | None] = mapped_column(Numeric(5, 2))
    amount_off: Mapped[Decimal | None] = mapped_column(Money)
    free_item_sku: Mapped[str | None] = mapped_column(String(64))
    # What one coupon counts against a campaign budget: the amount, the cap of a
    # percentage, or the free item's value. Also the most one redemption can discount.
    face_value: Mapped[Decimal] = mapped_column(Money)
    currency: Mapped[str] = mapped_column(String(3))
    min_spend: Mapped[Decimal] = mapped_column(Money, server_default=text("0"))
    # Validity: `valid_days` local calendar days starting on the day of issue, or the
    # fixed window [valid_from, valid_until).
    valid_days: Mapped[int | None] = mapped_column(Integer)
    valid_from: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    valid_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Local days and hours are those of this zone (default: PATRON_TIMEZONE at creation).
    timezone: Mapped[str] = mapped_column(String(64))
    weekdays: Mapped[list[int] | None] = mapped_column(ARRAY(SmallInteger))
    hours_from: Mapped[time | None] = mapped_column(Time)
    hours_until: Mapped[time | None] = mapped_column(Time)
    # Where it can be used: any listed store, or any store of a listed region; both
    # NULL = everywhere.
    store_codes: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    region_codes: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    archived: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    archived_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    created_by: Mapped[str] = mapped_column(String(200))

    __table_args__ = (
        CheckConstraint("kind IN ('percent', 'amount', 'free_item')", name="kind"),
        CheckConstraint(
            "(kind = 'percent') = (percent_off IS NOT NULL)"
            " AND (kind = 'amount') = (amount_off IS NOT NULL)"
            " AND (kind = 'free_item') = (free_item_sku IS NOT NULL)",
            name="kind_value",
        ),
        CheckConstraint("percent_off > 0 AND percent_off <= 100", name="percent_range"),
        CheckConstraint("amount_off > 0 AND amount_off = face_value", name="amount_is_face"),
        CheckConstraint("face_value > 0", name="face_value_positive"),
        CheckConstraint("min_spend >= 0", name="min_spend_nonnegative"),
        CheckConstraint(
            "(valid_days IS NOT NULL AND valid_from IS NULL AND valid_until IS NULL)"
            " OR (valid_days IS NULL AND valid_from IS NOT NULL AND valid_until IS NOT NULL"
            "     AND valid_from < valid_until)",
            name="validity",
        ),
        CheckConstraint("valid_days BETWEEN 1 AND 3660", name="valid_days_range"),
        CheckConstraint(
            "weekdays IS NULL OR (cardinality(weekdays) BETWEEN 1 AND 7"
            " AND weekdays <@ ARRAY[1, 2, 3, 4, 5, 6, 7]::smallint[])",
            name="weekdays_iso",
        ),
        CheckConstraint(
            "(hours_from IS NULL) = (hours_until IS NULL) AND hours_from <> hours_until",
            name="hours_window",
        ),
        CheckConstraint("cardinality(store_codes) > 0", name="store_codes_nonempty"),
        CheckConstraint("cardinality(region_codes) > 0", name="region_codes_nonempty"),
        CheckConstraint("archived = (archived_at IS NOT NULL)", name="archived_at"),
    )


class CouponBatch(Base):
    """One bulk generation of bearer codes (CLI or API); generated in one transaction."""

    __tablename__ = "coupon_batches"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    template_id: Mapped[int] = mapped_column(ForeignKey("coupon_templates.id"), index=True)
    requested: Mapped[int] = mapped_column(Integer)
    generated: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    status: Mapped[str] = mapped_column(String(16), server_default="pending")
    # A retried API request with the same Idempotency-Key gets the same batch.
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    label: Mapped[str] = mapped_column(String(200), server_default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    created_by: Mapped[str] = mapped_column(String(200))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint("status IN ('pending', 'done')", name="status"),
        CheckConstraint("requested BETWEEN 1 AND 10000000", name="requested_range"),
        CheckConstraint("(status = 'done') = (finished_at IS NOT NULL)", name="finished"),
    )


class Coupon(Base):
    """One coupon: a member's (issued by a campaign decision) or a bearer code (batch)."""

    __tablename__ = "coupons"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    template_id: Mapped[int] = mapped_column(ForeignKey("coupon_templates.id"))
    member_id: Mapped[int | None] = mapped_column(ForeignKey("members.id"))
    # Owned by the campaigns tables (no FK: they evolve separately); one coupon per
    # decision makes issuing idempotent.
    campaign_id: Mapped[int | None] = mapped_column(BigInteger)
    decision_id: Mapped[int | None] = mapped_column(BigInteger)
    # No FK: a per-row foreign-key check costs about an eighth of bulk generation, and
    # batches are written only by campaigns.coupons.fill_batch (never deleted).
    batch_id: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), server_default="issued")
    face_value: Mapped[Decimal] = mapped_column(Money)
    valid_from: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    valid_until: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    redeemed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    voided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint("status IN ('issued', 'redeemed', 'void')", name="status"),
        CheckConstraint("(status = 'redeemed') = (redeemed_at IS NOT NULL)", name="redeemed_at"),
        CheckConstraint("(status = 'void') = (voided_at IS NOT NULL)", name="voided_at"),
        CheckConstraint("valid_from < valid_until", name="validity"),
        CheckConstraint("face_value > 0", name="face_value_positive"),
        Index("uq_coupons_decision_id", "decision_id", unique=True),
        Index(
            "ix_coupons_member_id_issued_at",
            "member_id",
            "issued_at",
            postgresql_where=text("member_id IS NOT NULL"),
        ),
        Index(
            "ix_coupons_campaign_id",
            "campaign_id",
            postgresql_where=text("campaign_id IS NOT NULL"),
        ),
        Index("ix_coupons_batch_id", "batch_id", postgresql_where=text("batch_id IS NOT NULL")),
    )


class CouponRedemption(Base):
    """One redemption at a till; the idempotency record is this row, inserted first."""

    __tablename__ = "coupon_redemptions"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    # sha256 of the canonical request: the same key with another body is a conflict.
    request_hash: Mapped[bytes] = mapped_column(LargeBinary)
    coupon_id: Mapped[int | None] = mapped_column(ForeignKey("coupons.id"))
    member_id: Mapped[int | None] = mapped_column(ForeignKey("members.id"))
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id"))
    transaction_id: Mapped[str | None] = mapped_column(String(64))
    order_amount: Mapped[Decimal] = mapped_column(Money)
    discount: Mapped[Decimal | None] = mapped_column(Money)
    status: Mapped[str] = mapped_column(String(16), server_default="pending")
    # The answer given to the till as sent (text, so a replay is byte-identical).
    response: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    rolled_back_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    rollback_reason: Mapped[str | None] = mapped_column(String(16))

    __table_args__ = (
        CheckConstraint("status IN ('pending', 'redeemed', 'rolled_back')", name="status"),
        CheckConstraint(
            "status = 'pending' OR (coupon_id IS NOT NULL AND discount IS NOT NULL"
            " AND response IS NOT NULL)",
            name="complete",
        ),
        CheckConstraint(
            "(status = 'rolled_back') = (rolled_back_at IS NOT NULL)", name="rolled_back_at"
        ),
        CheckConstraint("rollback_reason IN ('refund', 'void')", name="rollback_reason"),
        CheckConstraint("order_amount >= 0 AND discount >= 0", name="amounts"),
        # The database itself forbids two live redemptions of one coupon.
        Index(
            "uq_coupon_redemptions_live_coupon",
            "coupon_id",
            unique=True,
            postgresql_where=text("status = 'redeemed'"),
        ),
        Index("ix_coupon_redemptions_coupon_id", "coupon_id"),
        Index(
            "ix_coupon_redemptions_transaction_id",
            "transaction_id",
            postgresql_where=text("transaction_id IS NOT NULL"),
        ),
    )
