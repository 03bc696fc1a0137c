"""churn predictions in their own table, member_predictions (out of member_scores)

The churn step replaces the whole table every run (segments/predict.py) instead of
updating ~90 % of member_scores in place, and no longer shares rows with the lifecycle
and RFM steps, so it can run beside them. Also merges the four 0005 branches.

Revision ID: 0006
Revises: 0005a, 0005b, 0005c, 0005d
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = ("0005a", "0005b", "0005c", "0005d")
branch_labels = None
depends_on = None

COLUMNS = ("p_alive", "expected_purchases_90d", "expected_value")


def upgrade() -> None:
    # The column order is the one segments/predict.py creates the table in.
    op.create_table(
        "member_predictions",
        sa.Column("member_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("as_of", sa.Date(), nullable=False),
        sa.Column("p_alive", sa.Numeric(precision=6, scale=5), nullable=True),
        sa.Column("expected_purchases_90d", sa.Numeric(precision=10, scale=4), nullable=True),
        sa.Column("expected_value", sa.Numeric(precision=14, scale=2), nullable=True),
        sa.PrimaryKeyConstraint("member_id", name=op.f("pk_member_predictions")),
    )
    # The date of the last churn run stands for all rows (member_scores.as_of is the date
    # any score of the row last changed); without a run, the row's own date.
    op.execute(
        """
        INSERT INTO member_predictions
        SELECT member_id,
               COALESCE((SELECT max(as_of) FROM score_runs WHERE steps ? 'churn'), as_of),
               p_alive, expected_purchases_90d, expected_value
        FROM member_scores
        WHERE p_alive IS NOT NULL OR expected_purchases_90d IS NOT NULL
           OR expected_value IS NOT NULL
        """
    )
    for column in COLUMNS:
        op.drop_column("member_scores", column)


def downgrade() -> None:
    op.add_column(
        "member_scores", sa.Column("p_alive", sa.Numeric(precision=6, scale=5), nullable=True)
    )
    op.add_column(
        "member_scores",
        sa.Column("expected_purchases_90d", sa.Numeric(precision=10, scale=4), nullable=True),
    )
    op.add_column(
        "member_scores",
        sa.Column("expected_value", sa.Numeric(precision=14, scale=2), nullable=True),
    )
    op.execute(
        """
        UPDATE member_scores sc SET p_alive = p.p_alive,
               expected_purchases_90d = p.expected_purchases_90d,
               expected_value = p.expected_value
        FROM member_predictions p WHERE p.member_id = sc.member_id
        """
    )
    op.drop_table("member_predictions")
