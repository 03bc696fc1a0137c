"""What a member profile shows of segmentation: windows, RFM with explanations, stage, churn."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from segments import lifecycle, rfm
from segments.config import ScoringConfig

_ROW = text(
    """
    SELECT s.purchases_30d, s.purchases_90d, s.purchases_365d, s.spend_30d, s.spend_90d,
           s.spend_365d, s.purchase_count, s.net_spend, s.purchase_days,
           s.median_interpurchase_days, s.last_purchase_at,
           sc.r, sc.f, sc.m, sc.rfm_segment, sc.frequency, sc.monetary, sc.lifecycle_stage,
           sc.stage_since, p.p_alive, p.expected_purchases_90d, p.expected_value
    FROM members mb
    LEFT JOIN member_stats s ON s.member_id = mb.id
    LEFT JOIN member_scores sc ON sc.member_id = mb.id
    LEFT JOIN member_predictions p ON p.member_id = mb.id
    WHERE mb.id = :id
    """
)


def member_scores(
    session: Session, member_id: int, config: ScoringConfig | None = None
) -> dict[str, Any]:
    """Windows, RFM scores with their explanation, lifecycle stage and churn of one member."""
    config = config or ScoringConfig.from_env()
    row = session.execute(_ROW, {"id": member_id}).mappings().one()
    run = rfm.latest_run(session)
    windows = {
        f"{kind}_{n}d": row[f"{kind}_{n}d"] if row[f"{kind}_{n}d"] is not None else 0
        for kind in ("purchases", "spend")
        for n in (30, 90, 365)
    }
    windows["purchases_lifetime"] = row["purchase_count"] or 0
    windows["spend_lifetime"] = row["net_spend"] if row["net_spend"] is not None else 0
    scored = row["lifecycle_stage"] is not None and run is not None
    explanation: list[str] = []
    if scored and run is not None:
        explanation = rfm.explain_scores(
            dict(row), run["cut_points"] or {}, run["as_of"], row["last_purchase_at"], config
        )
    segment = row["rfm_segment"]
    return {
        "as_of": run["as_of"] if run else None,
        "windows": windows,
        "median_interpurchase_days": row["median_interpurchase_days"],
        "purchase_days": row["purchase_days"] or 0,
        "rfm": {
            "r": row["r"],
            "f": row["f"],
            "m": row["m"],
            "segment": segment,
            "segment_label": rfm.SEGMENT_LABELS.get(segment) if segment else None,
            "explanation": explanation,
        },
        "lifecycle": {
            "stage": row["lifecycle_stage"],
            "since": row["stage_since"],
            "history": lifecycle.stage_history(session, member_id, limit=10),
        },
        "churn": {
            "p_alive": row["p_alive"],
            "expected_purchases_90d": row["expected_purchases_90d"],
            "expected_value": row["expected_value"],
        },
    }
