"""Coupon benchmark: bulk codes, redemption throughput, and double redemptions under contention.

Against a fresh database `--db-name` on the PostgreSQL server `--pg` (dropped and
recreated, migrated, seeded with 50 stores, 10,000 members and one amount template):

1. **codes from SQL**: `SELECT patron_coupon_code()` for 200,000 rows.
2. **bulk**: one batch of `--codes` (default 1,000,000) bearer codes generated and
   stored in one transaction, exactly as `patron coupons generate` does; then every
   code is checked with `campaigns.codes.is_well_formed` and counted distinct.
3. **HTTP redemptions over distinct codes**: `patron serve --workers W` (gunicorn, the
   settings of the purchase benchmark) and `--connections` client processes, each
   redeeming its own slice of the bulk codes with a new Idempotency-Key per request
   for `--duration` seconds. Every answer must be 201.
4. **service-level redemptions**: the same work without HTTP: `--service-procs`
   processes calling `campaigns.coupons.redeem` in their own unit of work (one commit
   per redemption), to show what the database path costs alone.
5. **contention**: `--contended` codes (default 2,000) each attempted by
   `--contenders` client processes (default 50) through the HTTP API, all clients
   walking the codes in the same order so they collide on every code. Afterwards the
   database is counted: live redemptions per code (must be exactly 1), coupons
   redeemed, and the 201 answers (must equal the number of codes).

    python -m bench.bench_coupons                     # all of it (about 5 minutes)
    python -m bench.bench_coupons --codes 200000 --contended 500 --contenders 20
    python -m bench.bench_coupons --bulk-variants --skip sql --skip http \
        --skip contention --skip service          # bulk generation: three ways, then 1M

Results are printed and written to bench/out/bench_coupons.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg2

from bench.bench_purchase import (
    OUT,
    CpuMeter,
    _proc_cpu,
    create_database,
    free_port,
    machine_notes,
    patron_argv,
    percentile,
    start,
    stop,
    wait_healthy,
    wait_quiet,
)

REDEEM_PATH = "/v1/coupons/redemptions"


def seed(db_url: str) -> tuple[str, str]:
    """Stores, members, a template and a POS key; returns (template code, raw API key)."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from campaigns import coupons
    from service.auth import create_key

    conn = psycopg2.connect(db_url)
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO regions (code, name) SELECT 'R' || g, 'Region ' || g"
            " FROM generate_series(1, 5) g"
        )
        cur.execute(
            "INSERT INTO stores (code, name, region_id)"
            " SELECT 'S' || lpad(g::text, 3, '0'), 'Store ' || g,"
            "        (SELECT min(id) FROM regions) + g % 5"
            " FROM generate_series(1, 50) g"
        )
        cur.execute(
            "INSERT INTO members (external_id, name, home_store_id)"
            " SELECT 'M' || lpad(g::text, 7, '0'), 'Member ' || g, (SELECT min(id) FROM stores)"
            " FROM generate_series(1, 10000) g"
        )
    conn.close()
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg2://", 1))
    with Session(engine) as s, s.begin():
        template = coupons.create_template(
            s,
            {"code": "BENCH-20", "name": "20 off", "kind": "amount",
             "amount_off": Decimal("20"), "valid_days": 30},
            actor="bench", default_timezone="Asia/Shanghai", currency="CNY",
        )  # fmt: skip
        key = create_key(s, "pos", "bench-pos")
    engine.dispose()
    return template.code, key


def time_sql_codes(db_url: str, n: int = 200_000) -> dict[str, Any]:
    conn = psycopg2.connect(db_url)
    with conn, conn.cursor() as cur:
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            cur.execute("SELECT count(patron_coupon_code()) FROM generate_series(1, %s)", (n,))
            runs.append(time.perf_counter() - t0)
    conn.close()
    return {"codes": n, "seconds_each": [round(r, 3) for r in runs], "best_s": round(min(runs), 3)}


def bulk(db_url: str, template: str, n: int) -> dict[str, Any]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    from campaigns import codes, coupons

    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg2://", 1))
    t0 = time.perf_counter()
    with Session(engine) as s, s.begin():
        backend = int(s.execute(text("SELECT pg_backend_pid()")).scalar_one())
        cpu0 = _proc_cpu(backend)
        batch, _ = coupons.create_batch(s, template, n, actor="bench", label="bench")
        batch = coupons.fill_batch(s, batch["id"])
        # CPU of the PostgreSQL backend that did the work: on a shared machine the wall
        # time depends on the neighbours, this much less.
        backend_cpu = _proc_cpu(backend) - cpu0
    seconds = time.perf_counter() - t0
    conn = psycopg2.connect(db_url)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT code FROM coupons WHERE batch_id = %s", (batch["id"],))
        stored = [r[0] for r in cur.fetchall()]
    conn.close()
    engine.dispose()
    return {
        "batch_id": batch["id"],
        "requested": n,
        "stored": len(stored),
        "distinct": len(set(stored)),
        "well_formed": sum(codes.is_well_formed(c) for c in stored),
        "seconds": round(seconds, 2),
        "codes_per_s": round(n / seconds),
        "backend_cpu_s": round(backend_cpu, 2),
    }


def bulk_variants(db_url: str, template: str, n: int, rounds: int = 2) -> dict[str, list[float]]:
    """Side by side, in rolled-back transactions of n codes in chunks like fill_batch: one
    `patron_coupon_code()` call per row, the arithmetic inlined, inlined and sorted."""
    from datetime import timedelta

    from sqlalchemy import create_engine, text

    from campaigns import codes, coupons

    cols = "INSERT INTO coupons (code, template_id, batch_id, face_value, valid_from,"
    cols += " valid_until, issued_at)"
    vals = ":template_id, :batch_id, :face_value, :valid_from, :valid_until, :issued_at"
    inline = f"SELECT {codes.sql_code_expression('r.x', 'r.y')} AS code"
    variants = {
        "function": text(
            f"{cols} SELECT patron_coupon_code(), {vals} FROM generate_series(1, :n)"
            " ON CONFLICT (code) DO NOTHING"
        ),
        "inline": text(
            f"{cols} SELECT g.code, {vals} FROM ({inline} FROM ({codes.SQL_RANDOM_PAIRS}) r) g"
            " ON CONFLICT (code) DO NOTHING"
        ),
        "inline_sorted": coupons._FILL_INSERT,
    }
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg2://", 1))
    with engine.connect() as c:
        tid = c.execute(
            text("SELECT id FROM coupon_templates WHERE code = :c"), {"c": template}
        ).scalar()
    now = datetime.now(UTC)
    chunk = min(n, coupons.BATCH_CHUNK)
    params = {"template_id": tid, "batch_id": None, "face_value": 20, "valid_from": now,
              "valid_until": now + timedelta(days=1), "issued_at": now, "n": chunk}  # fmt: skip
    out: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants.items())
    for rnd in range(rounds):
        for name, stmt in order if rnd % 2 == 0 else order[::-1]:
            with engine.connect() as c:
                tx = c.begin()
                t0 = time.perf_counter()
                for _ in range(n // chunk):
                    c.execute(stmt, params)
                out[name].append(round(time.perf_counter() - t0, 1))
                tx.rollback()
            print(f"  {name}: {out[name][-1]} s", flush=True)
    engine.dispose()
    return out


def take_codes(db_url: str, batch_id: int, n: int, offset: int) -> list[str]:
    conn = psycopg2.connect(db_url)
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT code FROM coupons WHERE batch_id = %s AND status = 'issued'"
            " ORDER BY id OFFSET %s LIMIT %s",
            (batch_id, offset, n),
        )
        out = [r[0] for r in cur.fetchall()]
    conn.close()
    return out


# --------------------------------------------------------------------------------------
# HTTP clients (one process each, persistent connection when the server keeps it)
# --------------------------------------------------------------------------------------


def _http_client(
    port: int,
    token: str,
    work: list[str],
    start_at: float,
    seconds: float,
    exhaust: bool,
    queue: Any,
) -> None:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    hist: dict[int, int] = {}
    statuses: dict[str, int] = {}
    per_code: dict[str, int] = {}
    samples: list[str] = []
    time.sleep(max(0.0, start_at - time.time()))
    end = start_at + seconds
    for code in work:
        if not exhaust and time.time() >= end:
            break
        body = json.dumps(
            {"code": code, "store": "S001", "order_amount": "88.00",
             "transaction_id": uuid.uuid4().hex[:20]}
        ).encode()  # fmt: skip
        t0 = time.perf_counter()
        try:
            conn.request(
                "POST", REDEEM_PATH, body=body,
                headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
            )  # fmt: skip
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            statuses["socket_error"] = statuses.get("socket_error", 0) + 1
            if len(samples) < 3:
                samples.append(repr(exc))
            conn.close()
            continue
        us = int((time.perf_counter() - t0) * 1e6)
        hist[us] = hist.get(us, 0) + 1
        key = str(resp.status)
        if resp.status == 422:
            key = "422 " + json.loads(payload).get("reason", "?")
        statuses[key] = statuses.get(key, 0) + 1
        if resp.status == 201:
            per_code[code] = per_code.get(code, 0) + 1
        elif resp.status != 422 and len(samples) < 3:
            samples.append(f"{resp.status} {payload[:200]!r}")
        if resp.will_close:
            conn.close()
    queue.put({"histogram": hist, "statuses": statuses, "per_code": per_code, "samples": samples})


def run_clients(
    port: int, token: str, slices: list[list[str]], seconds: float, exhaust: bool
) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    queue: Any = ctx.Queue()
    start_at = time.time() + 1.0
    procs = [
        ctx.Process(
            target=_http_client, args=(port, token, work, start_at, seconds, exhaust, queue)
        )
        for work in slices
    ]
    for p in procs:
        p.start()
    parts = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    wall = time.time() - start_at
    hist: dict[int, int] = {}
    statuses: dict[str, int] = {}
    per_code: dict[str, int] = {}
    for part in parts:
        for us, n in part["histogram"].items():
            hist[us] = hist.get(us, 0) + n
        for k, n in part["statuses"].items():
            statuses[k] = statuses.get(k, 0) + n
        for k, n in part["per_code"].items():
            per_code[k] = per_code.get(k, 0) + n
    requests = sum(hist.values())
    return {
        "requests": requests,
        "wall_s": round(wall, 2),
        "rps": round(requests / (seconds if not exhaust else wall), 1),
        "p50_ms": round(percentile(hist, 50), 2),
        "p99_ms": round(percentile(hist, 99), 2),
        "statuses": statuses,
        "per_code": per_code,
        "samples": [s for part in parts for s in part["samples"]][:5],
    }


# --------------------------------------------------------------------------------------
# Service level: coupons.redeem in a loop, one unit of work per redemption
# --------------------------------------------------------------------------------------


def _service_worker(db_url: str, work: list[str], start_at: float, seconds: float, queue: Any):
    from sqlalchemy.orm import Session

    from campaigns import coupons
    from service.config import Config
    from service.db import make_engine

    engine = make_engine(Config(database_url=db_url, redis_url="redis://unused", db_pool_size=1))
    done = 0
    failed = 0
    time.sleep(max(0.0, start_at - time.time()))
    end = start_at + seconds
    for code in work:
        if time.time() >= end:
            break
        try:
            with Session(engine) as s, s.begin():
                coupons.redeem(
                    s,
                    idempotency_key=uuid.uuid4().hex,
                    code=code,
                    member=None,
                    store="S001",
                    order_amount=Decimal("88.00"),
                    transaction_id=None,
                    at=datetime.now(UTC),
                    currency="CNY",
                )
            done += 1
        except coupons.CouponNotUsable:
            failed += 1
    queue.put({"done": done, "failed": failed})


def run_service(db_url: str, slices: list[list[str]], seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    queue: Any = ctx.Queue()
    start_at = time.time() + 1.0
    procs = [
        ctx.Process(target=_service_worker, args=(db_url, w, start_at, seconds, queue))
        for w in slices
    ]
    for p in procs:
        p.start()
    parts = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    done = sum(p["done"] for p in parts)
    return {
        "processes": len(slices),
        "redeemed": done,
        "failed": sum(p["failed"] for p in parts),
        "per_s": round(done / seconds, 1),
    }


def db_check(db_url: str, codes: list[str]) -> dict[str, Any]:
    conn = psycopg2.connect(db_url)
    with conn, conn.cursor() as cur:
        cur.execute(
            """
            SELECT count(*) FILTER (WHERE c.status = 'redeemed'),
                   coalesce(max(r.live), 0), coalesce(min(r.live), 0), coalesce(sum(r.total), 0)
            FROM coupons c
            LEFT JOIN LATERAL (
                SELECT count(*) FILTER (WHERE status = 'redeemed') AS live, count(*) AS total
                FROM coupon_redemptions WHERE coupon_id = c.id
            ) r ON true
            WHERE c.code = ANY(%s)
            """,
            (codes,),
        )
        redeemed, max_live, min_live, total = cur.fetchone()
    conn.close()
    return {
        "codes": len(codes),
        "coupons_redeemed": redeemed,
        "max_redemptions_per_code": max_live,
        "min_redemptions_per_code": min_live,
        "redemption_rows": int(total),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--pg", default=os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
    )
    parser.add_argument("--db-name", default="patron_bench_coupons")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--codes", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--service-procs", type=int, default=2)
    parser.add_argument("--contended", type=int, default=2000)
    parser.add_argument("--contenders", type=int, default=50)
    parser.add_argument(
        "--bulk-variants",
        action="store_true",
        help="first compare three ways of generating --codes codes (rolled back)",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=60, help="wait up to this long for an idle machine"
    )
    parser.add_argument("--skip", action="append", default=[],
                        help="skip a part: sql, http, service, contention")  # fmt: skip
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.bench_coupons", *(argv or sys.argv[1:])]),
        "machine": machine_notes(),
    }
    failures: list[str] = []

    db_url = create_database(args.pg, args.db_name)
    env = {**os.environ, "DATABASE_URL": db_url, "REDIS_URL": args.redis,
           "PATRON_LOG_LEVEL": "WARNING"}  # fmt: skip
    subprocess.run(patron_argv("db", "upgrade"), env=env, check=True, capture_output=True)
    template, token = seed(db_url)

    if "sql" not in args.skip:
        report["sql_codes"] = time_sql_codes(db_url)
        print(f"patron_coupon_code() x 200,000: {report['sql_codes']}", flush=True)

    if args.bulk_variants:
        report["bulk_variants"] = bulk_variants(db_url, template, args.codes)
        print(f"bulk variants: {report['bulk_variants']}", flush=True)
    waited = wait_quiet(args.quiet_wait, 0.3)
    report["bulk"] = b = bulk(db_url, template, args.codes)
    b["waited_for_quiet_s"] = round(waited, 1)
    b["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    print(f"bulk: {b}", flush=True)
    if not (b["stored"] == b["distinct"] == b["well_formed"] == args.codes):
        failures.append(f"bulk: {b}")
    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE coupons")
    conn.close()

    offset = 0
    # Codes for the HTTP run (more than it can use), the contention and the service runs.
    http_codes = min(200_000, max(1000, args.codes // 2))
    per_slice = http_codes // max(1, args.connections)
    if "http" not in args.skip or "contention" not in args.skip:
        with ExitStack() as stack:
            port = free_port()
            proc = start(
                patron_argv("serve", "--workers", str(args.workers), "--port", str(port)),
                {**env, "DATABASE_URL": f"{db_url}?application_name=bench_coupons"},
                OUT / "bench_coupons.server.log",
            )
            stack.callback(stop, proc)
            wait_healthy(port, proc)
            meter = CpuMeter(proc, db_url, "bench_coupons")

            if "http" not in args.skip:
                # Warm-up (prepared statements, imports) on codes of its own.
                warm = take_codes(db_url, b["batch_id"], 400, offset)
                offset += len(warm)
                run_clients(port, token, [warm[i::4] for i in range(4)], 3, exhaust=False)
                work = take_codes(db_url, b["batch_id"], per_slice * args.connections, offset)
                offset += len(work)
                slices = [work[i :: args.connections] for i in range(args.connections)]
                waited = wait_quiet(args.quiet_wait, 0.3)
                before = meter.snapshot()
                r = run_clients(port, token, slices, args.duration, exhaust=False)
                cpu = meter.since(before)
                del r["per_code"]
                r["waited_for_quiet_s"] = round(waited, 1)
                r["cpu"] = {
                    "app_s": cpu.app,
                    "db_s": cpu.db,
                    "client_s": cpu.client,
                    "other_s": cpu.other,
                    "wall_s": cpu.wall,
                    "server_ms_per_request": round(cpu.per_request_ms(r["requests"]), 2),
                    "other_cores": round(cpu.other / cpu.wall, 2) if cpu.wall else None,
                }
                # What 2 cores would serve if the server had them to itself.
                r["capacity_rps_2_cores"] = round(2000 / cpu.per_request_ms(r["requests"]), 1)
                report["http"] = r
                print(f"HTTP redemptions over distinct codes: {r}", flush=True)
                if set(r["statuses"]) != {"201"}:
                    failures.append(f"http: non-201 answers {r['statuses']} {r['samples']}")

            if "contention" not in args.skip:
                contested = take_codes(db_url, b["batch_id"], args.contended, offset)
                offset += len(contested)
                r = run_clients(port, token, [contested] * args.contenders, 0, exhaust=True)
                successes = r.pop("per_code")
                check = db_check(db_url, contested)
                r["attempts"] = r["requests"]
                r["codes_with_one_201"] = sum(1 for n in successes.values() if n == 1)
                r["codes_with_several_201"] = sum(1 for n in successes.values() if n > 1)
                r["database"] = check
                report["contention"] = r
                print(f"contention: {r}", flush=True)
                ok = (
                    check["max_redemptions_per_code"] == 1
                    and check["min_redemptions_per_code"] == 1
                    and check["coupons_redeemed"] == args.contended
                    and check["redemption_rows"] == args.contended
                    and r["statuses"].get("201") == args.contended
                    and r["codes_with_several_201"] == 0
                )
                if not ok:
                    failures.append(f"contention: {r}")

    if "service" not in args.skip and offset < args.codes:
        waited = wait_quiet(args.quiet_wait, 0.3)
        work = take_codes(db_url, b["batch_id"], args.codes - offset, offset)
        offset += len(work)
        slices = [work[i :: args.service_procs] for i in range(args.service_procs)]
        r = run_service(db_url, slices, args.duration)
        r["waited_for_quiet_s"] = round(waited, 1)
        report["service"] = r
        print(f"service-level redemptions: {r}", flush=True)
        if r["failed"]:
            failures.append(f"service: {r}")

    (OUT / "bench_coupons.json").write_text(json.dumps(report, indent=2))
    print(f"written {OUT / 'bench_coupons.json'}")
    if failures:
        print("FAILED:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
