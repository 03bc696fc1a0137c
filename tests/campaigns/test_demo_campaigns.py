"""`patron demo` runs a birthday and a win-back campaign on the CDNOW sample and says what
was decided."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from campaigns.engine import ACTIVE
from segments.config import ScoringConfig
from segments.report import refresh_and_summarise
from service.demo import DEMO_CURRENCY, DEMO_TZ, demo_campaigns, write_demo_files
from service.importer import run_import


def test_demo_campaigns_decide_birthdays_and_win_backs(
    connection: Connection, session: Session, tmp_path: Path
) -> None:
    ACTIVE.clear()
    # Only the sample's members take part (others' committed members are set aside).
    session.execute(text("UPDATE members SET status = 'erased' WHERE status = 'active'"))
    session.execute(text("DELETE FROM stats_windows"))
    session.execute(text("DELETE FROM score_runs"))
    session.flush()
    paths = write_demo_files(tmp_path)
    for kind in ("stores", "members", "transactions"):
        run_import(connection, kind, paths[kind], currency=DEMO_CURRENCY, progress=False)

    @contextmanager
    def unit() -> Iterator[Session]:
        yield session
        session.flush()

    refresh_and_summarise(unit, ScoringConfig.from_mapping({"timezone": DEMO_TZ}))
    lines: list[str] = []
    now = datetime.now(UTC)
    results: dict[str, Any] = demo_campaigns(session, now, lines.append)
    birthday, win_back = results["demo-birthday"], results["demo-win-back"]
    # Demo birthdays are spread over the year from today: about a week's worth qualify.
    assert 20 < birthday["qualified"] < 100
    assert birthday["coupons"] == birthday["qualified"] == birthday["messages"]
    stages = dict(
        session.execute(
            text("SELECT lifecycle_stage, count(*) FROM member_scores GROUP BY 1")
        ).all()
    )
    targeted = stages.get("at_risk", 0) + stages.get("dormant", 0)
    held = win_back.get("reason_holdout", 0)
    assert win_back["qualified"] + held == targeted > 0
    assert 0.05 < held / targeted < 0.15  # the 10 % holdout
    assert any(line.strip().startswith("demo-birthday") for line in lines)
    # Running the demo again the same day decides nothing twice.
    again = demo_campaigns(session, now, lines.append)
    assert again["demo-birthday"]["replayed"] is True
