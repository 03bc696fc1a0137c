"""tiers: the ladder (seeded silver / gold / diamond), member tier dates, tier history

Revision ID: 0005c
Revises: 0004
"""

from __future__ import annotations

from decimal import Decimal

import sqlalchemy as sa
from alembic import op

revision = "0005c"
down_revision = "0004"
branch_labels = None
depends_on = None

# Rolling 12 months, CNY: spend OR number of purchases qualifies (campaigns/tiers.py).
SEED = [
    ("silver", 1, Decimal("2000.00"), 4),
    ("gold", 2, Decimal("8000.00"), 12),
    ("diamond", 3, Decimal("30000.00"), 36),
]


def upgrade() -> None:
    op.create_table(
        "tiers",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("min_spend_12m", sa.Numeric(14, 2), nullable=True),
        sa.Column("min_purchases_12m", sa.Integer(), nullable=True),
        sa.CheckConstraint("rank >= 1", name=op.f("ck_tiers_rank_positive")),
        sa.CheckConstraint(
            "min_spend_12m IS NOT NULL OR min_purchases_12m IS NOT NULL",
            name=op.f("ck_tiers_has_threshold"),
        ),
        sa.CheckConstraint(
            "(min_spend_12m IS NULL OR min_spend_12m >= 0)"
            " AND (min_purchases_12m IS NULL OR min_purchases_12m >= 1)",
            name=op.f("ck_tiers_threshold_sign"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tiers")),
        sa.UniqueConstraint("name", name=op.f("uq_tiers_name")),
        sa.UniqueConstraint("rank", name=op.f("uq_tiers_rank")),
    )
    op.create_table(
        "tier_ladder",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.BigInteger(), server_default=sa.text("1"), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("updated_by", sa.String(length=200), server_default="migration", nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_tier_ladder_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tier_ladder")),
    )
    op.create_table(
        "member_tiers",
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("tier_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("review_on", sa.Date(), nullable=True),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.id"],
            name=op.f("fk_member_tiers_member_id_members"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("member_id", name=op.f("pk_member_tiers")),
    )
    op.create_index("ix_member_tiers_review_on", "member_tiers", ["review_on"])
    op.create_table(
        "tier_changes",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("from_tier", sa.String(length=32), nullable=True),
        sa.Column("to_tier", sa.String(length=32), nullable=True),
        sa.Column("direction", sa.String(length=4), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("transaction_id", sa.BigInteger(), nullable=True),
        sa.Column("campaign_id", sa.BigInteger(), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=True),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("direction IN ('up', 'down')", name=op.f("ck_tier_changes_direction")),
        sa.CheckConstraint(
            "reason IN ('purchase', 'review', 'campaign', 'manual')",
            name=op.f("ck_tier_changes_reason"),
        ),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.id"],
            name=op.f("fk_tier_changes_member_id_members"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tier_changes")),
    )
    op.create_index(
        "ix_tier_changes_member_id_changed_at", "tier_changes", ["member_id", "changed_at"]
    )
    op.create_index(
        "ix_tier_changes_campaign_id",
        "tier_changes",
        ["campaign_id"],
        postgresql_where=sa.text("campaign_id IS NOT NULL"),
    )
    op.execute("INSERT INTO tier_ladder (id, version) VALUES (1, 1)")
    tiers = sa.table(
        "tiers",
        sa.column("name", sa.String),
        sa.column("rank", sa.Integer),
        sa.column("min_spend_12m", sa.Numeric),
        sa.column("min_purchases_12m", sa.Integer),
    )
    op.bulk_insert(
        tiers,
        [{"name": n, "rank": r, "min_spend_12m": s, "min_purchases_12m": p} for n, r, s, p in SEED],
    )


def downgrade() -> None:
    op.drop_index("ix_tier_changes_campaign_id", table_name="tier_changes")
    op.drop_index("ix_tier_changes_member_id_changed_at", table_name="tier_changes")
    op.drop_table("tier_changes")
    op.drop_index("ix_member_tiers_review_on", table_name="member_tiers")
    op.drop_table("member_tiers")
    op.drop_table("tier_ladder")
    op.drop_table("tiers")
