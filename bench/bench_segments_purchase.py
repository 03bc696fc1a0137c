"""The purchase endpoint with segment freshness on: 20 dynamic segments watched per purchase.

`POST /v1/events/purchases` re-evaluates the member's purchase-sensitive dynamic segments
in the purchase's transaction (`segments.custom.refresh_member`). This script installs the
20 segments of `bench.bench_custom_segments.SEGMENTS` (15 of them read purchase statistics)
into the purchase benchmark's database, refreshes them once (so memberships exist to leave
as well as to enter), and then runs `bench.bench_purchase --keep-db` unchanged: Patron's
endpoint beside the bare two-upsert endpoint, alternating rounds.

    python -m bench.bench_purchase --db-name patron_bench_purchase_h4 \
        --redis-url redis://127.0.0.1:6379/10 --rounds 1 --duration 1 --replay 0   # seed
    python -m bench.bench_segments_purchase --db-name patron_bench_purchase_h4 \
        --redis-url redis://127.0.0.1:6379/10 -- --rounds 10 --duration 3

Arguments after `--` go to bench.bench_purchase. `--segments 0` removes them
(freshness on, nothing to evaluate: the no-query path).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import UTC, datetime

from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from bench.bench_custom_segments import SEGMENTS
from segments import custom
from segments.models_custom import SegmentKind
from service.db import normalise_url
from service.vocabulary import default_vocabulary


def install(url: str, n: int) -> int:
    """Replace the database's segments by the first n benchmark segments, refreshed once."""
    engine = create_engine(normalise_url(url))
    with Session(engine) as s, s.begin():
        s.execute(
            text(
                "TRUNCATE segment_membership_changes, segment_memberships, segment_refreshes,"
                " segment_versions, segments RESTART IDENTITY CASCADE"
            )
        )
        for name, rule in list(SEGMENTS.items())[:n]:
            custom.create_segment(
                s, default_vocabulary(), name, kind=SegmentKind.DYNAMIC, rule=rule, actor="b"
            )
        results = custom.refresh_all(s, datetime.now(UTC))
    engine.dispose()
    return sum(r.members for r in results)


def main() -> int:
    argv = sys.argv[1:]
    rest: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, rest = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--db-name", default="patron_bench_purchase")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--segments", type=int, default=20)
    args = parser.parse_args(argv)
    url = args.pg.rstrip("/") + "/" + args.db_name
    members = install(url, args.segments)
    print(f"{args.segments} dynamic segments installed, {members:,} memberships", flush=True)
    command = [sys.executable, "-m", "bench.bench_purchase", "--keep-db", "--pg", args.pg]
    command += ["--db-name", args.db_name, "--redis-url", args.redis_url, *rest]
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
