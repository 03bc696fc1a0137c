"""Tables of custom segments: definitions, versions, current memberships, history, refresh runs."""

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
    PrimaryKeyConstraint,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy import text as sql_text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from service.models import Base


class SegmentKind(enum.StrEnum):
    DYNAMIC = "dynamic"  # defined by a rule, refreshed
    STATIC = "static"  # an uploaded list of members


class SegmentStatus(enum.StrEnum):
    ACTIVE = "active"
    ARCHIVED = "archived"


class ChangeKind(enum.StrEnum):
    ENTERED = "entered"
    LEFT = "left"


class CustomSegment(Base):
    """A named segment; its definition lives in immutable versions."""

    __tablename__ = "segments"
    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    # A slug, never renamed: rules refer to segments by name (`segment in ("vip")`).
    name: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), server_default=SegmentStatus.ACTIVE.value)
    current_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    created_by: Mapped[str] = mapped_column(String(200))
    archived_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint("kind IN ('dynamic', 'static')", name="kind"),
        CheckConstraint("status IN ('active', 'archived')", name="status"),
    )


class SegmentVersion(Base):
    """One immutable definition of a segment; an edit adds the next version."""

    __tablename__ = "segment_versions"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    segment_id: Mapped[int] = mapped_column(ForeignKey("segments.id"))
    version: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(Text, server_default="")
    # The normalised rule tree, its text and content hash (None for static segments).
    rule: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    text: Mapped[str | None] = mapped_column(Text)
    content_hash: Mapped[str | None] = mapped_column(String(64))
    # Fields the rule reads: which segments a purchase can change is decided from these.
    fields: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=sql_text("'{}'"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    created_by: Mapped[str] = mapped_column(String(200))

    __table_args__ = (
        UniqueConstraint("segment_id", "version", name="uq_segment_versions_segment_version"),
        CheckConstraint("version >= 1", name="version_positive"),
    )


# The two high-volume tables below carry no foreign keys on purpose: a first refresh
# inserts a million rows per segment, and a per-row RI trigger would double its cost.
# Members are never deleted (erasure anonymises), and segments are archived, not deleted.


class SegmentMembership(Base):
    """Who is in a segment now (one row per segment × member)."""

    __tablename__ = "segment_memberships"
    segment_id: Mapped[int] = mapped_column(Integer)
    member_id: Mapped[int] = mapped_column(BigInteger)
    entered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    version_id: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        PrimaryKeyConstraint("segment_id", "member_id", name="pk_segment_memberships"),
        # "Which segments is this member in" (the rule field, the purchase path).
        Index("ix_segment_memberships_member_id", "member_id"),
    )


class SegmentMembershipChange(Base):
    """History: a member entered or left a segment, at which instant, under which version."""

    __tablename__ = "segment_membership_changes"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    segment_id: Mapped[int] = mapped_column(Integer)
    member_id: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(8))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    version_id: Mapped[int] = mapped_column(BigInteger)
    # The refresh run that made the change; None for purchases and uploads.
    refresh_id: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        CheckConstraint("kind IN ('entered', 'left')", name="kind"),
        Index("ix_segment_membership_changes_segment_at", "segment_id", "at", "id"),
    )


class SegmentRefresh(Base):
    """One refresh of one segment as of an instant; unique, so a rerun is a no-op."""

    __tablename__ = "segment_refreshes"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    segment_id: Mapped[int] = mapped_column(ForeignKey("segments.id"))
    as_of: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    version_id: Mapped[int] = mapped_column(BigInteger)
    members: Mapped[int] = mapped_column(BigInteger, server_default=sql_text("0"))
    entered: Mapped[int] = mapped_column(BigInteger, server_default=sql_text("0"))
    left: Mapped[int] = mapped_column(BigInteger, server_default=sql_text("0"))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    seconds: Mapped[float | None] = mapped_column()

    __table_args__ = (
        UniqueConstraint("segment_id", "as_of", name="uq_segment_refreshes_segment_as_of"),
    )
