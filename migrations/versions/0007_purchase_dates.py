"""purchase days kept per member; the time index of transactions covers the daily ageing

- `member_stats.purchase_dates`: the member's distinct local purchase days, sorted. The
  purchase path adds each purchase's day, so the daily refresh derives purchase_days and
  the median gap of the members who bought from this array instead of reading all their
  transactions again (one random heap read per purchase when the table is in member
  order). NULL means "not known yet" (rows written before this revision, purchases made
  before the first window state): the refresh then reads the transactions once.
- `ix_transactions_occurred_at` INCLUDEs the columns the daily ageing reads, so it is an
  index-only scan of one day per window instead of one heap page per purchase.
- `ix_members_not_active`: the few members who are not active (erased), so the scoring
  steps leave them out by an anti-join instead of reading every member row.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

AGEING_COLUMNS = ["member_id", "kind", "amount", "refunded_amount"]


def upgrade() -> None:
    op.add_column(
        "member_stats",
        sa.Column("purchase_dates", postgresql.ARRAY(sa.Date()), nullable=True),
    )
    op.drop_index("ix_transactions_occurred_at", table_name="transactions")
    op.create_index(
        "ix_transactions_occurred_at",
        "transactions",
        ["occurred_at"],
        unique=False,
        postgresql_include=AGEING_COLUMNS,
    )
    op.create_index(
        "ix_members_not_active",
        "members",
        ["id"],
        unique=False,
        postgresql_where=sa.text("status <> 'active'"),
    )


def downgrade() -> None:
    op.drop_index("ix_members_not_active", table_name="members")
    op.drop_index("ix_transactions_occurred_at", table_name="transactions")
    op.create_index("ix_transactions_occurred_at", "transactions", ["occurred_at"], unique=False)
    op.drop_column("member_stats", "purchase_dates")
