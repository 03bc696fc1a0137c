"""coupons: templates, coupons, bulk batches, redemptions, and patron_coupon_code()

Revision ID: 0005b
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from campaigns.codes import sql_function_body

revision = "0005b"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "coupon_templates",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("percent_off", sa.Numeric(precision=5, scale=2), nullable=True),
        sa.Column("amount_off", sa.Numeric(precision=14, scale=2), nullable=True),
        sa.Column("free_item_sku", sa.String(length=64), nullable=True),
        sa.Column("face_value", sa.Numeric(precision=14, scale=2), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column(
            "min_spend",
            sa.Numeric(precision=14, scale=2),
            server_default=sa.text("0"),
            nullable=False,
        ),
        sa.Column("valid_days", sa.Integer(), nullable=True),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=True),
        sa.Column("valid_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("weekdays", postgresql.ARRAY(sa.SmallInteger()), nullable=True),
        sa.Column("hours_from", sa.Time(), nullable=True),
        sa.Column("hours_until", sa.Time(), nullable=True),
        sa.Column("store_codes", postgresql.ARRAY(sa.Text()), nullable=True),
        sa.Column("region_codes", postgresql.ARRAY(sa.Text()), nullable=True),
        sa.Column("archived", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.CheckConstraint(
            "(kind = 'percent') = (percent_off IS NOT NULL) AND (kind = 'amount') = (amount_off IS NOT NULL) AND (kind = 'free_item') = (free_item_sku IS NOT NULL)",
            name=op.f("ck_coupon_templates_kind_value"),
        ),
        sa.CheckConstraint(
            "kind IN ('percent', 'amount', 'free_item')", name=op.f("ck_coupon_templates_kind")
        ),
        sa.CheckConstraint(
            "(hours_from IS NULL) = (hours_until IS NULL) AND hours_from <> hours_until",
            name=op.f("ck_coupon_templates_hours_window"),
        ),
        sa.CheckConstraint(
            "(valid_days IS NOT NULL AND valid_from IS NULL AND valid_until IS NULL) OR (valid_days IS NULL AND valid_from IS NOT NULL AND valid_until IS NOT NULL AND valid_from < valid_until)",
            name=op.f("ck_coupon_templates_validity"),
        ),
        sa.CheckConstraint(
            "amount_off > 0 AND amount_off = face_value",
            name=op.f("ck_coupon_templates_amount_is_face"),
        ),
        sa.CheckConstraint(
            "archived = (archived_at IS NOT NULL)", name=op.f("ck_coupon_templates_archived_at")
        ),
        sa.CheckConstraint(
            "cardinality(region_codes) > 0", name=op.f("ck_coupon_templates_region_codes_nonempty")
        ),
        sa.CheckConstraint(
            "cardinality(store_codes) > 0", name=op.f("ck_coupon_templates_store_codes_nonempty")
        ),
        sa.CheckConstraint("face_value > 0", name=op.f("ck_coupon_templates_face_value_positive")),
        sa.CheckConstraint(
            "min_spend >= 0", name=op.f("ck_coupon_templates_min_spend_nonnegative")
        ),
        sa.CheckConstraint(
            "percent_off > 0 AND percent_off <= 100", name=op.f("ck_coupon_templates_percent_range")
        ),
        sa.CheckConstraint(
            "valid_days BETWEEN 1 AND 3660", name=op.f("ck_coupon_templates_valid_days_range")
        ),
        sa.CheckConstraint(
            "weekdays IS NULL OR (cardinality(weekdays) BETWEEN 1 AND 7 AND weekdays <@ ARRAY[1, 2, 3, 4, 5, 6, 7]::smallint[])",
            name=op.f("ck_coupon_templates_weekdays_iso"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_coupon_templates")),
        sa.UniqueConstraint("code", name=op.f("uq_coupon_templates_code")),
    )
    op.create_table(
        "coupon_batches",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("template_id", sa.BigInteger(), nullable=False),
        sa.Column("requested", sa.Integer(), nullable=False),
        sa.Column("generated", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("label", sa.String(length=200), server_default="", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(status = 'done') = (finished_at IS NOT NULL)", name=op.f("ck_coupon_batches_finished")
        ),
        sa.CheckConstraint("status IN ('pending', 'done')", name=op.f("ck_coupon_batches_status")),
        sa.CheckConstraint(
            "requested BETWEEN 1 AND 10000000", name=op.f("ck_coupon_batches_requested_range")
        ),
        sa.ForeignKeyConstraint(
            ["template_id"],
            ["coupon_templates.id"],
            name=op.f("fk_coupon_batches_template_id_coupon_templates"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_coupon_batches")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_coupon_batches_idempotency_key")),
    )
    op.create_index(
        op.f("ix_coupon_batches_template_id"), "coupon_batches", ["template_id"], unique=False
    )
    op.create_table(
        "coupons",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("template_id", sa.BigInteger(), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=True),
        sa.Column("campaign_id", sa.BigInteger(), nullable=True),
        sa.Column("decision_id", sa.BigInteger(), nullable=True),
        sa.Column("batch_id", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(length=16), server_default="issued", nullable=False),
        sa.Column("face_value", sa.Numeric(precision=14, scale=2), nullable=False),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("valid_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "issued_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("redeemed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("voided_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(status = 'redeemed') = (redeemed_at IS NOT NULL)", name=op.f("ck_coupons_redeemed_at")
        ),
        sa.CheckConstraint(
            "(status = 'void') = (voided_at IS NOT NULL)", name=op.f("ck_coupons_voided_at")
        ),
        sa.CheckConstraint(
            "status IN ('issued', 'redeemed', 'void')", name=op.f("ck_coupons_status")
        ),
        sa.CheckConstraint("face_value > 0", name=op.f("ck_coupons_face_value_positive")),
        sa.CheckConstraint("valid_from < valid_until", name=op.f("ck_coupons_validity")),
        sa.ForeignKeyConstraint(
            ["member_id"], ["members.id"], name=op.f("fk_coupons_member_id_members")
        ),
        sa.ForeignKeyConstraint(
            ["template_id"],
            ["coupon_templates.id"],
            name=op.f("fk_coupons_template_id_coupon_templates"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_coupons")),
        sa.UniqueConstraint("code", name=op.f("uq_coupons_code")),
    )
    op.create_index(
        "ix_coupons_batch_id",
        "coupons",
        ["batch_id"],
        unique=False,
        postgresql_where=sa.text("batch_id IS NOT NULL"),
    )
    op.create_index(
        "ix_coupons_campaign_id",
        "coupons",
        ["campaign_id"],
        unique=False,
        postgresql_where=sa.text("campaign_id IS NOT NULL"),
    )
    op.create_index(
        "ix_coupons_member_id_issued_at",
        "coupons",
        ["member_id", "issued_at"],
        unique=False,
        postgresql_where=sa.text("member_id IS NOT NULL"),
    )
    op.create_index("uq_coupons_decision_id", "coupons", ["decision_id"], unique=True)
    op.create_table(
        "coupon_redemptions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column("request_hash", sa.LargeBinary(), nullable=False),
        sa.Column("coupon_id", sa.BigInteger(), nullable=True),
        sa.Column("member_id", sa.BigInteger(), nullable=True),
        sa.Column("store_id", sa.Integer(), nullable=False),
        sa.Column("transaction_id", sa.String(length=64), nullable=True),
        sa.Column("order_amount", sa.Numeric(precision=14, scale=2), nullable=False),
        sa.Column("discount", sa.Numeric(precision=14, scale=2), nullable=True),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("response", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("rolled_back_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rollback_reason", sa.String(length=16), nullable=True),
        sa.CheckConstraint(
            "(status = 'rolled_back') = (rolled_back_at IS NOT NULL)",
            name=op.f("ck_coupon_redemptions_rolled_back_at"),
        ),
        sa.CheckConstraint(
            "rollback_reason IN ('refund', 'void')",
            name=op.f("ck_coupon_redemptions_rollback_reason"),
        ),
        sa.CheckConstraint(
            "status = 'pending' OR (coupon_id IS NOT NULL AND discount IS NOT NULL AND response IS NOT NULL)",
            name=op.f("ck_coupon_redemptions_complete"),
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'redeemed', 'rolled_back')",
            name=op.f("ck_coupon_redemptions_status"),
        ),
        sa.CheckConstraint(
            "order_amount >= 0 AND discount >= 0", name=op.f("ck_coupon_redemptions_amounts")
        ),
        sa.ForeignKeyConstraint(
            ["coupon_id"], ["coupons.id"], name=op.f("fk_coupon_redemptions_coupon_id_coupons")
        ),
        sa.ForeignKeyConstraint(
            ["member_id"], ["members.id"], name=op.f("fk_coupon_redemptions_member_id_members")
        ),
        sa.ForeignKeyConstraint(
            ["store_id"], ["stores.id"], name=op.f("fk_coupon_redemptions_store_id_stores")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_coupon_redemptions")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_coupon_redemptions_idempotency_key")),
    )
    op.create_index(
        "ix_coupon_redemptions_coupon_id", "coupon_redemptions", ["coupon_id"], unique=False
    )
    op.create_index(
        "ix_coupon_redemptions_transaction_id",
        "coupon_redemptions",
        ["transaction_id"],
        unique=False,
        postgresql_where=sa.text("transaction_id IS NOT NULL"),
    )
    op.create_index(
        "uq_coupon_redemptions_live_coupon",
        "coupon_redemptions",
        ["coupon_id"],
        unique=True,
        postgresql_where=sa.text("status = 'redeemed'"),
    )

    # Codes of the scheme in campaigns/codes.py, for set-based issuing:
    # INSERT INTO coupons (code, ...) SELECT patron_coupon_code(), ... FROM ...
    op.execute(
        "CREATE FUNCTION patron_coupon_code() RETURNS text LANGUAGE plpgsql VOLATILE"
        " PARALLEL SAFE AS $fn$" + sql_function_body() + "$fn$"
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS patron_coupon_code()")
    op.drop_table("coupon_redemptions")
    op.drop_table("coupons")
    op.drop_table("coupon_batches")
    op.drop_table("coupon_templates")
