"""decisions: no per-row foreign-key checks (deleting a parent still cascades), one index less

A purchase with twenty event-triggered campaigns writes twenty decision rows, and each
row ran two foreign-key checks: a `SELECT ... FOR KEY SHARE` of its campaign and of its
member. Measured per purchase (instructions of the PostgreSQL backend under cachegrind,
bench/profile_purchase's data with 20 campaigns), the two checks were a fifth of the
backend's work: -9 % without the campaign check, -19 % without both. Locking the
campaign rows is also what concurrent purchases contend on: every purchase key-share
locks the same twenty hot campaign rows (the budget UPDATE writes some of them), and
two lockers of one row make PostgreSQL create a MultiXact.

What the checks guarded is kept by what writes decisions:

- Campaigns are never deleted: they end (campaigns.service), and every path that
  writes a decision read its campaign first. Coupons, outbox messages and call tasks
  already refer to campaigns by id without a foreign key.
- Members are never deleted either (erasure keeps the row, service.members). The
  purchase path writes its decisions after the purchase's `transactions` row, whose
  foreign key has locked the member row for the rest of the transaction; sign-up
  decisions follow the member's own INSERT; batch runs already skip these checks
  (campaigns.engine._skip_row_key_checks) for the same reasons.

What the app reads relies on the parents existing (member views join decisions to
campaigns) and on deleting a parent taking its decisions along (tests and operators
deleting members): ON DELETE CASCADE becomes an AFTER DELETE trigger on each parent,
which costs nothing on the write path. Not covered any more: a decision inserted by a
transaction that runs while its campaign or member is being deleted by hand, and
TRUNCATE ... CASCADE of a parent (truncate `decisions` with it).

`ix_decisions_campaign_id_outcome` goes too: twenty entries per purchase (-2 % of the
backend's instructions) for lookups `uq_decisions_evaluation` (campaign_id, member_id,
period) serves by its first column. The queries by campaign (campaigns.insights: the
report, the uplift) also read `reason`, `member_id` or `decided_at`, so they visit the
heap either way; only their index scan reads a wider index.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# (parent table, decisions column, foreign key dropped)
_PARENTS = (
    ("campaigns", "campaign_id", "fk_decisions_campaign_id_campaigns"),
    ("members", "member_id", "fk_decisions_member_id_members"),
)


def upgrade() -> None:
    op.drop_index("ix_decisions_campaign_id_outcome", table_name="decisions")
    for parent, column, constraint in _PARENTS:
        op.drop_constraint(constraint, "decisions", type_="foreignkey")
        # uq_decisions_evaluation (campaign_id, ...) and ix_decisions_member_id_decided_at
        # (member_id, ...) find the rows to delete.
        op.execute(
            f"""
            CREATE FUNCTION patron_delete_{parent}_decisions() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                DELETE FROM decisions WHERE {column} = OLD.id;
                RETURN NULL;
            END
            $$
            """  # noqa: S608 - fixed table and column names
        )
        op.execute(
            f"CREATE TRIGGER delete_decisions AFTER DELETE ON {parent} "
            f"FOR EACH ROW EXECUTE FUNCTION patron_delete_{parent}_decisions()"
        )


def downgrade() -> None:
    for parent, column, constraint in _PARENTS:
        op.execute(f"DROP TRIGGER delete_decisions ON {parent}")
        op.execute(f"DROP FUNCTION patron_delete_{parent}_decisions()")
        op.create_foreign_key(constraint, "decisions", parent, [column], ["id"], ondelete="CASCADE")
    op.create_index(
        "ix_decisions_campaign_id_outcome", "decisions", ["campaign_id", "outcome"], unique=False
    )
