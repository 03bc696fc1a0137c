"""The segment summary of a data set as text: RFM grid, named segments, lifecycle stages.

Used by `patron demo` after loading its sample: the refresh runs as of the day after the
last purchase (a historical data set scored as of today would be all "lost"), then the
same summary the API serves (`segments.rfm.summary`) is printed.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

from sqlalchemy import text

from segments import rfm
from segments.config import ScoringConfig
from segments.refresh import UnitOfWork, run_refresh


def day_after_last_purchase(unit_of_work: UnitOfWork, config: ScoringConfig) -> date | None:
    """The local day after the latest purchase (None without purchases)."""
    with unit_of_work() as session:
        # Erased members are never scored, so their purchases do not set the date.
        last = session.scalar(
            text(
                "SELECT max(s.last_purchase_at) FROM member_stats s "
                "JOIN members m ON m.id = s.member_id WHERE m.status = 'active'"
            )
        )
    if last is None:
        return None
    return last.astimezone(config.zone).date() + timedelta(days=1)


def refresh_and_summarise(
    unit_of_work: UnitOfWork,
    config: ScoringConfig,
    as_of: date | None = None,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the daily refresh as of `as_of` (default: the day after the last purchase)."""
    as_of = as_of or day_after_last_purchase(unit_of_work, config)
    if as_of is not None:
        run_refresh(unit_of_work, as_of, config=config, progress=progress)
    with unit_of_work() as session:
        return rfm.summary(session)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary as aligned text lines (grid of members by R and F, segments, stages)."""
    if summary["as_of"] is None:
        return ["No segment summary: no purchases to score yet."]
    cells = {(c["r"], c["f"]): c["members"] for c in summary["grid"]}
    scored = sum(cells.values())
    cuts = summary.get("cut_points") or {}
    lines = [f"Segments as of {summary['as_of']} ({scored:,} members RFM-scored)"]
    if cuts.get("r"):
        lines.append(
            "  cut points: R "
            + " / ".join(str(v) for v in cuts["r"])
            + " days; F "
            + " / ".join(str(v) for v in cuts["f"])
            + " purchases; M "
            + " / ".join(str(v) for v in cuts["m"])
        )
    lines.append("  RFM grid (members):  " + "".join(f"{'F=' + str(f):>8}" for f in range(1, 6)))
    for r in range(5, 0, -1):
        lines.append(f"{'R=' + str(r):>22}" + "".join(f"{cells[(r, f)]:>8,}" for f in range(1, 6)))
    width = max(len(s["label"]) for s in summary["segments"])
    lines.append("  Named RFM segments:")
    lines += [
        f"    {s['label']:<{width}} {s['members']:>8,}"
        for s in sorted(summary["segments"], key=lambda s: -s["members"])
    ]
    lines.append("  Lifecycle stages:")
    lines += [f"    {s['stage']:<{width}} {s['members']:>8,}" for s in summary["stages"]]
    return lines
