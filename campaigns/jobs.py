"""RQ jobs of campaigns: the scheduler's tick (scheduled, calendar and segment-entry runs)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from campaigns.runs import tick
from service.jobs import job


@job
def campaign_tick_job(now_iso: str | None = None) -> list[dict[str, Any]]:
    """Run the batch campaigns due now; idempotent per run key, so ticks may overlap."""
    from segments.config import ScoringConfig
    from service.db import get_db

    now = datetime.fromisoformat(now_iso) if now_iso else datetime.now(UTC)
    zone = ScoringConfig.from_env().timezone
    return tick(get_db().unit_of_work, now, zone)
