"""Tables of member scoring: window state, scores, churn predictions, lifecycle history, RFM
snapshots, runs."""

from __future__ import annotations

import enum
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    Numeric,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from service.models import Base, Money


class Stage(enum.StrEnum):
    """Lifecycle stage of a member as of a refresh date."""

    NEW = "new"
    ACTIVE = "active"
    AT_RISK = "at_risk"
    DORMANT = "dormant"
    LOST = "lost"
    NEVER_PURCHASED = "never_purchased"


class RfmSegment(enum.StrEnum):
    """Named RFM segments (snake_case ids; labels in segments.rfm.SEGMENT_LABELS)."""

    CHAMPIONS = "champions"
    LOYAL = "loyal"
    POTENTIAL_LOYALIST = "potential_loyalist"
    NEW = "new"
    PROMISING = "promising"
    NEED_ATTENTION = "need_attention"
    ABOUT_TO_SLEEP = "about_to_sleep"
    AT_RISK = "at_risk"
    CANT_LOSE = "cant_lose"
    HIBERNATING = "hibernating"
    LOST = "lost"


def _in(column: str, values: type[enum.StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class StatsWindows(Base):
    """The one row saying which date the rolling windows of member_stats are as of.

    The purchase path reads the window starts from here, so an event is counted in a
    window exactly when the daily ageing would later subtract it.
    """

    __tablename__ = "stats_windows"
    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    as_of: Mapped[date] = mapped_column(Date)
    timezone: Mapped[str] = mapped_column(String(64))
    start_30d: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    start_90d: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    start_365d: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)


class MemberScore(Base):
    """Scores of one member written by the daily refresh (RFM, lifecycle, churn)."""

    __tablename__ = "member_scores"
    member_id: Mapped[int] = mapped_column(
        ForeignKey("members.id", ondelete="CASCADE"), primary_key=True
    )
    # The refresh date that last changed this row (rows that did not change are not
    # rewritten; the date of the scores as a whole is in score_runs).
    as_of: Mapped[date] = mapped_column(Date)
    # RFM: missing for members without a purchase in the look-back window.
    r: Mapped[int | None] = mapped_column(SmallInteger)
    f: Mapped[int | None] = mapped_column(SmallInteger)
    m: Mapped[int | None] = mapped_column(SmallInteger)
    rfm_segment: Mapped[str | None] = mapped_column(String(32))
    # The values F and M were cut from, for the explanation (recency is derived from
    # last_purchase_at and as_of, so these only change when the member's windows do).
    frequency: Mapped[int | None] = mapped_column(Integer)
    monetary: Mapped[Decimal | None] = mapped_column(Money)
    lifecycle_stage: Mapped[str] = mapped_column(String(16))
    stage_since: Mapped[date] = mapped_column(Date)

    __table_args__ = (
        CheckConstraint("r BETWEEN 1 AND 5 AND f BETWEEN 1 AND 5 AND m BETWEEN 1 AND 5", "rfm"),
        CheckConstraint(_in("rfm_segment", RfmSegment), "rfm_segment"),
        CheckConstraint(_in("lifecycle_stage", Stage), "lifecycle_stage"),
        # Rows whose stage or RFM scores change are updated daily: room on each page keeps
        # those updates HOT (churn predictions, rewritten for most members, live apart).
        {"postgresql_with": {"fillfactor": 70}},
    )


class MemberPrediction(Base):
    """Churn predictions of one member (BG/NBD, Gamma-Gamma) as of the last churn run.

    The churn step replaces the whole table every run (segments.predict): T grows by a
    day for every member, so nearly every value changes daily, and building a new table
    and swapping it in costs a fraction of updating ~90 % of the rows in place. A member
    without a row is not scored (no purchase, or not active at the last run).

    No foreign key to members: it would be re-validated against a million members on
    every swap, and members are never deleted (erasure anonymises the row in place; the
    next run leaves erased members out). The columns' order is part of the contract with
    `predict._BUILD`, which creates the table with CREATE TABLE AS.
    """

    __tablename__ = "member_predictions"
    member_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    # The churn run that wrote the row (every row of the table has the same date).
    as_of: Mapped[date] = mapped_column(Date)
    p_alive: Mapped[Decimal | None] = mapped_column(Numeric(6, 5))
    expected_purchases_90d: Mapped[Decimal | None] = mapped_column(Numeric(10, 4))
    expected_value: Mapped[Decimal | None] = mapped_column(Money)


class LifecycleChange(Base):
    """A member's move from one lifecycle stage to another, on a refresh date."""

    __tablename__ = "lifecycle_changes"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id", ondelete="CASCADE"))
    changed_on: Mapped[date] = mapped_column(Date)
    from_stage: Mapped[str | None] = mapped_column(String(16))
    to_stage: Mapped[str] = mapped_column(String(16))

    __table_args__ = (
        # One change per member and date: re-running a date rewrites it (idempotent).
        UniqueConstraint("member_id", "changed_on", name="uq_lifecycle_changes_member_day"),
        Index("ix_lifecycle_changes_to_stage_changed_on", "to_stage", "changed_on", "member_id"),
    )


class RfmSnapshot(Base):
    """A member's RFM scores at the first refresh of a month (for the movement matrix)."""

    __tablename__ = "rfm_snapshots"
    month: Mapped[date] = mapped_column(Date)
    member_id: Mapped[int] = mapped_column(BigInteger)
    r: Mapped[int] = mapped_column(SmallInteger)
    f: Mapped[int] = mapped_column(SmallInteger)
    m: Mapped[int] = mapped_column(SmallInteger)
    rfm_segment: Mapped[str] = mapped_column(String(32))

    __table_args__ = (PrimaryKeyConstraint("month", "member_id", name="pk_rfm_snapshots"),)


class ScoreRun(Base):
    """One refresh date: its cut points, model parameters, counts and timings per step."""

    __tablename__ = "score_runs"
    as_of: Mapped[date] = mapped_column(Date, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # {"r": [12, 35, 80, 160], "f": [...], "m": [...], "method": {...}}
    cut_points: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    churn_params: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    config: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    steps: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    scored: Mapped[int] = mapped_column(Integer, server_default="0")
