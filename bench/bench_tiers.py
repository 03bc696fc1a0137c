"""Tier benchmark: the purchase path's added statement, and the daily review, set-based.

Uses its own database (default `patron_bench_tiers`; its public schema is dropped and
re-migrated on every run) seeded with set-based SQL: N members (default 200,000) in
four time zones with rolling-12-month figures, 60% holding the tier they qualify for,
5% one tier above it (downgrade candidates), 5% below it (upgrade candidates), and
review dates spread over the coming year (≈ 1/365 due per day).

1. **Purchase path**, per call, each call in its own rolled-back transaction, the three
   kinds interleaved call by call so machine noise falls on all alike:
   - baseline: `segments.stats.apply_purchase`, the statistics upsert every purchase
     already makes;
   - `campaigns.tiers.apply_purchase` for a member who stays in their tier (the usual
     case: nothing is written);
   - `campaigns.tiers.apply_purchase` for a member who moves up (update, review date
     and history row).
2. **Daily review** (`review_tiers`) over all members, then again for the same date
   (idempotent: nothing left to do).

    python -m bench.bench_tiers
    python -m bench.bench_tiers --members 1000000 --calls 3000

Results go to stdout and bench/out/bench_tiers.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from campaigns import tiers
from segments import stats
from service import migrate
from service.db import normalise_url

AS_OF = date(2026, 11, 22)
NOW = datetime(2026, 11, 22, 6, 0, tzinfo=UTC)

SEED = """
INSERT INTO members (external_id, timezone, created_at)
SELECT 'B' || g,
       (ARRAY['Asia/Shanghai', 'Asia/Tokyo', 'Europe/Berlin', 'America/New_York'])[1 + g % 4],
       now()
FROM generate_series(1, :n) g;

INSERT INTO member_stats (member_id, purchase_count, purchase_amount, net_spend,
                          purchases_365d, spend_365d, last_purchase_at)
SELECT id, p, s, s, p, s, now() - interval '3 days'
FROM (SELECT id, (random() * 20)::int AS p, round((random() * 20000)::numeric, 2) AS s
      FROM members) x;

-- The tier each member qualifies for, then 5% one above (downgrade candidates) and 5%
-- below (upgrade candidates); 30% have no tier.
WITH q AS (
    SELECT ms.member_id,
           (SELECT t.rank FROM tiers t
            WHERE ms.spend_365d >= t.min_spend_12m OR ms.purchases_365d >= t.min_purchases_12m
            ORDER BY t.rank DESC LIMIT 1) AS rank
    FROM member_stats ms
), chosen AS (
    SELECT member_id,
           CASE WHEN member_id % 20 = 0 THEN LEAST(COALESCE(rank, 0) + 1, 3)
                WHEN member_id % 20 = 1 THEN GREATEST(COALESCE(rank, 0) - 1, 0)
                WHEN member_id % 10 IN (2, 3, 4) THEN 0
                ELSE COALESCE(rank, 0) END AS rank
    FROM q
)
UPDATE members m SET tier = t.name FROM chosen c JOIN tiers t ON t.rank = c.rank
WHERE m.id = c.member_id;

INSERT INTO member_tiers (member_id, tier_since, review_on)
SELECT id, now() - interval '200 days', CAST(:as_of AS date) + (id % 365)::int
FROM members WHERE tier IS NOT NULL;
ANALYZE;
"""


def _fresh_database(url: str) -> Engine:
    target = make_url(normalise_url(url))
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if not conn.scalar(
            text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": target.database}
        ):
            conn.execute(text(f'CREATE DATABASE "{target.database}"'))
    admin.dispose()
    engine = create_engine(target)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    migrate.upgrade(engine)
    return engine


def _seed(engine: Engine, members: int) -> dict[str, Any]:
    started = time.perf_counter()
    with engine.begin() as conn:
        for statement in SEED.split(";\n"):
            if statement.strip():
                conn.execute(text(statement), {"n": members, "as_of": AS_OF})
    with engine.connect() as conn:
        tiered = conn.scalar(text("SELECT count(*) FROM members WHERE tier IS NOT NULL"))
    seconds = round(time.perf_counter() - started, 1)
    return {"members": members, "tiered": tiered, "seconds": seconds}


def _pick(engine: Engine, calls: int) -> tuple[list[int], list[int]]:
    """Members who stay in their tier after a 10.00 purchase, and members who move up."""
    with engine.connect() as conn:
        stay = conn.scalars(
            text(
                "SELECT m.id FROM members m JOIN member_stats ms ON ms.member_id = m.id"
                " WHERE m.id % 20 BETWEEN 5 AND 19 AND m.tier = 'gold'"
                " AND ms.spend_365d < 29000 AND ms.purchases_365d < 30"
                " ORDER BY random() LIMIT :n"
            ),
            {"n": calls},
        ).all()
        up = conn.scalars(
            text(
                "SELECT m.id FROM members m JOIN member_stats ms ON ms.member_id = m.id"
                " WHERE m.id % 20 = 1 AND ms.spend_365d >= 2000 ORDER BY random() LIMIT :n"
            ),
            {"n": calls},
        ).all()
    return list(stay), list(up)


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "calls": len(ordered),
        "median_us": round(statistics.median(ordered), 1),
        "p90_us": round(ordered[int(len(ordered) * 0.9)], 1),
        "p99_us": round(ordered[int(len(ordered) * 0.99)], 1),
    }


def _purchase_path(engine: Engine, calls: int) -> dict[str, Any]:
    stay, up = _pick(engine, calls)
    n = min(len(stay), len(up))
    timings: dict[str, list[float]] = {"stats_upsert": [], "tier_stay": [], "tier_up": []}
    upgraded = 0
    amount = Decimal("10.00")
    with Session(engine) as s:
        # Warm-up: prepare the statements on this connection.
        for member_id in (stay[0], up[0]):
            stats.apply_purchase(s, member_id, NOW, amount)
            tiers.apply_purchase(s, member_id, NOW)
            s.rollback()
        for i in range(n):
            started = time.perf_counter()
            stats.apply_purchase(s, stay[i], NOW, amount)
            timings["stats_upsert"].append((time.perf_counter() - started) * 1e6)
            s.rollback()
            started = time.perf_counter()
            assert tiers.apply_purchase(s, stay[i], NOW) is None
            timings["tier_stay"].append((time.perf_counter() - started) * 1e6)
            s.rollback()
            started = time.perf_counter()
            upgraded += tiers.apply_purchase(s, up[i], NOW) is not None
            timings["tier_up"].append((time.perf_counter() - started) * 1e6)
            s.rollback()
    result: dict[str, Any] = {k: _summary(v) for k, v in timings.items()}
    result["upgraded"] = upgraded
    base = result["stats_upsert"]["median_us"]
    result["ratio_stay_to_stats_upsert"] = round(result["tier_stay"]["median_us"] / base, 2)
    result["ratio_up_to_stats_upsert"] = round(result["tier_up"]["median_us"] / base, 2)
    return result


def _review(engine: Engine) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label in ("first", "again"):
        started = time.perf_counter()
        with Session(engine) as s, s.begin():
            counts = tiers.review_tiers(s, AS_OF)
        out[label] = {"seconds": round(time.perf_counter() - started, 3), **counts}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--database-url", default="postgresql://postgres@127.0.0.1:5432/patron_bench_tiers"
    )
    parser.add_argument("--members", type=int, default=200_000)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    engine = _fresh_database(args.database_url)
    seeded = _seed(engine, args.members)
    print(f"seeded {seeded}")
    path = _purchase_path(engine, args.calls)
    print(json.dumps(path, indent=2))
    review = _review(engine)
    print(json.dumps(review, indent=2))
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "bench_tiers.json").write_text(
        json.dumps(
            {
                "at": datetime.now(UTC).isoformat(),
                "python": platform.python_version(),
                "seed": seeded,
                "purchase_path": path,
                "review": review,
            },
            indent=2,
        )
    )
    engine.dispose()


if __name__ == "__main__":
    main()
