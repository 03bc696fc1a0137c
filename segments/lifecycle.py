"""Lifecycle stages from day thresholds (and a personal variant), their history, early warning.

Stage as of date D, with d = days since the last purchase and d1 = days since the first
(local days in the business time zone):

- never_purchased: no purchase at all;
- new: d1 < new_days;
- active: d <= active_days, except that a member with at least personal_min_days
  purchase days whose silence exceeds personal_k x their median gap is at_risk;
- at_risk: d <= at_risk_days; dormant: d <= dormant_days; lost: beyond.
"""

# SQL here is assembled from this module's constants only; every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import base64
import binascii
from datetime import date, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from segments import stats
from segments.config import ScoringConfig
from service.errors import ValidationFailed

# The stage from `d` and `d1` (local days since the last and the first purchase, NULL
# without one) and the statistics columns of `s` (the rows of _DAYS below).
STAGE_SQL = """
    CASE
        WHEN s.last_purchase_at IS NULL THEN 'never_purchased'
        WHEN d1 < :new_days THEN 'new'
        WHEN d <= :active_days THEN
            CASE WHEN CAST(:personal_k AS numeric) > 0
                      AND s.purchase_days >= :personal_min_days
                      AND s.median_interpurchase_days > 0
                      AND d > CAST(:personal_k AS numeric) * s.median_interpurchase_days
                 THEN 'at_risk' ELSE 'active' END
        WHEN d <= :at_risk_days THEN 'at_risk'
        WHEN d <= :dormant_days THEN 'dormant'
        ELSE 'lost'
    END
"""

# Every active member with their statistics and local days since the first and the last
# purchase. OFFSET 0 keeps the planner from pulling the subquery up, which would copy the
# time zone conversions into every use of d in STAGE_SQL (up to four per member). The
# local day is a plain cast under the business zone as TimeZone (refresh_stages): the
# timezone() function with a zone name looks the zone up on every call.
_DAYS = """
    SELECT mb.id AS member_id, s.last_purchase_at, s.purchase_days, s.median_interpurchase_days,
           GREATEST(CAST(:as_of AS date) - CAST(s.first_purchase_at AS date), 0) AS d1,
           GREATEST(CAST(:as_of AS date) - CAST(s.last_purchase_at AS date), 0) AS d
    FROM members mb LEFT JOIN member_stats s ON s.member_id = mb.id
    WHERE mb.status = 'active'
    OFFSET 0
"""

# One statement: compute every active member's stage, compare it with the stored stage in
# one join (the CTEs all read the table as it was before the statement), log the changes
# and upsert the new and changed stages.
_REFRESH = f"""
    WITH fresh AS (
        SELECT member_id, {STAGE_SQL} AS stage FROM ({_DAYS}) s
    ), changed AS MATERIALIZED (
        -- Only new and changed rows go on: an anti-join is far cheaper than a conflict
        -- check per member on a day when few stages change.
        SELECT f.member_id, old.lifecycle_stage AS old, f.stage
        FROM fresh f LEFT JOIN member_scores old USING (member_id)
        WHERE old.lifecycle_stage IS DISTINCT FROM f.stage
    ), logged AS (
        INSERT INTO lifecycle_changes AS lc (member_id, changed_on, from_stage, to_stage)
        SELECT member_id, :as_of, old, stage FROM changed WHERE old IS NOT NULL
        -- Re-running a date keeps the stage the member had before that date.
        ON CONFLICT (member_id, changed_on) DO UPDATE SET to_stage = EXCLUDED.to_stage
        RETURNING 1
    ), written AS (
        INSERT INTO member_scores AS sc (member_id, as_of, lifecycle_stage, stage_since)
        SELECT member_id, :as_of, stage, :as_of FROM changed
        ON CONFLICT (member_id) DO UPDATE SET
            lifecycle_stage = EXCLUDED.lifecycle_stage, stage_since = EXCLUDED.stage_since,
            as_of = EXCLUDED.as_of
        WHERE sc.lifecycle_stage <> EXCLUDED.lifecycle_stage
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM logged) AS changes, (SELECT count(*) FROM written) AS written
"""


def _tune(session: Session) -> None:
    # Million-row passes: JIT compilation (~1 s per statement here) costs more than it saves,
    # and the hash joins of a million ids want more than the 4 MB default.
    session.execute(text("SET LOCAL jit = off"))
    session.execute(text("SET LOCAL work_mem = '64MB'"))


def stage_params(as_of: date, config: ScoringConfig) -> dict[str, Any]:
    """The bound parameters of STAGE_SQL."""
    return {
        "as_of": as_of,
        "tz": config.timezone,
        "new_days": config.new_days,
        "active_days": config.active_days,
        "at_risk_days": config.at_risk_days,
        "dormant_days": config.dormant_days,
        "personal_k": config.personal_k,
        "personal_min_days": config.personal_min_days,
    }


def refresh_stages(session: Session, as_of: date, config: ScoringConfig) -> dict[str, Any]:
    """Write every member's stage as of `as_of` and record the changes (idempotent per date)."""
    _tune(session)
    old = stats.set_local(session, {"TimeZone": config.timezone})
    row = session.execute(text(_REFRESH), stage_params(as_of, config)).one()
    stats.set_local(session, old)
    # A re-run that moved a member back to the stage it had before that date is no change.
    session.execute(
        text("DELETE FROM lifecycle_changes WHERE changed_on = :as_of AND from_stage = to_stage"),
        {"as_of": as_of},
    )
    # Erased members keep no scores (they can never be targeted again).
    gone = session.execute(
        text(
            "DELETE FROM member_scores sc USING members mb"
            " WHERE mb.id = sc.member_id AND mb.status <> 'active'"
        )
    )
    return {
        "changes": int(row.changes),
        "written": int(row.written),
        "removed": int(gone.rowcount),  # type: ignore[attr-defined]
    }


def _encode(changed_on: date, member_id: int) -> str:
    return base64.urlsafe_b64encode(f"{changed_on.isoformat()}|{member_id}".encode()).decode()


def _decode(cursor: str) -> tuple[date, int]:
    try:
        day, member = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return date.fromisoformat(day), int(member)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise ValidationFailed(
            "the cursor is not valid", errors={"cursor": ["not a cursor from this list"]}
        ) from exc


def early_warning(
    session: Session,
    config: ScoringConfig,
    *,
    as_of: date | None = None,
    days: int | None = None,
    limit: int = 100,
    cursor: str | None = None,
    scope_store_id: int | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Members who became at risk in the last `days` days and still are, newest first."""
    if as_of is None:
        as_of = session.scalar(text("SELECT max(as_of) FROM score_runs"))
        if as_of is None:
            return [], None
    since = as_of - timedelta(days=(days or config.early_warning_days) - 1)
    params: dict[str, Any] = {
        "since": since,
        "as_of": as_of,
        "limit": limit + 1,
        "scope": scope_store_id,
        "tz": config.timezone,
    }
    after = ""
    if cursor:
        params["c_day"], params["c_member"] = _decode(cursor)
        after = " AND (lc.changed_on, lc.member_id) < (:c_day, :c_member)"
    rows = (
        session.execute(
            text(
                "SELECT lc.changed_on, lc.member_id, lc.from_stage, mb.external_id,"
                " st.code AS home_store, s.last_purchase_at, s.median_interpurchase_days,"
                " GREATEST(CAST(:as_of AS date)"
                "   - CAST(timezone(:tz, s.last_purchase_at) AS date), 0) AS days_since_last,"
                " p.p_alive, sc.rfm_segment"
                " FROM lifecycle_changes lc"
                " JOIN member_scores sc ON sc.member_id = lc.member_id"
                " LEFT JOIN member_predictions p ON p.member_id = lc.member_id"
                " JOIN members mb ON mb.id = lc.member_id"
                " LEFT JOIN member_stats s ON s.member_id = lc.member_id"
                " LEFT JOIN stores st ON st.id = mb.home_store_id"
                " WHERE lc.to_stage = 'at_risk' AND lc.changed_on BETWEEN :since AND :as_of"
                "   AND sc.lifecycle_stage = 'at_risk' AND mb.status = 'active'"
                "   AND (CAST(:scope AS integer) IS NULL OR mb.home_store_id = :scope)"
                + after
                + " ORDER BY lc.changed_on DESC, lc.member_id DESC LIMIT :limit"
            ),
            params,
        )
        .mappings()
        .all()
    )
    more = len(rows) > limit
    rows = rows[:limit]
    items = [
        {
            "member_id": r["external_id"],
            "home_store": r["home_store"],
            "became_at_risk_on": r["changed_on"],
            "previous_stage": r["from_stage"],
            "last_purchase_at": r["last_purchase_at"],
            "days_since_last_purchase": r["days_since_last"],
            "median_interpurchase_days": r["median_interpurchase_days"],
            "p_alive": r["p_alive"],
            "rfm_segment": r["rfm_segment"],
        }
        for r in rows
    ]
    next_cursor = _encode(rows[-1]["changed_on"], rows[-1]["member_id"]) if more else None
    return items, next_cursor


def stage_history(session: Session, member_id: int, limit: int = 20) -> list[dict[str, Any]]:
    """A member's most recent stage changes, newest first."""
    rows = session.execute(
        text(
            "SELECT changed_on, from_stage, to_stage FROM lifecycle_changes"
            " WHERE member_id = :id ORDER BY changed_on DESC LIMIT :limit"
        ),
        {"id": member_id, "limit": limit},
    ).mappings()
    return [dict(r) for r in rows]
