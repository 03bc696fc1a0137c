"""On the CDNOW sample: windows, RFM scores and stages match an independent pandas computation."""

from __future__ import annotations

import math
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from segments import refresh
from segments.config import ScoringConfig
from service.demo import DEMO_CURRENCY, DEMO_TZ, cdnow_rows, write_demo_files
from service.importer import run_import

AS_OF = date(1998, 7, 1)
# The documented default mapping, written out independently: rows R = 5..1, columns FM = 1..5.
GRID = [
    ["new", "potential_loyalist", "potential_loyalist", "champions", "champions"],
    ["promising", "potential_loyalist", "potential_loyalist", "loyal", "champions"],
    ["about_to_sleep", "about_to_sleep", "need_attention", "loyal", "loyal"],
    ["hibernating", "hibernating", "at_risk", "at_risk", "cant_lose"],
    ["lost", "lost", "at_risk", "at_risk", "cant_lose"],
]


def percentile_disc(values: np.ndarray, q: float) -> float:
    ordered = np.sort(values)
    return float(ordered[math.ceil(q * len(ordered)) - 1])


def pandas_expectation(skipped: set[str]) -> pd.DataFrame:
    raw = pd.DataFrame(cdnow_rows(), columns=["cid", "day", "cds", "value"])
    raw["transaction_id"] = [f"CDNOW-T-{n:05d}" for n in range(1, len(raw) + 1)]
    raw = raw[~raw["transaction_id"].isin(skipped)]
    raw["member"] = "CDNOW-" + raw["cid"]
    raw["cents"] = raw["value"].map(lambda v: int(Decimal(v) * 100))
    raw["age"] = raw["day"].map(lambda d: (AS_OF - d).days)
    g = raw.groupby("member")
    out = pd.DataFrame(
        {
            "purchase_count": g.size(),
            "net_cents": g["cents"].sum(),
            "recency": g["age"].min(),
            "first_age": g["age"].max(),
        }
    )
    for n in (30, 90, 365):
        inside = raw[raw["age"] <= n - 1].groupby("member")
        out[f"purchases_{n}d"] = inside.size().reindex(out.index, fill_value=0)
        out[f"cents_{n}d"] = inside["cents"].sum().reindex(out.index, fill_value=0)
    days = raw.drop_duplicates(["member", "day"]).sort_values(["member", "day"])
    days["gap"] = (
        days.groupby("member")["day"].diff().map(lambda d: d.days if pd.notna(d) else np.nan)
    )
    out["purchase_days"] = days.groupby("member").size()
    out["median_gap"] = days.groupby("member")["gap"].median()

    scored = out[out["purchases_365d"] > 0].copy()
    cuts = {
        "r": [percentile_disc(scored["recency"].to_numpy(), q) for q in (0.2, 0.4, 0.6, 0.8)],
        "m": [percentile_disc(scored["cents_365d"].to_numpy(), q) for q in (0.2, 0.4, 0.6, 0.8)],
    }
    scored["r"] = 5 - sum((scored["recency"] > c).astype(int) for c in cuts["r"])
    scored["f"] = 1 + sum((scored["purchases_365d"] > t).astype(int) for t in (1, 2, 4, 9))
    scored["m"] = 1 + sum((scored["cents_365d"] > c).astype(int) for c in cuts["m"])
    fm = (scored["f"] + scored["m"] + 1) // 2
    scored["segment"] = [GRID[5 - r][k - 1] for r, k in zip(scored["r"], fm, strict=True)]
    out = out.join(scored[["r", "f", "m", "segment"]])

    def stage(row: Any) -> str:
        if row.first_age < 30:
            return "new"
        d = row.recency
        if d <= 90:
            personal = row.purchase_days >= 3 and row.median_gap > 0 and d > 3 * row.median_gap
            return "at_risk" if personal else "active"
        if d <= 180:
            return "at_risk"
        return "dormant" if d <= 365 else "lost"

    out["stage"] = out.apply(stage, axis=1)
    out.attrs["cuts"] = cuts
    return out


@pytest.fixture
def cdnow(connection: Connection, session: Session, isolated: None, tmp_path: Path) -> set[str]:
    """The sample imported in this test's transaction; returns the rejected transaction ids."""
    paths = write_demo_files(tmp_path)
    for kind in ("stores", "members", "transactions"):
        report = run_import(connection, kind, paths[kind], currency=DEMO_CURRENCY, progress=False)
        # Every CDNOW row is valid, zero-value purchases included.
        assert report.rejected == 0, kind
    return set()


def test_cdnow_scores_match_pandas_member_by_member(
    cdnow: set[str], session: Session, uow: Any
) -> None:
    config = ScoringConfig.from_mapping({"timezone": DEMO_TZ})
    refresh.run_refresh(uow, AS_OF, config=config, steps=["windows", "lifecycle", "rfm"])
    expected = pandas_expectation(cdnow)
    db = pd.DataFrame(
        session.execute(
            text(
                "SELECT mb.external_id AS member, s.purchase_count, s.net_spend,"
                " s.purchases_30d, s.purchases_90d, s.purchases_365d,"
                " s.spend_30d, s.spend_90d, s.spend_365d, s.purchase_days,"
                " s.median_interpurchase_days, sc.r, sc.f, sc.m, sc.rfm_segment,"
                " sc.lifecycle_stage"
                " FROM members mb JOIN member_stats s ON s.member_id = mb.id"
                " JOIN member_scores sc ON sc.member_id = mb.id"
                " WHERE mb.external_id LIKE 'CDNOW-%'"
            )
        )
        .mappings()
        .all()
    ).set_index("member")
    assert len(db) == len(expected) > 2300
    both = expected.join(db, rsuffix="_db")
    assert (both["purchase_count"] == both["purchase_count_db"]).all()
    assert (both["net_cents"] == both["net_spend"].map(lambda v: int(v * 100))).all()
    for n in (30, 90, 365):
        assert (both[f"purchases_{n}d"] == both[f"purchases_{n}d_db"]).all()
        assert (both[f"cents_{n}d"] == both[f"spend_{n}d"].map(lambda v: int(v * 100))).all()
    assert (both["purchase_days"] == both["purchase_days_db"]).all()
    gaps = both["median_interpurchase_days"].map(lambda v: np.nan if v is None else float(v))
    assert np.allclose(both["median_gap"], gaps, atol=0.05, equal_nan=True)
    scored = both[both["r"].notna()]
    assert len(scored) == int((both["purchases_365d"] > 0).sum()) > 0
    for dim in ("r", "f", "m"):
        assert (scored[dim].astype(int) == scored[f"{dim}_db"].astype(int)).all(), dim
    assert (scored["segment"] == scored["rfm_segment"]).all()
    assert both.loc[both["r"].isna(), "r_db"].isna().all()
    assert (both["stage"] == both["lifecycle_stage"]).all()
    cuts = session.scalar(text("SELECT cut_points FROM score_runs WHERE as_of = :d"), {"d": AS_OF})
    assert cuts["r"] == expected.attrs["cuts"]["r"]
    assert [int(Decimal(c) * 100) for c in cuts["m"]] == expected.attrs["cuts"]["m"]
