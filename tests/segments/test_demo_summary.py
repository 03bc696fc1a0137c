"""`patron demo` prints the segment summary of the loaded CDNOW sample."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from segments.config import ScoringConfig
from segments.report import refresh_and_summarise, summary_lines
from service.demo import DEMO_CURRENCY, DEMO_TZ, write_demo_files
from service.importer import run_import


def test_demo_summary_scores_the_sample_as_of_the_day_after_its_last_purchase(
    connection: Connection, session: Session, isolated: None, uow: Any, tmp_path: Path
) -> None:
    paths = write_demo_files(tmp_path)
    for kind in ("stores", "members", "transactions"):
        run_import(connection, kind, paths[kind], currency=DEMO_CURRENCY, progress=False)
    summary = refresh_and_summarise(uow, ScoringConfig.from_mapping({"timezone": DEMO_TZ}))
    # CDNOW ends on 1998-06-30 (New York): scored the next day, not as of today.
    assert summary["as_of"] == date(1998, 7, 1)
    scored = session.scalar(text("SELECT count(*) FROM member_scores WHERE r IS NOT NULL"))
    assert sum(c["members"] for c in summary["grid"]) == scored > 0
    assert sum(s["members"] for s in summary["segments"]) == scored
    stages = {s["stage"]: s["members"] for s in summary["stages"]}
    assert sum(stages.values()) == 2357 and stages["lost"] > 0 and stages["active"] > 0

    lines = summary_lines(summary)
    text_out = "\n".join(lines)
    assert lines[0] == f"Segments as of 1998-07-01 ({scored:,} members RFM-scored)"
    champions = next(s["members"] for s in summary["segments"] if s["segment"] == "champions")
    assert any(line.split() == ["Champions", f"{champions:,}"] for line in lines)
    assert f"lost {stages['lost']:>8,}".split() in [line.split() for line in lines]
    top_row = next(line for line in lines if line.strip().startswith("R=5"))
    assert [int(v.replace(",", "")) for v in top_row.split()[1:]] == [
        c["members"] for c in summary["grid"] if c["r"] == 5
    ]
    assert "cut points: R" in text_out


def test_demo_summary_without_purchases_says_so(session: Session, isolated: None, uow: Any):
    session.execute(text("DELETE FROM member_scores"))
    session.execute(text("UPDATE member_stats SET last_purchase_at = NULL"))
    summary = refresh_and_summarise(uow, ScoringConfig.from_mapping({"timezone": DEMO_TZ}))
    assert summary_lines(summary) == ["No segment summary: no purchases to score yet."]
