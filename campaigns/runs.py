"""Batch runs: scheduled, calendar and segment-entry campaigns, set-based and idempotent.

A run is keyed (`campaign_runs` is unique per campaign × run key: the local date of a
daily schedule, the cron fire time, the calendar date), so the scheduler may tick
twice, a worker may retry, and nothing is decided twice.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from croniter import croniter
from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from campaigns.engine import compile_with_template, run_batch
from campaigns.models import Campaign, CampaignRun, Status
from segments.models_custom import CustomSegment, SegmentMembershipChange
from service.errors import Conflict

log = logging.getLogger(__name__)


def _claim_run(session: Session, row: Campaign, run_key: str) -> int | None:
    stmt = (
        insert(CampaignRun)
        .values(campaign_id=row.id, run_key=run_key, campaign_version=row.version)
        .on_conflict_do_nothing(constraint="uq_campaign_runs_key")
        .returning(CampaignRun.id)
    )
    return session.execute(stmt).scalar()


def run_campaign(
    session: Session,
    campaign_id: int,
    *,
    run_key: str,
    now: datetime,
    trigger: str = "manual",
    members: Any = None,
) -> dict[str, Any]:
    """Run one batch evaluation; a second run with the same key returns the first's counts."""
    row = session.scalars(
        select(Campaign).where(Campaign.id == campaign_id).with_for_update()
    ).first()
    if row is None:
        raise LookupError(f"campaign {campaign_id} does not exist")
    if row.status != Status.ACTIVE.value:
        raise Conflict(
            f"campaign {row.name!r} is {row.status}; only active campaigns run",
            errors={"status": [row.status]},
        )
    run_id = _claim_run(session, row, run_key)
    if run_id is None:
        done = session.execute(
            select(CampaignRun.counts, CampaignRun.finished_at).where(
                CampaignRun.campaign_id == row.id, CampaignRun.run_key == run_key
            )
        ).one()
        return {"run_key": run_key, "replayed": True, **done.counts}
    # The campaign lock is not needed for the long part; run_batch re-locks for the budget.
    compiled = compile_with_template(session, row)
    started = datetime.now().astimezone()
    counts: dict[str, Any] = run_batch(
        session, compiled, now=now, period=f"run:{run_key}", trigger=trigger, members=members
    )
    counts["seconds"] = round((datetime.now().astimezone() - started).total_seconds(), 3)
    session.execute(
        text(
            "UPDATE campaign_runs SET finished_at = now(), counts = CAST(:c AS jsonb) "
            "WHERE id = :id"
        ),
        {"c": json.dumps(counts), "id": run_id},
    )
    log.info("campaign %s run %s: %s", row.name, run_key, counts)
    return {"run_key": run_key, "replayed": False, **counts}


def due_runs(session: Session, now: datetime, zone: str) -> list[tuple[int, str, str]]:
    """(campaign id, run key, trigger) of the scheduled and calendar runs due at `now`.

    Times are local to the business time zone (PATRON_TIMEZONE). A daily run is due
    from its time until the end of that local day; a cron run from its fire time for
    24 hours — so a scheduler that was down catches up once, never twice.
    """
    local = now.astimezone(ZoneInfo(zone))
    rows = session.scalars(
        select(Campaign)
        .where(
            Campaign.status == Status.ACTIVE.value,
            Campaign.trigger_type.in_(["schedule", "calendar"]),
        )
        .order_by(Campaign.priority.desc(), Campaign.id)
    ).all()
    due: list[tuple[int, str, str]] = []
    for row in rows:
        if (row.valid_from and now < row.valid_from) or (
            row.valid_until and now >= row.valid_until
        ):
            continue
        trigger = row.definition["trigger"]
        key: str | None = None
        if trigger["type"] == "schedule" and trigger.get("daily_at"):
            if local.time() >= time.fromisoformat(trigger["daily_at"]):
                key = local.date().isoformat()
        elif trigger["type"] == "schedule":
            fired = croniter(trigger["cron"], local).get_prev(datetime)
            if local - fired < timedelta(hours=24):
                key = fired.isoformat()
        else:
            from campaigns.calendar_dates import occurs_on

            at = time.fromisoformat(trigger.get("at") or "09:00")
            if local.time() >= at and any(occurs_on(n, local.date()) for n in trigger["dates"]):
                key = local.date().isoformat()
        if key is not None:
            due.append((row.id, key, trigger["type"]))
    if not due:
        return []
    done = set(
        session.execute(
            select(CampaignRun.campaign_id, CampaignRun.run_key).where(
                CampaignRun.campaign_id.in_([d[0] for d in due])
            )
        ).all()
    )
    return [d for d in due if (d[0], d[1]) not in done]


def segment_entry_runs(session: Session, now: datetime) -> list[tuple[int, Any, str]]:
    """For each active segment-entry campaign: its entrants not yet evaluated, as a Select.

    Entrants are members who entered the segment since the campaign was last run (or
    activated) and have no decision of this campaign since they entered — a member
    whose purchase put them in the segment was already decided in that request.
    """
    rows = session.scalars(
        select(Campaign).where(
            Campaign.status == Status.ACTIVE.value, Campaign.trigger_type == "segment_entry"
        )
    ).all()
    out: list[tuple[int, Any, str]] = []
    for row in rows:
        since = session.scalar(
            select(CampaignRun.started_at)
            .where(CampaignRun.campaign_id == row.id)
            .order_by(CampaignRun.started_at.desc())
            .limit(1)
        ) or (row.approved_at or row.updated_at)
        seg = select(CustomSegment.id).where(
            CustomSegment.name == row.definition["trigger"]["segment"]
        )
        ch = SegmentMembershipChange
        entrants = select(ch.member_id).where(
            ch.segment_id.in_(seg.scalar_subquery()),
            ch.kind == "entered",
            ch.at >= since,
            ch.at <= now,
            text(
                "NOT EXISTS (SELECT 1 FROM decisions d WHERE d.campaign_id = :cid_entry "
                "AND d.member_id = segment_membership_changes.member_id "
                "AND d.decided_at >= segment_membership_changes.at)"
            ).bindparams(cid_entry=row.id),
        )
        out.append((row.id, entrants, f"entry:{now.isoformat()}"))
    return out


def tick(session_factory: Any, now: datetime, zone: str) -> list[dict[str, Any]]:
    """Run every due batch campaign, higher priority first, each in its own transaction."""
    results: list[dict[str, Any]] = []
    with session_factory() as session:
        due = due_runs(session, now, zone)
        entries = segment_entry_runs(session, now)
    for campaign_id, key, trigger in due:
        with session_factory() as session:
            results.append(
                {
                    "campaign_id": campaign_id,
                    **run_campaign(session, campaign_id, run_key=key, now=now, trigger=trigger),
                }
            )
    for campaign_id, members, key in entries:
        with session_factory() as session:
            results.append(
                {
                    "campaign_id": campaign_id,
                    **run_campaign(
                        session,
                        campaign_id,
                        run_key=key,
                        now=now,
                        trigger="segment_entry",
                        members=members,
                    ),
                }
            )
    return results
