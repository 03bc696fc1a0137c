"""scores: rolling windows on member_stats, member scores, lifecycle history, RFM snapshots

Revision ID: 0003a
Revises: 0002
Create Date: 2026-11-22 16:35:53.768821
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003a"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rfm_snapshots",
        sa.Column("month", sa.Date(), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("r", sa.SmallInteger(), nullable=False),
        sa.Column("f", sa.SmallInteger(), nullable=False),
        sa.Column("m", sa.SmallInteger(), nullable=False),
        sa.Column("rfm_segment", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("month", "member_id", name="pk_rfm_snapshots"),
    )
    op.create_table(
        "score_runs",
        sa.Column("as_of", sa.Date(), nullable=False),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "cut_points",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default="{}",
            nullable=False,
        ),
        sa.Column(
            "churn_params",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default="{}",
            nullable=False,
        ),
        sa.Column(
            "config", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False
        ),
        sa.Column(
            "steps", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False
        ),
        sa.Column("scored", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("as_of", name=op.f("pk_score_runs")),
    )
    op.create_table(
        "stats_windows",
        sa.Column("id", sa.SmallInteger(), nullable=False),
        sa.Column("as_of", sa.Date(), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("start_30d", sa.DateTime(timezone=True), nullable=False),
        sa.Column("start_90d", sa.DateTime(timezone=True), nullable=False),
        sa.Column("start_365d", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("id = 1", name=op.f("ck_stats_windows_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stats_windows")),
    )
    op.create_table(
        "lifecycle_changes",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("changed_on", sa.Date(), nullable=False),
        sa.Column("from_stage", sa.String(length=16), nullable=True),
        sa.Column("to_stage", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.id"],
            name=op.f("fk_lifecycle_changes_member_id_members"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lifecycle_changes")),
        sa.UniqueConstraint("member_id", "changed_on", name="uq_lifecycle_changes_member_day"),
    )
    op.create_index(
        "ix_lifecycle_changes_to_stage_changed_on",
        "lifecycle_changes",
        ["to_stage", "changed_on", "member_id"],
        unique=False,
    )
    op.create_table(
        "member_scores",
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("as_of", sa.Date(), nullable=False),
        sa.Column("r", sa.SmallInteger(), nullable=True),
        sa.Column("f", sa.SmallInteger(), nullable=True),
        sa.Column("m", sa.SmallInteger(), nullable=True),
        sa.Column("rfm_segment", sa.String(length=32), nullable=True),
        sa.Column("frequency", sa.Integer(), nullable=True),
        sa.Column("monetary", sa.Numeric(precision=14, scale=2), nullable=True),
        sa.Column("lifecycle_stage", sa.String(length=16), nullable=False),
        sa.Column("stage_since", sa.Date(), nullable=False),
        sa.Column("p_alive", sa.Numeric(precision=6, scale=5), nullable=True),
        sa.Column("expected_purchases_90d", sa.Numeric(precision=10, scale=4), nullable=True),
        sa.Column("expected_value", sa.Numeric(precision=14, scale=2), nullable=True),
        sa.CheckConstraint(
            "lifecycle_stage IN ('new', 'active', 'at_risk', 'dormant', 'lost', 'never_purchased')",
            name=op.f("ck_member_scores_lifecycle_stage"),
        ),
        sa.CheckConstraint(
            "rfm_segment IN ('champions', 'loyal', 'potential_loyalist', 'new', 'promising', 'need_attention', 'about_to_sleep', 'at_risk', 'cant_lose', 'hibernating', 'lost')",
            name=op.f("ck_member_scores_rfm_segment"),
        ),
        sa.CheckConstraint(
            "r BETWEEN 1 AND 5 AND f BETWEEN 1 AND 5 AND m BETWEEN 1 AND 5",
            name=op.f("ck_member_scores_rfm"),
        ),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.id"],
            name=op.f("fk_member_scores_member_id_members"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("member_id", name=op.f("pk_member_scores")),
        postgresql_with={"fillfactor": 70},
    )
    op.add_column(
        "member_stats",
        sa.Column("purchases_30d", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column(
        "member_stats",
        sa.Column("purchases_90d", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column(
        "member_stats",
        sa.Column("purchases_365d", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column(
        "member_stats",
        sa.Column(
            "spend_30d",
            sa.Numeric(precision=14, scale=2),
            server_default=sa.text("0"),
            nullable=False,
        ),
    )
    op.add_column(
        "member_stats",
        sa.Column(
            "spend_90d",
            sa.Numeric(precision=14, scale=2),
            server_default=sa.text("0"),
            nullable=False,
        ),
    )
    op.add_column(
        "member_stats",
        sa.Column(
            "spend_365d",
            sa.Numeric(precision=14, scale=2),
            server_default=sa.text("0"),
            nullable=False,
        ),
    )
    op.add_column(
        "member_stats",
        sa.Column("purchase_days", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column(
        "member_stats",
        sa.Column("median_interpurchase_days", sa.Numeric(precision=8, scale=1), nullable=True),
    )
    op.create_index("ix_transactions_occurred_at", "transactions", ["occurred_at"], unique=False)


def downgrade() -> None:

    op.drop_index("ix_transactions_occurred_at", table_name="transactions")
    op.drop_column("member_stats", "median_interpurchase_days")
    op.drop_column("member_stats", "purchase_days")
    op.drop_column("member_stats", "spend_365d")
    op.drop_column("member_stats", "spend_90d")
    op.drop_column("member_stats", "spend_30d")
    op.drop_column("member_stats", "purchases_365d")
    op.drop_column("member_stats", "purchases_90d")
    op.drop_column("member_stats", "purchases_30d")
    op.drop_table("member_scores")
    op.drop_index("ix_lifecycle_changes_to_stage_changed_on", table_name="lifecycle_changes")
    op.drop_table("lifecycle_changes")
    op.drop_table("stats_windows")
    op.drop_table("score_runs")
    op.drop_table("rfm_snapshots")
