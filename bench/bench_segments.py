"""Segmentation benchmark: full statistics rebuild, the daily refresh, and a pandas RFM script.

Usage::

    # a database with members and transactions loaded (patron import), e.g. a copy:
    createdb -T patron_bench_import_20m patron_bench_seg
    python -m bench.bench_segments postgresql://postgres@127.0.0.1:5432/patron_bench_seg

Steps, each timed:

1. migrate to heads (adds the window columns and the transactions(occurred_at) index),
   ``ANALYZE``;
2. the full rebuild of member_stats from transactions (lifetime, windows, purchase days,
   median gaps) as of ``--as-of - 1 day``, computed by ``--rebuild-parts`` connections
   side by side (``--rebuild-only`` stops after it), then untimed warm-up refreshes of
   the ``--warm-up-days`` dates before ``--as-of`` (the first creates every
   member_scores row, window state and segment membership; the next is an ordinary day,
   so the measured date follows one, as it does every day in service);
3. "a day passes": ``--dirty`` members get their statistics touched (what a day of
   purchases does; the others count as loaded days ago) and the daily refresh of
   ``--as-of`` runs: window ageing, history of the touched members, lifecycle, RFM,
   churn (BG/NBD + Gamma-Gamma), snapshot, custom segments when installed —
   ``--runs`` times (the refresh of a date is idempotent, so later runs redo the
   scoring but find no windows to age: the first run is reported separately);
4. the purchases are exported to CSV (member id, local day, amount net of refunds) and a
   pandas script computes RFM only (read + group + quintiles + scores) in a subprocess.

The machine is shared: the load average is printed next to every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from segments import refresh, stats
from segments.config import ScoringConfig
from service import migrate
from service.db import normalise_url


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}"


PANDAS_RFM = r"""
import sys, time
import numpy as np
import pandas as pd

path, as_of = sys.argv[1], pd.Timestamp(sys.argv[2])
t0 = time.perf_counter()
df = pd.read_csv(path, names=["member_id", "day", "amount"], parse_dates=["day"],
                 date_format="%Y-%m-%d", engine="pyarrow" if "--arrow" in sys.argv else "c")
t1 = time.perf_counter()
df = df[df["day"] > as_of - pd.Timedelta(days=365)]
g = df.groupby("member_id").agg(last=("day", "max"), f=("day", "size"), m=("amount", "sum"))
g["recency"] = (as_of - g["last"]).dt.days
def score(values, reverse):
    cuts = np.quantile(values, [0.2, 0.4, 0.6, 0.8], method="inverted_cdf")
    above = sum((values > c).astype(int) for c in cuts)
    return 5 - above if reverse else 1 + above
g["r"] = score(g["recency"].to_numpy(), True)
g["f"] = 1 + sum((g["f"].to_numpy() > t).astype(int) for t in (1, 2, 4, 9))
g["m"] = score(g["m"].to_numpy(), False)
t2 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {len(df)} {len(g)}")
"""


# The analyst's version: the export as it comes (the transactions CSV the importer reads:
# ten columns, ISO timestamps with offsets, refunds as their own rows), read with only the
# needed columns; refunds are netted against their purchases, days are local days.
PANDAS_RFM_EXPORT = r"""
import sys, time
import numpy as np
import pandas as pd

path, as_of, tz = sys.argv[1], pd.Timestamp(sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
df = pd.read_csv(path, usecols=["transaction_id", "member_id", "kind",
                                "original_transaction_id", "amount", "occurred_at"])
t1 = time.perf_counter()
df["day"] = pd.to_datetime(df["occurred_at"], utc=True).dt.tz_convert(tz).dt.tz_localize(None)
df["day"] = df["day"].dt.normalize()
refunds = df[df["kind"] == "refund"].groupby("original_transaction_id")["amount"].sum()
p = df[df["kind"] == "purchase"].copy()
p["amount"] = p["amount"] - p["transaction_id"].map(refunds).fillna(0)
p = p[p["day"] > as_of - pd.Timedelta(days=365)]
g = p.groupby("member_id").agg(last=("day", "max"), f=("day", "size"), m=("amount", "sum"))
g["recency"] = (as_of - g["last"]).dt.days
def score(values, reverse):
    cuts = np.quantile(values, [0.2, 0.4, 0.6, 0.8], method="inverted_cdf")
    above = sum((values > c).astype(int) for c in cuts)
    return 5 - above if reverse else 1 + above
g["r"] = score(g["recency"].to_numpy(), True)
g["f"] = 1 + sum((g["f"].to_numpy() > t).astype(int) for t in (1, 2, 4, 9))
g["m"] = score(g["m"].to_numpy(), False)
t2 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {len(p)} {len(g)}")
"""


# The segmentation steps (issue 4's daily refresh); other packages append their own steps
# (tiers, campaigns), which have their own benchmarks.
SEGMENT_STEPS = [
    *("custom_segments_early", "windows", "churn", "lifecycle", "rfm", "snapshot"),
    *("custom_segments_stats", "custom_segments"),
]


def _create_segments(engine: Any, n: int) -> list[int]:
    """The first n of the custom-segment benchmark's 20 segments (replacing any others)."""
    from bench.bench_custom_segments import SEGMENTS
    from segments import custom
    from segments.models_custom import SegmentKind
    from service.vocabulary import default_vocabulary

    with Session(engine) as s, s.begin():
        s.execute(
            text(
                "TRUNCATE segment_membership_changes, segment_memberships, segment_refreshes,"
                " segment_versions, segments RESTART IDENTITY CASCADE"
            )
        )
        return [
            int(
                custom.create_segment(
                    s, default_vocabulary(), name, kind=SegmentKind.DYNAMIC, rule=rule, actor="b"
                )["id"]
            )
            for name, rule in list(SEGMENTS.items())[:n]
        ]


def _a_day_of_purchases(
    session: Session, day: date, n: int, run: int, config: ScoringConfig
) -> None:
    """n purchases by random members on `day`, recorded as the purchase path would.

    The transactions are inserted and the members' statistics (lifetime and windows)
    updated set-based, with updated_at = now(), so the next refresh sees a real day: those
    members' purchase days and median gaps change, and segments may gain or lose them.
    """
    session.execute(
        text(
            """
            WITH picked AS (
                SELECT member_id, round((20 + random() * 280)::numeric, 2) AS amount,
                       timezone(:tz, CAST(:day AS timestamp)) + interval '10 hours'
                           + random() * interval '11 hours' AS at
                FROM (SELECT DISTINCT (1 + floor(random() * (SELECT max(id) FROM members)))::bigint
                          AS member_id FROM generate_series(1, :n)) r
                JOIN members mb ON mb.id = r.member_id AND mb.status = 'active'
            ), tx AS (
                INSERT INTO transactions (external_id, kind, member_id, store_id, channel,
                                          occurred_at, amount, currency)
                SELECT 'BENCH-' || :day || '-' || :run || '-' || p.member_id, 'purchase',
                       p.member_id, (SELECT min(id) FROM stores), 'pos', p.at, p.amount, 'CNY'
                FROM picked p
                RETURNING member_id, occurred_at, amount
            )
            INSERT INTO member_stats AS ms (member_id, first_purchase_at, last_purchase_at,
                purchase_count, purchase_amount, net_spend, updated_at, purchases_30d,
                purchases_90d, purchases_365d, spend_30d, spend_90d, spend_365d,
                purchase_dates)
            SELECT member_id, occurred_at, occurred_at, 1, amount, amount, now(), 1, 1, 1,
                   amount, amount, amount, ARRAY[CAST(timezone(:tz, occurred_at) AS date)]
            FROM tx
            ON CONFLICT (member_id) DO UPDATE SET
                first_purchase_at = LEAST(ms.first_purchase_at, EXCLUDED.first_purchase_at),
                last_purchase_at = GREATEST(ms.last_purchase_at, EXCLUDED.last_purchase_at),
                purchase_count = ms.purchase_count + 1,
                purchase_amount = ms.purchase_amount + EXCLUDED.purchase_amount,
                net_spend = ms.net_spend + EXCLUDED.net_spend, updated_at = now(),
                purchases_30d = ms.purchases_30d + 1, purchases_90d = ms.purchases_90d + 1,
                purchases_365d = ms.purchases_365d + 1,
                spend_30d = ms.spend_30d + EXCLUDED.spend_30d,
                spend_90d = ms.spend_90d + EXCLUDED.spend_90d,
                spend_365d = ms.spend_365d + EXCLUDED.spend_365d,
                purchase_dates = """
            + stats.PURCHASE_DATES_MERGE
        ),
        {"tz": config.timezone, "day": day.isoformat(), "n": n, "run": run},
    )


class _BackendCpu:
    """User + system CPU seconds of the PostgreSQL backends serving this benchmark.

    On a shared machine wall time depends on everyone else; the backends' CPU time does not
    (with --serial no parallel workers run, so it is all the database's work). The engine's
    pool is fixed (no overflow) and every one of its connections is opened up front, so
    these backends are all there is (the full rebuild's parts and the refresh steps run
    side by side included). The server
    must be on this machine (read from /proc).
    """

    def __init__(self, engine: Any, size: int) -> None:
        self.engine = engine
        self.tick = os.sysconf("SC_CLK_TCK")
        self.pids = self._pids(size)

    def _pids(self, size: int) -> set[int]:
        conns = [self.engine.connect() for _ in range(size)]
        try:
            return {int(c.scalar(text("SELECT pg_backend_pid()"))) for c in conns}
        finally:
            for c in conns:
                c.close()

    def seconds(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                return float("nan")
            total += (int(fields[11]) + int(fields[12])) / self.tick
        return total

    def check(self) -> None:
        if self._pids(len(self.pids)) != self.pids:
            _log("warning: the backends changed during the run; CPU figures are incomplete")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database_url")
    parser.add_argument("--as-of", type=date.fromisoformat, default=None)
    parser.add_argument(
        "--dirty", type=int, default=20_000, help="purchases made the day before --as-of"
    )
    parser.add_argument(
        "--segments", type=int, default=20, help="dynamic custom segments refreshed daily (0-20)"
    )
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument(
        "--warm-up-days",
        type=int,
        default=2,
        help="dates refreshed before the measured one (the first builds everything)",
    )
    parser.add_argument(
        "--csv",
        type=Path,
        default=Path(tempfile.gettempdir()) / "patron-bench-seg-purchases.csv",
    )
    parser.add_argument(
        "--pandas-export",
        type=Path,
        default=None,
        help="also time the pandas RFM script over this transactions export (generate.py's)",
    )
    parser.add_argument("--skip-rebuild", action="store_true")
    parser.add_argument(
        "--rebuild-only",
        action="store_true",
        help="time only the full rebuild (no segments, refreshes or pandas)",
    )
    parser.add_argument(
        "--rebuild-parts",
        type=int,
        default=stats.REBUILD_PARTS,
        help="connections computing the full rebuild side by side (1: one statement)",
    )
    parser.add_argument("--skip-pandas", action="store_true")
    parser.add_argument("--timezone", default="Asia/Shanghai")
    parser.add_argument(
        "--parallel",
        type=int,
        default=3,
        help="refresh steps run side by side (segments.refresh.STEP_AFTER); 1: in sequence",
    )
    parser.add_argument(
        "--serial",
        action="store_true",
        help="no parallel query workers: the backends' CPU time is then all the work",
    )
    args = parser.parse_args()

    # A fixed pool: the main connection plus one per part of the split full rebuild, so a
    # known set of backends does all the work and their CPU time can be read.
    options = "-c max_parallel_workers_per_gather=0" if args.serial else ""
    engine = create_engine(
        normalise_url(args.database_url),
        pool_size=max(1 + args.rebuild_parts, args.parallel),
        max_overflow=0,
        connect_args={"options": options} if options else {},
    )
    config = ScoringConfig.from_mapping({"timezone": args.timezone})
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "serial": args.serial}
    cpu = _BackendCpu(engine, max(1 + args.rebuild_parts, args.parallel))

    started = time.perf_counter()
    migrate.upgrade(engine)
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
        members, txs, last = conn.execute(
            text(
                "SELECT (SELECT count(*) FROM members), (SELECT count(*) FROM transactions),"
                " (SELECT max(occurred_at) FROM transactions)"
            )
        ).one()
    as_of = args.as_of or (last.astimezone(config.zone).date() + timedelta(days=1))
    results["data"] = {"members": members, "transactions": txs, "as_of": as_of.isoformat()}
    _log(
        f"migrate + analyze {time.perf_counter() - started:.1f}s; {members:,} members, "
        f"{txs:,} transactions; as of {as_of}"
    )

    @contextmanager
    def unit() -> Any:
        with Session(engine) as session, session.begin():
            yield session

    if args.segments and not args.rebuild_only:
        ids = _create_segments(engine, args.segments)
        _log(f"{len(ids)} dynamic segments defined (bench.bench_custom_segments.SEGMENTS)")

    yesterday = as_of - timedelta(days=1)
    if not args.skip_rebuild:
        # Worst case: every row differs (a rebuild writes only rows that do), so every
        # member_stats row is rewritten; the dead rows of this untimed step are vacuumed.
        with unit() as session:
            session.execute(text("UPDATE member_stats SET purchase_days = -1"))
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("VACUUM ANALYZE member_stats")
            )
        with unit() as session:
            session.execute(text("SET LOCAL work_mem = '256MB'"))
            t, c = time.perf_counter(), cpu.seconds()
            stats.rebuild_all_stats(
                session, yesterday, timezone=config.timezone, parts=args.rebuild_parts
            )
            seconds, used = time.perf_counter() - t, cpu.seconds() - c
        results["full_rebuild_seconds"] = round(seconds, 2)
        results["full_rebuild_backend_cpu"] = round(used, 2)
        _log(
            f"full rebuild of member_stats from transactions: {seconds:.1f}s, backend CPU"
            f" {used:.1f}s ({_load()})"
        )
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("VACUUM ANALYZE member_stats")
            )
    if args.rebuild_only:
        print(json.dumps(results, indent=2, default=str))
        return
    # The data was loaded days ago as far as the refresh is concerned: otherwise every
    # member counts as changed since the last run (the import touched them all).
    with unit() as session:
        session.execute(text("UPDATE member_stats SET updated_at = now() - interval '2 days'"))
    # Warm-up: the first refresh ever builds every window, score and membership from
    # nothing (and rewrites every statistics row); the days after it are ordinary days, as
    # is the day measured. So the warm-up refreshes --warm-up-days dates up to yesterday.
    for back in range(args.warm_up_days, 0, -1):
        day = as_of - timedelta(days=back)
        t = time.perf_counter()
        refresh.run_refresh(unit, day, config=config, steps=SEGMENT_STEPS, parallel=args.parallel)
        _log(f"warm-up refresh of {day}: {time.perf_counter() - t:.1f}s ({_load()})")
        with engine.connect() as conn:
            # As autovacuum would by the next day: the warm-up rewrote most rows of both.
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("VACUUM ANALYZE member_scores, member_stats")
            )

    runs: list[dict[str, Any]] = []
    for n in range(args.runs):
        with unit() as session:
            _a_day_of_purchases(session, yesterday, args.dirty, n, config)
        step_cpu: dict[str, float] = {}

        def progress(name: str, details: dict[str, Any], used: dict[str, float] = step_cpu) -> None:
            if details.get("status") == "started":
                used[name] = -cpu.seconds()
            else:
                used[name] = round(used[name] + cpu.seconds(), 2)

        t, c = time.perf_counter(), cpu.seconds()
        out = refresh.run_refresh(
            unit,
            as_of,
            config=config,
            steps=SEGMENT_STEPS,
            progress=progress,
            parallel=args.parallel,
        )
        seconds, used = time.perf_counter() - t, cpu.seconds() - c
        steps = {k: v["seconds"] for k, v in out["steps"].items()}
        runs.append(
            {
                "seconds": round(seconds, 2),
                "steps": steps,
                "backend_cpu": round(used, 2),
                "steps_backend_cpu": step_cpu,
                "load": _load(),
            }
        )
        _log(
            f"daily refresh #{n + 1} of {as_of}: {seconds:.1f}s {steps}; backend CPU"
            f" {used:.1f}s {step_cpu} ({_load()})"
        )
    cpu.check()
    results["daily_refresh"] = runs

    if not args.skip_pandas:
        t = time.perf_counter()
        with engine.raw_connection() as raw:
            cur = raw.cursor()
            with args.csv.open("w") as f:
                cur.copy_expert(
                    "COPY (SELECT member_id,"
                    f" CAST(timezone('{config.timezone}', occurred_at) AS date),"
                    " amount - refunded_amount FROM transactions WHERE kind = 'purchase')"
                    " TO STDOUT WITH (FORMAT csv)",
                    f,
                )
        _log(f"CSV export {time.perf_counter() - t:.1f}s ({args.csv.stat().st_size / 1e9:.2f} GB)")
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", PANDAS_RFM, str(args.csv), as_of.isoformat()],
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.perf_counter() - t
        read_s, compute_s, rows, scored = proc.stdout.split()
        results["pandas_rfm"] = {
            "seconds": round(wall, 2),
            "read_csv": float(read_s),
            "rfm": float(compute_s),
            "rows": int(rows),
            "members": int(scored),
            "load": _load(),
        }
        _log(f"pandas RFM: {wall:.1f}s (read {read_s}s, compute {compute_s}s; {_load()})")
        best = min(r["seconds"] for r in runs)
        results["speedup_vs_pandas"] = round(wall / best, 2)
        _log(f"daily refresh (best run) vs pandas RFM-only: {wall / best:.1f}x faster")
    if args.pandas_export is not None:
        t = time.perf_counter()
        proc = subprocess.run(
            [
                *(sys.executable, "-c", PANDAS_RFM_EXPORT, str(args.pandas_export)),
                *(as_of.isoformat(), config.timezone),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.perf_counter() - t
        read_s, compute_s, rows, scored = proc.stdout.split()
        best = min(r["seconds"] for r in runs)
        results["pandas_rfm_export"] = {
            "seconds": round(wall, 2),
            "read_csv": float(read_s),
            "rfm": float(compute_s),
            "rows": int(rows),
            "members": int(scored),
            "load": _load(),
            "speedup": round(wall / best, 2),
        }
        _log(
            f"pandas RFM over the export: {wall:.1f}s (read {read_s}s, compute {compute_s}s;"
            f" {_load()}); daily refresh (best run) {wall / best:.1f}x faster"
        )
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
