"""RFM: recency, frequency and monetary scores 1-5, named segments, snapshots, summaries.

Scores are a function of the value alone: four cut points per dimension (quintiles of
the scored members, or configured thresholds) and score = 1 + the number of cut points
the value exceeds (recency is reversed: few days is 5). So equal values always get
equal scores, however many members share them; the cut points are stored per run.
"""

# SQL here is assembled from this module's constants only; every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from segments.config import ScoringConfig
from segments.models import RfmSegment

SEGMENT_LABELS: dict[str, str] = {
    RfmSegment.CHAMPIONS: "Champions",
    RfmSegment.LOYAL: "Loyal",
    RfmSegment.POTENTIAL_LOYALIST: "Potential Loyalist",
    RfmSegment.NEW: "New",
    RfmSegment.PROMISING: "Promising",
    RfmSegment.NEED_ATTENTION: "Need Attention",
    RfmSegment.ABOUT_TO_SLEEP: "About to Sleep",
    RfmSegment.AT_RISK: "At Risk",
    RfmSegment.CANT_LOSE: "Can't Lose Them",
    RfmSegment.HIBERNATING: "Hibernating",
    RfmSegment.LOST: "Lost",
}
SEGMENTS: tuple[str, ...] = tuple(s.value for s in RfmSegment)
_QUINTILES = "ARRAY[0.2, 0.4, 0.6, 0.8]"


def fm_score(f: int, m: int) -> int:
    """The combined F/M score used by the segment grid: (F + M) / 2 rounded half up."""
    return (f + m + 1) // 2


def segment_for(r: int, f: int, m: int, config: ScoringConfig) -> str:
    """The named segment of (R, F, M) under the configured grid."""
    if not all(1 <= v <= 5 for v in (r, f, m)):
        raise ValueError("RFM scores are 1 to 5")
    return str(config.segment_grid[5 - r][fm_score(f, m) - 1])


def score_value(value: float | Decimal, cuts: Sequence[float | Decimal], *, reverse: bool) -> int:
    """1 + the number of cut points below the value (reversed for recency)."""
    above = sum(1 for c in cuts if value > c)
    return 5 - above if reverse else 1 + above


def _population(lookback: int) -> str:
    # Active members with a purchase in the look-back window, with their three values.
    return f"""
        SELECT s.member_id,
               GREATEST(CAST(:as_of AS date)
                        - CAST(timezone(:tz, s.last_purchase_at) AS date), 0) AS recency,
               s.purchases_{lookback}d AS frequency,
               s.spend_{lookback}d AS monetary
        FROM member_stats s
        WHERE s.purchases_{lookback}d > 0
          -- The few members not active, by their partial index (not every member row).
          AND NOT EXISTS (SELECT 1 FROM members mb
                          WHERE mb.id = s.member_id AND mb.status <> 'active')
    """


def _check_lookback(config: ScoringConfig) -> int:
    if config.rfm_lookback_days not in (30, 90, 365):
        raise ValueError("rfm_lookback_days must be one of the windows: 30, 90 or 365")
    return config.rfm_lookback_days


# One statement: the population once (materialised), its quintiles for the dimensions
# scored by quintile, each member's scores computed once (OFFSET 0 keeps the planner from
# copying the comparisons into every use of r, f and m), then every score row compared
# with its new scores in one join and only the rows that change updated (measured cheaper
# than an update by inner join plus one by anti-join for the members who left).
_SCORE = """
    WITH p AS MATERIALIZED ({population}), k AS (
        SELECT n, r_q, f_q, m_q, {cuts}
        FROM (SELECT count(*) AS n, {r_q} AS r_q, {f_q} AS f_q, {m_q} AS m_q FROM p) q
    ), named AS (
        SELECT member_id, frequency, monetary, r, f, m,
               (CAST(:grid AS text[]))[(5 - r) * 5 + (f + m + 1) / 2] AS rfm_segment
        FROM (
            SELECT member_id, frequency, monetary,
                   5 - ({r_above}) AS r, 1 + ({f_above}) AS f, 1 + ({m_above}) AS m
            FROM p CROSS JOIN k
            OFFSET 0
        ) scored
    ), diff AS MATERIALIZED (
        -- New scores, all NULL for members who left the population.
        SELECT x.member_id, n.r, n.f, n.m, n.rfm_segment, n.frequency, n.monetary
        FROM member_scores x LEFT JOIN named n USING (member_id)
        WHERE (x.r, x.f, x.m, x.rfm_segment, x.frequency, x.monetary)
              IS DISTINCT FROM (n.r, n.f, n.m, n.rfm_segment, n.frequency, n.monetary)
    ), written AS (
        UPDATE member_scores sc SET
            r = d.r, f = d.f, m = d.m, rfm_segment = d.rfm_segment,
            frequency = d.frequency, monetary = d.monetary, as_of = :as_of
        FROM diff d
        WHERE sc.member_id = d.member_id
        RETURNING 1
    )
    SELECT n, r_q, f_q, m_q, (SELECT count(*) FROM written) AS changed FROM k
"""
_VALUE = {"r": "recency", "f": "frequency", "m": "monetary"}


def _above(column: str, dim: str) -> str:
    return " + ".join(f"CAST({column} > k.{dim}{i} AS integer)" for i in range(4))


def score_members(session: Session, as_of: date, config: ScoringConfig) -> dict[str, Any]:
    """Write R, F, M and the named segment of every member (set-based); returns the cut
    points (quintiles of the scored members or configured thresholds) and the count."""
    lookback = _check_lookback(config)
    # Million-row passes: JIT compilation costs more than it saves, and the sorts and hash
    # joins want more than the 4 MB default.
    session.execute(text("SET LOCAL jit = off"))
    session.execute(text("SET LOCAL work_mem = '64MB'"))
    params: dict[str, Any] = {
        "as_of": as_of,
        "tz": config.timezone,
        "grid": [str(c) for row in config.segment_grid for c in row],
    }
    quantiles: dict[str, str] = {}
    cuts_sql: list[str] = []
    for dim in ("r", "f", "m"):
        if getattr(config, f"{dim}_method") == "thresholds":
            # No sort for a dimension cut by configured thresholds.
            quantiles[dim] = "CAST(NULL AS numeric[])"
            fixed = [Decimal(str(v)) for v in getattr(config, f"{dim}_thresholds")]
            params.update({f"{dim}{i}": v for i, v in enumerate(fixed)})
            cuts_sql += [f"CAST(:{dim}{i} AS numeric) AS {dim}{i}" for i in range(4)]
        else:
            value = _VALUE[dim]
            quantiles[dim] = f"percentile_disc({_QUINTILES}) WITHIN GROUP (ORDER BY {value})"
            cuts_sql += [f"CAST({dim}_q[{i + 1}] AS numeric) AS {dim}{i}" for i in range(4)]
    sql = _SCORE.format(
        population=_population(lookback),
        cuts=", ".join(cuts_sql),
        r_q=quantiles["r"],
        f_q=quantiles["f"],
        m_q=quantiles["m"],
        r_above=_above("recency", "r"),
        f_above=_above("frequency", "f"),
        m_above=_above("monetary", "m"),
    )
    row = session.execute(text(sql), params).one()
    cuts: dict[str, Any] = {"members": int(row.n), "lookback_days": lookback, "method": {}}
    for dim in ("r", "f", "m"):
        method = getattr(config, f"{dim}_method")
        cuts["method"][dim] = method
        if method == "thresholds":
            values: list[Any] = list(getattr(config, f"{dim}_thresholds"))
        else:
            values = list(getattr(row, f"{dim}_q") or [])
        if dim == "m":
            values = [str(Decimal(str(v))) for v in values]
        cuts[dim] = values
    cuts["changed"] = int(row.changed)
    return cuts


def explain_scores(
    scores: dict[str, Any],
    cut_points: dict[str, Any],
    as_of: date,
    last_purchase_at: datetime | None,
    config: ScoringConfig,
) -> list[str]:
    """One sentence per dimension: the value, the score and the cut points it was cut by."""
    if scores.get("r") is None or not cut_points.get("r"):
        days = cut_points.get("lookback_days", config.rfm_lookback_days)
        return [f"Not RFM-scored on {as_of}: no purchase in the {days} days before."]
    lookback = cut_points.get("lookback_days", config.rfm_lookback_days)

    def joined(values: Sequence[Any]) -> str:
        return " / ".join(str(v) for v in values)

    recency = None
    if last_purchase_at is not None:
        recency = max((as_of - last_purchase_at.astimezone(config.zone).date()).days, 0)
    r_cuts = joined(cut_points["r"])
    f_cuts = joined(cut_points["f"])
    m_cuts = joined(cut_points["m"])
    return [
        f"R = {scores['r']}: last purchase {recency} days before {as_of}; "
        f"R cut points {r_cuts} days ({cut_points['method']['r']})",
        f"F = {scores['f']}: {scores['frequency']} purchases in the last {lookback} days; "
        f"F cut points {f_cuts} purchases ({cut_points['method']['f']})",
        f"M = {scores['m']}: spent {scores['monetary']} in the last {lookback} days; "
        f"M cut points {m_cuts} ({cut_points['method']['m']})",
        f"Segment {SEGMENT_LABELS[scores['rfm_segment']]}: R = {scores['r']} and "
        f"FM = (F + M) / 2 rounded up = {fm_score(scores['f'], scores['m'])}",
    ]


# --- monthly snapshots and the movement matrix --------------------------------------------


# Advisory lock class of the monthly snapshot (the second key is the month).
_SNAPSHOT_LOCK = 7_264_003


def take_snapshot(session: Session, as_of: date) -> dict[str, Any]:
    """Keep the scores of the first refresh of each month (once; later runs skip)."""
    month = as_of.replace(day=1)
    # Two refreshes of one month take turns here, so the second sees the first's rows and
    # the insert needs no conflict check per row (speculative insertion costs ~a third more).
    session.execute(
        text("SELECT pg_advisory_xact_lock(:k, :m)"),
        {"k": _SNAPSHOT_LOCK, "m": month.year * 12 + month.month},
    )
    exists = session.scalar(
        text("SELECT EXISTS (SELECT 1 FROM rfm_snapshots WHERE month = :month)"),
        {"month": month},
    )
    if exists:
        return {"month": month.isoformat(), "taken": False}
    result = session.execute(
        text(
            "INSERT INTO rfm_snapshots (month, member_id, r, f, m, rfm_segment)"
            " SELECT :month, member_id, r, f, m, rfm_segment FROM member_scores"
            " WHERE r IS NOT NULL"
        ),
        {"month": month},
    )
    return {"month": month.isoformat(), "taken": True, "members": result.rowcount}  # type: ignore[attr-defined]


NONE = "none"


def movement(session: Session, from_month: date, to_month: date) -> dict[str, Any]:
    """Where the members of each segment in one month's snapshot were in another's."""
    rows = session.execute(
        text(
            "SELECT COALESCE(a.rfm_segment, :none) AS src, COALESCE(b.rfm_segment, :none) AS dst,"
            " count(*) AS n"
            " FROM (SELECT member_id, rfm_segment FROM rfm_snapshots WHERE month = :a) a"
            " FULL JOIN (SELECT member_id, rfm_segment FROM rfm_snapshots WHERE month = :b) b"
            " USING (member_id) GROUP BY 1, 2"
        ),
        {"a": from_month, "b": to_month, "none": NONE},
    ).all()
    names = [*SEGMENTS, NONE]
    matrix = {src: dict.fromkeys(names, 0) for src in names}
    for row in rows:
        matrix[row.src][row.dst] = int(row.n)
    return {
        "from": from_month.strftime("%Y-%m"),
        "to": to_month.strftime("%Y-%m"),
        "segments": names,
        "matrix": [
            {
                "from_segment": src,
                "counts": [{"to_segment": d, "members": matrix[src][d]} for d in names],
            }
            for src in names
        ],
        "total": sum(int(r.n) for r in rows),
    }


def latest_run(session: Session) -> dict[str, Any] | None:
    """The most recent refresh: date, cut points, churn parameters and step timings."""
    row = (
        session.execute(
            text(
                "SELECT as_of, started_at, finished_at, cut_points, churn_params, steps, config"
                " FROM score_runs ORDER BY as_of DESC LIMIT 1"
            )
        )
        .mappings()
        .first()
    )
    return dict(row) if row else None


def summary(
    session: Session,
    *,
    store: str | None = None,
    region: str | None = None,
    scope_store_id: int | None = None,
) -> dict[str, Any]:
    """The R × F grid (counts, average M), counts per segment and per lifecycle stage."""
    where = ["mb.status = 'active'"]
    params: dict[str, Any] = {}
    if store is not None:
        where.append("mb.home_store_id = (SELECT id FROM stores WHERE code = :store)")
        params["store"] = store
    if region is not None:
        where.append(
            "mb.home_store_id IN (SELECT st.id FROM stores st JOIN regions rg"
            " ON rg.id = st.region_id WHERE rg.code = :region)"
        )
        params["region"] = region
    if scope_store_id is not None:
        where.append("mb.home_store_id = :scope_store_id")
        params["scope_store_id"] = scope_store_id
    base = "FROM member_scores sc JOIN members mb ON mb.id = sc.member_id WHERE " + " AND ".join(
        where
    )
    grid_rows = session.execute(
        text(
            f"SELECT r, f, count(*) AS n, CAST(avg(monetary) AS numeric(14, 2)) AS avg_m"
            f" {base} AND sc.r IS NOT NULL GROUP BY r, f"
        ),
        params,
    ).all()
    seg_rows = session.execute(
        text(f"SELECT rfm_segment, count(*) AS n {base} AND sc.r IS NOT NULL GROUP BY 1"), params
    ).all()
    stage_rows = session.execute(
        text(f"SELECT lifecycle_stage, count(*) AS n {base} GROUP BY 1"), params
    ).all()
    cells = {(r.r, r.f): r for r in grid_rows}
    grid = [
        {
            "r": r,
            "f": f,
            "members": int(cells[(r, f)].n) if (r, f) in cells else 0,
            "average_m": cells[(r, f)].avg_m if (r, f) in cells else None,
        }
        for r in range(5, 0, -1)
        for f in range(1, 6)
    ]
    segments = dict.fromkeys(SEGMENTS, 0) | {r.rfm_segment: int(r.n) for r in seg_rows}
    from segments.models import Stage

    stages = dict.fromkeys((s.value for s in Stage), 0) | {
        r.lifecycle_stage: int(r.n) for r in stage_rows
    }
    run = latest_run(session)
    return {
        "as_of": run["as_of"] if run else None,
        "store": store,
        "region": region,
        "cut_points": run["cut_points"] if run else None,
        "grid": grid,
        "segments": [
            {"segment": s, "label": SEGMENT_LABELS[s], "members": n} for s, n in segments.items()
        ],
        "stages": [{"stage": s, "members": n} for s, n in stages.items()],
    }
