"""Per-statement timings of refresh steps (wall and backend CPU), in a rolled-back transaction.

For finding what dominates a step: every SQL statement slower than --min-ms is printed with
its wall time and the CPU time of the PostgreSQL backend that ran it (read from /proc, so
the server must be on this machine; parallel query is off so that CPU is all the work),
and Python gaps between statements (model fitting, building parameters) are shown too.
Nothing is kept: the transaction is rolled back.

    python -m bench.bench_segments_steps postgresql://postgres@127.0.0.1:5432/DB 2026-11-02 \
        windows,lifecycle,rfm,churn,custom_segments --min-ms 300
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.orm import Session

from segments import refresh
from segments.config import ScoringConfig
from service.db import normalise_url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database_url")
    parser.add_argument("as_of", type=date.fromisoformat)
    parser.add_argument("steps", help="comma-separated step names")
    parser.add_argument("--min-ms", type=float, default=300)
    parser.add_argument("--timezone", default="Asia/Shanghai")
    args = parser.parse_args()
    engine = create_engine(normalise_url(args.database_url))
    config = ScoringConfig.from_mapping({"timezone": args.timezone})
    tick = os.sysconf("SC_CLK_TCK")
    state: dict[str, Any] = {"last": time.perf_counter(), "pid": None}

    def cpu() -> float:
        if state["pid"] is None:
            return 0.0
        fields = Path(f"/proc/{state['pid']}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    @event.listens_for(engine, "before_cursor_execute")
    def before(conn: Any, *_: Any) -> None:
        conn.info["t0"], conn.info["c0"] = time.perf_counter(), cpu()
        gap = conn.info["t0"] - state["last"]
        if gap * 1000 > args.min_ms:
            print(f"   [python {gap:.2f}s]")

    @event.listens_for(engine, "after_cursor_execute")
    def after(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        wall = time.perf_counter() - conn.info["t0"]
        state["last"] = time.perf_counter()
        if wall * 1000 > args.min_ms:
            used = cpu() - conn.info["c0"]
            print(f"{wall:7.2f}s cpu {used:6.2f}s  {' '.join(statement.split())[:140]}")

    with Session(engine) as session:
        session.begin()
        session.execute(text("SET max_parallel_workers_per_gather = 0"))
        state["pid"] = session.scalar(text("SELECT pg_backend_pid()"))
        refresh.begin_run(session, args.as_of, config)
        for name, step in refresh.steps_named(args.steps.split(",")):
            started, used = time.perf_counter(), cpu()
            step(session, args.as_of, config)
            print(
                f"=== step {name}: {time.perf_counter() - started:.2f}s,"
                f" backend cpu {cpu() - used:.2f}s",
                flush=True,
            )
        session.rollback()


if __name__ == "__main__":
    main()
