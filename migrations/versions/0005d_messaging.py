"""messaging: outbox messages, templates per channel and locale, call-centre tasks

Revision ID: 0005d
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005d"
down_revision = "0004"
branch_labels = None
depends_on = None

DUE = "status IN ('queued', 'deferred') AND dispatched_at IS NULL"
DISPATCHED = "status IN ('queued', 'deferred') AND dispatched_at IS NOT NULL"
CONTACTS = "kind = 'marketing' AND status IN ('sending', 'sent') AND contacted_at IS NOT NULL"


def upgrade() -> None:
    op.create_table(
        "outbox_messages",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("campaign_id", sa.BigInteger(), nullable=True),
        sa.Column("decision_id", sa.BigInteger(), nullable=True),
        sa.Column("coupon_id", sa.BigInteger(), nullable=True),
        sa.Column("template", sa.Text(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=True),
        sa.Column("kind", sa.Text(), server_default="marketing", nullable=False),
        sa.Column("status", sa.Text(), server_default="queued", nullable=False),
        sa.Column(
            "not_before",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "payload",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_channel", sa.Text(), nullable=True),
        sa.Column("contacted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("provider_id", sa.Text(), nullable=True),
        sa.Column("overrides", postgresql.ARRAY(sa.Text()), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "kind IN ('marketing', 'transactional')", name=op.f("ck_outbox_messages_kind")
        ),
        sa.CheckConstraint(
            "status IN ('queued', 'sending', 'sent', 'failed', 'deferred', 'suppressed', 'dead')",
            name=op.f("ck_outbox_messages_status"),
        ),
        sa.ForeignKeyConstraint(
            ["member_id"], ["members.id"], name=op.f("fk_outbox_messages_member_id_members")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_messages")),
        sa.UniqueConstraint("decision_id", "template", name="uq_outbox_messages_decision_template"),
    )
    op.create_index("ix_outbox_messages_member_id_id", "outbox_messages", ["member_id", "id"])
    op.create_index(
        "ix_outbox_messages_campaign_id_status", "outbox_messages", ["campaign_id", "status"]
    )
    op.create_index("ix_outbox_messages_coupon_id", "outbox_messages", ["coupon_id"])
    op.create_index("ix_outbox_messages_status_id", "outbox_messages", ["status", "id"])
    op.create_index(
        "ix_outbox_messages_due", "outbox_messages", ["not_before"], postgresql_where=sa.text(DUE)
    )
    op.create_index(
        "ix_outbox_messages_dispatched",
        "outbox_messages",
        ["dispatched_at"],
        postgresql_where=sa.text(DISPATCHED),
    )
    op.create_index(
        "ix_outbox_messages_lease",
        "outbox_messages",
        ["lease_until"],
        postgresql_where=sa.text("status = 'sending'"),
    )
    op.create_index(
        "ix_outbox_messages_contacts",
        "outbox_messages",
        ["member_id", "sent_channel", "contacted_at"],
        postgresql_where=sa.text(CONTACTS),
    )

    op.create_table(
        "message_templates",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("locale", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.Text(), server_default="", nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("updated_by", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_message_templates")),
        sa.UniqueConstraint("name", "channel", "locale", name="uq_message_templates_variant"),
    )

    op.create_table(
        "call_tasks",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("campaign_id", sa.BigInteger(), nullable=True),
        sa.Column("subject", sa.Text(), server_default="", nullable=False),
        sa.Column("script", sa.Text(), server_default="", nullable=False),
        sa.Column("phone", sa.String(length=32), nullable=True),
        sa.Column("status", sa.String(length=16), server_default="open", nullable=False),
        sa.Column("claimed_by", sa.String(length=200), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('open', 'claimed', 'closed')", name=op.f("ck_call_tasks_status")
        ),
        sa.CheckConstraint(
            "outcome IS NULL OR outcome IN ('reached', 'no_answer', 'declined', 'wrong_number')",
            name=op.f("ck_call_tasks_outcome"),
        ),
        sa.ForeignKeyConstraint(
            ["member_id"], ["members.id"], name=op.f("fk_call_tasks_member_id_members")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_call_tasks")),
        sa.UniqueConstraint("message_id", name=op.f("uq_call_tasks_message_id")),
    )
    op.create_index("ix_call_tasks_status_id", "call_tasks", ["status", "id"])
    op.create_index("ix_call_tasks_member_id", "call_tasks", ["member_id"])


def downgrade() -> None:
    op.drop_table("call_tasks")
    op.drop_table("message_templates")
    op.drop_table("outbox_messages")
