"""incremental refresh of custom segments: each shared refresh records its snapshot

- `segment_refreshes.snapshot`: the `pg_current_snapshot()` the shared refresh of
  dynamic segments evaluated, as text. The next daily refresh compares it with the
  `xmin` of each member and statistics row: rows not written since need no comparison
  with the stored memberships, only the rules whose outcome moves with the date are
  re-evaluated for them (segments.custom, "Incremental refresh").
- `segment_refreshes.mode`: "full" or "incremental", shown with the refresh.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("segment_refreshes", sa.Column("snapshot", sa.Text(), nullable=True))
    op.add_column("segment_refreshes", sa.Column("mode", sa.String(16), nullable=True))


def downgrade() -> None:
    op.drop_column("segment_refreshes", "mode")
    op.drop_column("segment_refreshes", "snapshot")
