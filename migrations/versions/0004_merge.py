"""merge the scores (0003a) and custom segments (0003b) branches

Campaigns, coupons, tiers and messaging each add their own revision on top of
this one, so they can evolve independently; `patron db upgrade` goes to "heads".

Revision ID: 0004
Revises: 0003a, 0003b
"""

from __future__ import annotations

revision = "0004"
down_revision = ("0003a", "0003b")
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
