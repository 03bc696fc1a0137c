"""Where a purchase's time goes: N purchases in-process under cProfile, statements counted.

Runs `POST /v1/events/purchases` through the Flask test client (no HTTP server, so the
profile is the application's own work) against a database seeded by `bench_purchase`
(`--keep-db`), e.g.:

    python -m bench.bench_purchase --campaigns 20 --db-name patron_main_purchase ...
    python -m bench.profile_purchase postgresql://postgres@127.0.0.1:5432/patron_main_purchase

Prints the statements per purchase (each kind with its count and mean wall time), the
wall and CPU time per purchase (Python, and the PostgreSQL backends' CPU read from /proc
when the server runs on this machine), and the functions of Patron's own packages.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import logging
import os
import pstats
import random
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event

from bench.bench_messaging import cpu_seconds
from service.app import create_app
from service.auth import create_key
from service.config import Config
from service.db import get_db, unit_of_work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database_url")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/5")
    parser.add_argument("-n", type=int, default=500, help="purchases profiled")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--stores", type=int, default=20)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument(
        "--no-profile", action="store_true", help="time without cProfile (its overhead is large)"
    )
    parser.add_argument("--sort", default="cumulative", help="pstats sort key, e.g. tottime")
    parser.add_argument(
        "--only", default=r"/(service|campaigns|segments|rules)/", help="functions shown (regex)"
    )
    args = parser.parse_args()
    os.environ["DATABASE_URL"] = args.database_url
    os.environ["REDIS_URL"] = args.redis_url
    app = create_app(Config.from_env())
    logging.getLogger("patron.access").setLevel(logging.WARNING)  # a line per request
    with app.app_context(), unit_of_work() as session:
        token = create_key(session, role="pos", name="profile")
    client = app.test_client()
    headers = {"Authorization": f"Bearer {token}"}
    statements = [0]
    # statement kind -> [count, wall seconds]; the kind is the statement's first words
    timed: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    started: list[float] = [0.0]
    backends: set[int] = set()

    @event.listens_for(get_db(app).engine, "before_cursor_execute")
    def count(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        statements[0] += 1
        started[0] = time.perf_counter()
        backends.add(cursor.connection.info.backend_pid)

    @event.listens_for(get_db(app).engine, "after_cursor_execute")
    def timing(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        entry = timed[" ".join(statement.split())[:90]]
        entry[0] += 1
        entry[1] += time.perf_counter() - started[0]

    rng = random.Random(1)
    run = uuid.uuid4().hex[:8]

    def purchase(n: int) -> None:
        cents = rng.randrange(100, 99_999)
        amount = f"{cents // 100}.{cents % 100:02d}"
        body = {
            "transaction_id": f"PROF-{run}-{n}",
            "member_id": f"M{rng.randrange(1, args.members + 1):07d}",
            "store": f"S{rng.randrange(1, args.stores + 1):03d}",
            "channel": "pos",
            "amount": amount,
            "currency": "CNY",
            "occurred_at": datetime.now(UTC).isoformat(),
            "items": [{"sku": "SKU-1", "category": "apparel", "quantity": 1, "amount": amount}],
        }
        response = client.post("/v1/events/purchases", json=body, headers=headers)
        if response.status_code != 201:
            raise SystemExit(f"{response.status_code}: {response.get_data(as_text=True)[:300]}")

    for n in range(args.warmup):
        purchase(n)
    statements[0] = 0
    timed.clear()
    profile = cProfile.Profile()
    backend_cpu = cpu_seconds(backends)
    wall, cpu = time.perf_counter(), time.process_time()
    if not args.no_profile:
        profile.enable()
    for n in range(args.warmup, args.warmup + args.n):
        purchase(n)
    profile.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    backend_cpu = cpu_seconds(backends) - backend_cpu
    print(
        f"{args.n} purchases: {wall / args.n * 1e3:.2f} ms wall, {cpu / args.n * 1e3:.2f} ms"
        f" Python CPU ({'not ' if args.no_profile else ''}profiled),"
        f" {backend_cpu / args.n * 1e3:.2f} ms PostgreSQL backend CPU,"
        f" {statements[0] / args.n:.1f} statements each"
    )
    print("\nper purchase  mean ms  statement")
    for kind, (n, seconds) in sorted(timed.items(), key=lambda kv: -kv[1][1]):
        print(f"{n / args.n:12.2f} {seconds / n * 1e3:8.3f}  {kind}")
    if args.no_profile:
        return
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats(args.sort).print_stats(args.only, args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
