"""Custom segment refresh benchmark: 20 dynamic segments over 1M members, with history.

Uses its own database (default `patron_bench_custseg`), created on first run as a
copy of the rules benchmark's 1M-member database (`CREATE DATABASE ... TEMPLATE
patron_bench_rules`, which needs nobody connected to the template) and migrated
to the current heads. Then:

1. creates 20 realistic dynamic segments (replacing those of a previous run);
2. **first refresh**: every segment as of NOW (everyone enters: one 'entered'
   history row per member and segment), sequentially and timed per segment;
3. changes ~1% of members' statistics by a small purchase (count +1, spend +20..300,
   last purchase two hours before the next refresh);
4. **second refresh**: as of NOW + 1 day, sequentially;
5. the next day again (another ~1% changed) with the 20 jobs on 2 threads;
6. `refresh_member` for 1,000 of the changed members (20 segments read statistics),
   each in a rolled-back transaction: the purchase path's added cost.

    python -m bench.bench_custom_segments
    python -m bench.bench_custom_segments --database-url postgresql://postgres@127.0.0.1:5432/x

Results go to stdout (markdown) and bench/out/bench_custom_segments.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from segments import custom
from segments.models_custom import SegmentKind
from service import migrate
from service.db import normalise_url
from service.models import MemberStats
from service.vocabulary import default_vocabulary

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
NOW = datetime(2026, 11, 1, 4, 0, tzinfo=UTC)
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/patron_bench_custseg"

SEGMENTS: dict[str, str] = {
    "big-spenders": "net_spend > 2500",
    "vip-active": 'tags contains "vip" and days_since_last_purchase <= 90',
    "lapsed-high-value": "net_spend > 2000 and days_since_last_purchase > 180",
    "one-time-buyers": "purchase_count = 1",
    "frequent": "purchase_count >= 10",
    "dormant": "days_since_last_purchase >= 300",
    "never-purchased": "purchase_count = 0",
    "gold-active": 'tier = "gold" and days_since_last_purchase <= 60',
    "silver-upsell": 'tier = "silver" and net_spend between 1500 and 2500',
    "sms-lapsing": "consent.sms = true and days_since_last_purchase between 90 and 180",
    "newsletter-email": 'tags contains "newsletter" and consent.email = true',
    "birthday-week": "birth_date anniversary within next 7 days",
    "young-adults": "age between 18 and 25 and purchase_count >= 1",
    "east-spenders": 'region = "East" and net_spend > 1000',
    "recent-buyers": "last_purchase_at within last 14 days",
    "wechat-active": 'tags contains "wechat_follower" and days_since_last_purchase <= 30',
    "women-30-45": 'gender = "female" and age between 30 and 45',
    "students-repeat": 'tags contains "student" and purchase_count >= 2',
    "at-risk-frequent": "purchase_count >= 5 and days_since_last_purchase between 60 and 120",
    "low-value-active": "net_spend < 300 and days_since_last_purchase <= 30",
}


def _ensure_database(url: str, template: str) -> None:
    target = make_url(normalise_url(url))
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if conn.scalar(
            text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": target.database}
        ):
            return
        busy = conn.scalar(
            text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d"), {"d": template}
        )
        if busy:
            sys.exit(f"{template} has {busy} connection(s); cannot copy it now")
        print(f"creating {target.database} from template {template} ...", file=sys.stderr)
        conn.execute(text(f'CREATE DATABASE "{target.database}" TEMPLATE "{template}"'))
    admin.dispose()


def _reset(engine: Engine) -> dict[str, int]:
    with Session(engine) as s, s.begin():
        s.execute(
            text(
                "TRUNCATE segment_membership_changes, segment_memberships, segment_refreshes, "
                "segment_versions, segments RESTART IDENTITY CASCADE"
            )
        )
        ids = {
            name: int(
                custom.create_segment(
                    s,
                    default_vocabulary(),
                    name,
                    kind=SegmentKind.DYNAMIC,
                    rule=rule,
                    actor="bench",
                )["id"]
            )
            for name, rule in SEGMENTS.items()
        }
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
    return ids


def _refresh_one(engine: Engine, segment_id: int, as_of: datetime) -> custom.RefreshResult:
    with Session(engine) as s, s.begin():
        return custom.refresh_segment(s, segment_id, as_of)


def _refresh(
    engine: Engine, ids: dict[str, int], as_of: datetime, workers: int = 1
) -> dict[str, Any]:
    started = time.perf_counter()
    if workers == 1:
        results = [_refresh_one(engine, sid, as_of) for sid in ids.values()]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda sid: _refresh_one(engine, sid, as_of), ids.values()))
    wall = time.perf_counter() - started
    names = {v: k for k, v in ids.items()}
    return {
        "as_of": as_of.isoformat(),
        "workers": workers,
        "wall_seconds": round(wall, 2),
        "members": sum(r.members for r in results),
        "entered": sum(r.entered for r in results),
        "left": sum(r.left for r in results),
        "segments": [
            {
                "name": names[r.segment_id],
                "members": r.members,
                "entered": r.entered,
                "left": r.left,
                "seconds": round(r.seconds, 3),
            }
            for r in results
        ],
    }


def _change_stats(engine: Engine, fraction: float, at: datetime, residue: int) -> int:
    modulus = round(1 / fraction)
    with Session(engine) as s, s.begin():
        changed = cast(
            CursorResult[Any],
            s.execute(
                text(
                    """
                UPDATE member_stats SET
                    purchase_count = purchase_count + 1,
                    purchase_amount = purchase_amount + d.amount,
                    net_spend = net_spend + d.amount,
                    first_purchase_at = coalesce(first_purchase_at, :at),
                    last_purchase_at = :at,
                    updated_at = now()
                FROM (SELECT member_id, round((20 + random() * 280)::numeric, 2) AS amount
                      FROM member_stats WHERE member_id % :m = :r) d
                WHERE member_stats.member_id = d.member_id
                """
                ),
                {"at": at, "m": modulus, "r": residue},
            ),
        ).rowcount
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE member_stats"))
    return int(changed)


def _member_latency(engine: Engine, n: int) -> dict[str, Any]:
    now = NOW + timedelta(days=2, hours=1)
    with Session(engine) as s:
        ids = list(
            s.scalars(
                select(MemberStats.member_id)
                .where(MemberStats.member_id % 100 == 7)
                .order_by(MemberStats.member_id)
                .limit(n)
            )
        )
    custom.forget_catalogue()
    timings: list[float] = []
    changed = 0
    with Session(engine) as s:
        custom.refresh_member(s, ids[0], now)  # warm: catalogue and compiled predicates
        s.rollback()
        for member_id in ids:
            started = time.perf_counter()
            result = custom.refresh_member(s, member_id, now)
            timings.append((time.perf_counter() - started) * 1000)
            changed += bool(result.entered or result.left)
            s.rollback()
    timings.sort()
    return {
        "calls": len(timings),
        "with_changes": changed,
        "median_ms": round(statistics.median(timings), 3),
        "p95_ms": round(timings[int(len(timings) * 0.95)], 3),
        "p99_ms": round(timings[int(len(timings) * 0.99)], 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=DEFAULT_URL)
    parser.add_argument("--template", default="patron_bench_rules")
    parser.add_argument("--change-fraction", type=float, default=0.01)
    args = parser.parse_args(argv)

    _ensure_database(args.database_url, args.template)
    engine = create_engine(normalise_url(args.database_url), pool_size=4)
    migrate.upgrade(engine)
    with engine.connect() as conn:
        members = conn.scalar(text("SELECT count(*) FROM members"))
    ids = _reset(engine)
    first = _refresh(engine, ids, NOW)
    day = timedelta(days=1)
    changed = _change_stats(engine, args.change_fraction, NOW + day - timedelta(hours=2), 7)
    second = _refresh(engine, ids, NOW + day)
    # The next day's step fanned out over two workers, as two RQ workers run the jobs.
    changed_again = _change_stats(
        engine, args.change_fraction, NOW + 2 * day - timedelta(hours=2), 13
    )
    parallel = _refresh(engine, ids, NOW + 2 * day, workers=2)
    latency = _member_latency(engine, 1000)
    with engine.connect() as conn:
        history = conn.scalar(text("SELECT count(*) FROM segment_membership_changes"))
    result = {
        "members": members,
        "segments": len(ids),
        "first_refresh": first,
        "changed_members": changed,
        "second_refresh": second,
        "changed_members_day_3": changed_again,
        "third_refresh_two_workers": parallel,
        "history_rows": history,
        "refresh_member": latency,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "command": "python -m bench.bench_custom_segments",
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_custom_segments.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{members:,} members, {len(ids)} segments, {changed:,} members changed\n")
    print("| step | wall | members (sum) | entered | left |")
    print("|---|---|---|---|---|")
    for label, run in (
        ("first refresh (everyone enters), 1 worker", first),
        ("second refresh after ~1% changed, 1 worker", second),
        ("third refresh after ~1% changed, 2 workers", parallel),
    ):
        print(
            f"| {label} | {run['wall_seconds']} s | {run['members']:,} | {run['entered']:,} "
            f"| {run['left']:,} |"
        )
    print("\n| segment | members | first (s) | second (s) | entered | left |")
    print("|---|---|---|---|---|---|")
    for a, b in zip(first["segments"], second["segments"], strict=True):
        print(
            f"| {a['name']} | {b['members']:,} | {a['seconds']} | {b['seconds']} "
            f"| {b['entered']:,} | {b['left']:,} |"
        )
    print(
        f"\nrefresh_member over {latency['calls']} changed members: median "
        f"{latency['median_ms']} ms, p95 {latency['p95_ms']} ms, p99 {latency['p99_ms']} ms "
        f"({latency['with_changes']} changed membership)"
    )


if __name__ == "__main__":
    main()
