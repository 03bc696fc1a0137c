"""Campaign tables: definitions and versions, decisions, caps, exclusivity and runs.

Coupons, tiers and the messaging outbox have their own modules (models_coupons,
models_tiers, models_messaging); they refer to campaigns and decisions by id.
"""

from __future__ import annotations

import enum
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from service.models import Base, Money


class Status(enum.StrEnum):
    DRAFT = "draft"
    PENDING_APPROVAL = "pending_approval"
    ACTIVE = "active"
    PAUSED = "paused"
    ENDED = "ended"


class Reason(enum.StrEnum):
    """Why a member did not get the offer, in the order the engine checks."""

    NOT_IN_AUDIENCE = "not_in_audience"
    CONDITION_FAILED = "condition_failed"
    HOLDOUT = "holdout"
    CAP_REACHED = "cap_reached"
    LOST_TO_HIGHER_PRIORITY = "lost_to_higher_priority"
    NO_CONSENT = "no_consent"
    BUDGET_EXHAUSTED = "budget_exhausted"
    # The coupon template was archived or expired after the campaign was activated.
    OFFER_UNAVAILABLE = "offer_unavailable"


class Campaign(Base):
    """The campaign and its current definition (denormalised from the current version).

    Budget counters live here so one conditional UPDATE enforces the budget for the
    event path and the batch path alike.
    """

    __tablename__ = "campaigns"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(20), server_default=Status.DRAFT.value)
    version: Mapped[int] = mapped_column(Integer, server_default="1")
    trigger_type: Mapped[str] = mapped_column(String(16))
    definition: Mapped[dict[str, Any]] = mapped_column(JSONB)
    priority: Mapped[int] = mapped_column(Integer, server_default="0")
    exclusivity_group: Mapped[str | None] = mapped_column(String(64))
    valid_from: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    valid_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    budget_coupons: Mapped[int | None] = mapped_column(Integer)
    budget_value: Mapped[Decimal | None] = mapped_column(Money)
    issued_coupons: Mapped[int] = mapped_column(Integer, server_default="0")
    issued_value: Mapped[Decimal] = mapped_column(Money, server_default="0")
    needs_approval: Mapped[bool] = mapped_column(server_default=text("false"))
    approved_version: Mapped[int | None] = mapped_column(Integer)
    approved_by: Mapped[str | None] = mapped_column(String(200))
    approved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_by: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        CheckConstraint(
            "status IN ('draft', 'pending_approval', 'active', 'paused', 'ended')", name="status"
        ),
        CheckConstraint(
            "kind IN ('coupon', 'tier_upgrade', 'win_back', 'birthday', 'custom')", name="kind"
        ),
        # The budget can never be overspent, whatever races.
        CheckConstraint(
            "(budget_coupons IS NULL OR issued_coupons <= budget_coupons)"
            " AND (budget_value IS NULL OR issued_value <= budget_value)",
            name="within_budget",
        ),
        Index("ix_campaigns_status_trigger_type", "status", "trigger_type"),
    )


class CampaignVersion(Base):
    """Every saved definition, immutable; decisions name the version they used."""

    __tablename__ = "campaign_versions"
    campaign_id: Mapped[int] = mapped_column(
        ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    definition: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Decision(Base):
    """One per campaign × member × period: qualified, or suppressed with a reason.

    `period` is the evaluation the decision answers: the purchase (``txn:<id>``), the
    sign-up, or the batch run (``run:<key>``). The unique constraint makes re-running
    an evaluation idempotent.

    No foreign keys (migration 0008): a purchase writes a row per active campaign, and
    the per-row checks were a fifth of its database work. Campaigns and members are never
    deleted, and the writers read both first; deleting either by hand still takes its
    decisions along (AFTER DELETE triggers on campaigns and members).
    """

    __tablename__ = "decisions"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    campaign_id: Mapped[int] = mapped_column(BigInteger)
    campaign_version: Mapped[int] = mapped_column(Integer)
    member_id: Mapped[int] = mapped_column(BigInteger)
    period: Mapped[str] = mapped_column(String(120))
    trigger: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(String(12))
    reason: Mapped[str | None] = mapped_column(String(32))
    rule_hash: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    transaction_id: Mapped[int | None] = mapped_column(BigInteger)
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("campaign_id", "member_id", "period", name="uq_decisions_evaluation"),
        CheckConstraint("outcome IN ('qualified', 'suppressed')", name="outcome"),
        CheckConstraint("(outcome = 'qualified') = (reason IS NULL)", name="reason_iff_suppressed"),
        Index("ix_decisions_member_id_decided_at", "member_id", "decided_at"),
        # Lookups by campaign use uq_decisions_evaluation (its first column): migration 0008.
    )


class CampaignGrant(Base):
    """The per-member cap: at most one grant per campaign × member × cap bucket.

    The bucket is the cap period in the member's time zone (``2026`` for once a
    year, ``2026-11`` for once a month, ``life`` for once ever); the primary key
    enforces the cap in the database for every path and every race.
    """

    __tablename__ = "campaign_grants"
    campaign_id: Mapped[int] = mapped_column(
        ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True
    )
    member_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    bucket: Mapped[str] = mapped_column(String(120), primary_key=True)
    granted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ExclusivityClaim(Base):
    """At most one offer from an exclusivity group per member per period."""

    __tablename__ = "exclusivity_claims"
    group_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    member_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    bucket: Mapped[str] = mapped_column(String(120), primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    priority: Mapped[int] = mapped_column(Integer)
    claimed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class CampaignRun(Base):
    """A batch run (scheduled, calendar, segment entry, manual); unique per run key."""

    __tablename__ = "campaign_runs"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    run_key: Mapped[str] = mapped_column(String(100))
    campaign_version: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    counts: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    note: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (UniqueConstraint("campaign_id", "run_key", name="uq_campaign_runs_key"),)


# Bounds used by the API and by the money columns.
MAX_PRIORITY = 1_000_000
HOLDOUT_MAX_PERCENT = Decimal(50)
Percent = Numeric(5, 2)
