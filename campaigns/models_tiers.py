"""Tier tables: the ladder, its version, each member's tier dates, and the change history.

`members.tier` (foundation) stays the one place a member's current tier lives; these
tables add what a loyalty programme needs around it.
"""

from __future__ import annotations

import enum
from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from service.models import Base, Money


class TierChangeReason(enum.StrEnum):
    PURCHASE = "purchase"
    REVIEW = "review"
    CAMPAIGN = "campaign"
    MANUAL = "manual"


class TierDirection(enum.StrEnum):
    UP = "up"
    DOWN = "down"


class Tier(Base):
    """One rung of the ladder; rank 1 is the lowest tier.

    A member qualifies for a tier when their rolling-12-month spend reaches
    `min_spend_12m` OR their rolling-12-month purchase count reaches `min_purchases_12m`
    (a NULL threshold never qualifies on its own); their tier is the highest one they
    qualify for.
    """

    __tablename__ = "tiers"
    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(32), unique=True)
    rank: Mapped[int] = mapped_column(Integer, unique=True)
    min_spend_12m: Mapped[Decimal | None] = mapped_column(Money)
    min_purchases_12m: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        CheckConstraint("rank >= 1", name="rank_positive"),
        CheckConstraint(
            "min_spend_12m IS NOT NULL OR min_purchases_12m IS NOT NULL", name="has_threshold"
        ),
        CheckConstraint(
            "(min_spend_12m IS NULL OR min_spend_12m >= 0)"
            " AND (min_purchases_12m IS NULL OR min_purchases_12m >= 1)",
            name="threshold_sign",
        ),
    )


class TierLadder(Base):
    """One row: the ladder's version, raised by every replacement (cache invalidation)."""

    __tablename__ = "tier_ladder"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, server_default=text("1"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_by: Mapped[str] = mapped_column(String(200), server_default="migration")

    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)


class MemberTier(Base):
    """Since when a member holds their tier and when it is next reviewed (their local date)."""

    __tablename__ = "member_tiers"
    member_id: Mapped[int] = mapped_column(
        ForeignKey("members.id", ondelete="CASCADE"), primary_key=True
    )
    tier_since: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # NULL while the member has no tier (nothing to review).
    review_on: Mapped[date | None] = mapped_column(Date)

    __table_args__ = (Index("ix_member_tiers_review_on", "review_on"),)


class TierChange(Base):
    """Every tier change, in either direction, with why and what caused it."""

    __tablename__ = "tier_changes"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id", ondelete="CASCADE"))
    from_tier: Mapped[str | None] = mapped_column(String(32))
    to_tier: Mapped[str | None] = mapped_column(String(32))
    direction: Mapped[str] = mapped_column(String(4))
    reason: Mapped[str] = mapped_column(String(16))
    # The purchase that crossed the threshold (reason 'purchase').
    transaction_id: Mapped[int | None] = mapped_column(BigInteger)
    # Plain column: the campaigns table belongs to another migration branch.
    campaign_id: Mapped[int | None] = mapped_column(BigInteger)
    actor: Mapped[str | None] = mapped_column(String(200))
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint("direction IN ('up', 'down')", name="direction"),
        CheckConstraint("reason IN ('purchase', 'review', 'campaign', 'manual')", name="reason"),
        Index("ix_tier_changes_member_id_changed_at", "member_id", "changed_at"),
        Index(
            "ix_tier_changes_campaign_id",
            "campaign_id",
            postgresql_where=text("campaign_id IS NOT NULL"),
        ),
    )
