"""Purchase endpoint benchmark: Patron's `POST /v1/events/purchases` beside a bare endpoint.

Both servers run under gunicorn with the settings of `patron serve` (same worker
count, same worker class) against one freshly migrated and seeded database, and
are measured alternately in the same run with the same load: N concurrent
clients on loopback, each request a new transaction id for a random member.

- **patron**: the real endpoint (auth, validation, idempotency, problem+json),
  started with `patron serve --workers W --port P`.
- **bare**: a plain Flask view doing "the same two upserts" with raw psycopg2 —
  insert the transaction row (ON CONFLICT DO NOTHING) and upsert member_stats —
  with no auth, no validation and no idempotency bookkeeping.
- **patron replay**: the same transaction id sent again (the answer of a retry).

Load comes from `wrk` with a Lua script when it is installed (`apt-get install
wrk`), else from a Python client (one process per connection, persistent
`http.client` connections). Every response must be 201: any other status or a
socket error makes the script exit non-zero. At the end the database is checked:
one transaction row per answered request and member_stats counts that agree.

The rounds are short and many (default 20 x 3 s per side, patron and bare taking
turns) so that whatever else the machine does falls on both sides alike. Before each
run the script waits (up to --quiet-wait seconds) until other processes use fewer
than --quiet-cores CPUs, and it reports, per run, the CPU time of each server (its
gunicorn workers plus their PostgreSQL backends, per request) and the CPU used by
everything else ("other"); rounds where both sides ran with the machine quiet are
summarised separately.

    python -m bench.bench_purchase                       # 5 s warm-up, 20 x 3 s per side
    python -m bench.bench_purchase --rounds 4 --duration 10 --client python

Results are printed and written to bench/out/bench_purchase.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PURCHASE_PATH = "/v1/events/purchases"
BARE_PATH = "/bare/purchases"
TZ = timezone(timedelta(hours=8))

# --------------------------------------------------------------------------------------
# The bare endpoint (runs inside its own gunicorn; started by this script)
# --------------------------------------------------------------------------------------

BARE_INSERT = """
INSERT INTO transactions (external_id, kind, member_id, store_id, channel, occurred_at,
                          amount, currency, items)
SELECT %(transaction_id)s, 'purchase', m.id, s.id, %(channel)s, %(occurred_at)s,
       %(amount)s, %(currency)s, %(items)s::jsonb
FROM members m, stores s
WHERE m.external_id = %(member_id)s AND s.code = %(store)s
ON CONFLICT DO NOTHING
RETURNING member_id
"""

BARE_STATS = """
INSERT INTO member_stats AS ms (member_id, first_purchase_at, last_purchase_at,
                                purchase_count, purchase_amount, net_spend, updated_at)
VALUES (%(member)s, %(occurred_at)s, %(occurred_at)s, 1, %(amount)s, %(amount)s, now())
ON CONFLICT (member_id) DO UPDATE SET
    first_purchase_at = LEAST(ms.first_purchase_at, EXCLUDED.first_purchase_at),
    last_purchase_at = GREATEST(ms.last_purchase_at, EXCLUDED.last_purchase_at),
    purchase_count = ms.purchase_count + 1,
    purchase_amount = ms.purchase_amount + EXCLUDED.purchase_amount,
    net_spend = ms.net_spend + EXCLUDED.net_spend,
    updated_at = now()
RETURNING purchase_count, net_spend
"""


def bare_app() -> Any:
    """A Flask app with one view doing the two upserts; one psycopg2 connection per worker."""
    from flask import Flask, Response, request

    app = Flask("bare")
    dsn = os.environ["DATABASE_URL"].replace("postgresql+psycopg2://", "postgresql://", 1)
    conn: Any = None

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(BARE_PATH)
    def purchase() -> Response:
        nonlocal conn
        if conn is None or conn.closed:
            conn = psycopg2.connect(dsn)  # opened after the fork, in the worker
        data = request.get_json()
        params = dict(data, items=json.dumps(data.get("items")))
        with conn, conn.cursor() as cur:  # one transaction, committed on exit
            cur.execute(BARE_INSERT, params)
            row = cur.fetchone()
            body: dict[str, Any] = {"transaction_id": data["transaction_id"]}
            if row is not None:
                cur.execute(BARE_STATS, {**params, "member": row[0]})
                count, spend = cur.fetchone()
                body["member"] = {"purchase_count": count, "net_spend": str(spend)}
        return Response(json.dumps(body), status=201, mimetype="application/json")

    return app


def serve_bare(port: int, workers: int) -> None:
    from service.gunicorn_app import PatronServer, server_options

    PatronServer(server_options("127.0.0.1", port, workers), loader=bare_app).run()


# --------------------------------------------------------------------------------------
# Load generation
# --------------------------------------------------------------------------------------

WRK_SCRIPT = r"""
-- args: prefix members stores occurred_at mode token
local threads = {}
local nthreads = 0

function setup(thread)
  nthreads = nthreads + 1
  thread:set("tid", nthreads)
  table.insert(threads, thread)
end

local function body_for(txid)
  local cents = math.random(100, 99999)
  local amount = string.format("%d.%02d", math.floor(cents / 100), cents % 100)
  return string.format(
    '{"transaction_id":"%s","member_id":"M%07d","store":"S%03d","channel":"pos",' ..
    '"amount":"%s","currency":"CNY","occurred_at":"%s",' ..
    '"items":[{"sku":"SKU-%04d","category":"apparel","quantity":1,"amount":"%s"}]}',
    txid, math.random(1, members), math.random(1, stores), amount, occurred,
    math.random(1, 5000), amount)
end

function init(args)
  prefix = args[1]
  members = tonumber(args[2])
  stores = tonumber(args[3])
  occurred = args[4]
  mode = args[5]
  counter = 0
  bad = 0
  replayed = 0
  statuses = ""
  math.randomseed(tid * 104729 + os.time())
  headers = {["Content-Type"] = "application/json"}
  if args[6] ~= "-" then headers["Authorization"] = "Bearer " .. args[6] end
  if mode == "replay" then
    fixed = wrk.format("POST", nil, headers, body_for(prefix .. "-" .. tid))
  end
end

function request()
  if fixed then return fixed end
  counter = counter + 1
  return wrk.format("POST", nil, headers, body_for(prefix .. "-" .. tid .. "-" .. counter))
end

function response(status, hdrs, body)
  if status ~= 201 then
    bad = bad + 1
    if bad <= 3 then statuses = statuses .. status .. " " .. string.sub(body, 1, 200) .. "\n" end
  end
  if hdrs["Idempotent-Replayed"] == "true" then replayed = replayed + 1 end
end

function done(summary, latency, requests)
  local bad_total, replayed_total, samples = 0, 0, ""
  for _, t in ipairs(threads) do
    bad_total = bad_total + t:get("bad")
    replayed_total = replayed_total + t:get("replayed")
    samples = samples .. t:get("statuses")
  end
  -- The latency histogram (microseconds -> count) so rounds can be merged exactly.
  -- latency(i) is the i-th distinct recorded value and its count; #latency their number.
  local hist = {}
  for i = 1, #latency do
    local us, c = latency(i)
    table.insert(hist, string.format('"%d":%d', us, c))
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"non_201":%d,"replayed":%d,' ..
    '"socket_errors":%d,"histogram":{%s},"samples":%q}\n',
    summary.requests, summary.duration, bad_total, replayed_total,
    e.connect + e.read + e.write + e.timeout, table.concat(hist, ","), samples))
end
"""


@dataclass
class CpuUse:
    """CPU seconds spent during one run: by the server under test, and by everything else."""

    app: float  # gunicorn workers
    db: float  # their PostgreSQL backends
    client: float  # the load generator
    other: float  # the rest of the machine (other jobs, PostgreSQL background processes)
    wall: float

    @property
    def server(self) -> float:
        return self.app + self.db

    def per_request_ms(self, requests: int) -> float:
        return self.server / requests * 1000 if requests else float("nan")


@dataclass
class Run:
    """One measured load run against one target."""

    target: str
    requests: int
    seconds: float
    non_201: int
    socket_errors: int
    replayed: int
    histogram: dict[int, int] = field(repr=False)
    samples: str = ""
    cpu: CpuUse | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def percentile(histogram: dict[int, int], pct: float) -> float:
    """Latency in milliseconds at `pct` (0-100) of a microsecond histogram."""
    total = sum(histogram.values())
    if total == 0:
        return float("nan")
    rank = max(1, round(total * pct / 100))
    seen = 0
    for us in sorted(histogram):
        seen += histogram[us]
        if seen >= rank:
            return us / 1000
    return max(histogram) / 1000


@dataclass
class Load:
    url: str  # http://127.0.0.1:PORT/path
    token: str | None
    members: int
    stores: int
    occurred_at: str
    connections: int
    client: str  # wrk | python
    script: Path | None = None

    def run(self, target: str, prefix: str, seconds: float, mode: str = "fresh") -> Run:
        if self.client == "wrk":
            return self._wrk(target, prefix, seconds, mode)
        return self._python(target, prefix, seconds, mode)

    def _wrk(self, target: str, prefix: str, seconds: float, mode: str) -> Run:
        assert self.script is not None
        argv = [
            "wrk",
            f"-t{self.connections}",
            f"-c{self.connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(self.script),
            self.url,
            "--",
            prefix,
            str(self.members),
            str(self.stores),
            self.occurred_at,
            mode,
            self.token or "-",
        ]
        proc = subprocess.run(argv, check=False, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("WRKJSON ")), None)
        if proc.returncode or line is None:
            raise SystemExit(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        data = json.loads(line[len("WRKJSON ") :])
        return Run(
            target=target,
            requests=data["requests"],
            seconds=data["duration_us"] / 1e6,
            non_201=data["non_201"],
            socket_errors=data["socket_errors"],
            replayed=data["replayed"],
            histogram={int(k): v for k, v in data["histogram"].items()},
            samples=data["samples"],
        )

    def _python(self, target: str, prefix: str, seconds: float, mode: str) -> Run:
        ctx = mp.get_context("fork")
        queue: Any = ctx.Queue()
        start_at = time.time() + 0.5
        procs = [
            ctx.Process(
                target=_python_client,
                args=(self, f"{prefix}-{i + 1}", mode, start_at, seconds, queue),
            )
            for i in range(self.connections)
        ]
        for p in procs:
            p.start()
        parts = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        histogram: dict[int, int] = {}
        for part in parts:
            for us, n in part["histogram"].items():
                histogram[us] = histogram.get(us, 0) + n
        return Run(
            target=target,
            requests=sum(p["requests"] for p in parts),
            seconds=seconds,
            non_201=sum(p["non_201"] for p in parts),
            socket_errors=sum(p["socket_errors"] for p in parts),
            replayed=sum(p["replayed"] for p in parts),
            histogram=histogram,
            samples="".join(p["samples"] for p in parts),
        )


def _body(rng: random.Random, txid: str, load: Load) -> bytes:
    cents = rng.randint(100, 99999)
    amount = f"{cents // 100}.{cents % 100:02d}"
    return json.dumps(
        {
            "transaction_id": txid,
            "member_id": f"M{rng.randint(1, load.members):07d}",
            "store": f"S{rng.randint(1, load.stores):03d}",
            "channel": "pos",
            "amount": amount,
            "currency": "CNY",
            "occurred_at": load.occurred_at,
            "items": [
                {
                    "sku": f"SKU-{rng.randint(1, 5000):04d}",
                    "category": "apparel",
                    "quantity": 1,
                    "amount": amount,
                }
            ],
        },
        separators=(",", ":"),
    ).encode()


def _python_client(
    load: Load, prefix: str, mode: str, start_at: float, seconds: float, queue: Any
) -> None:
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(load.url)
    rng = random.Random(prefix)
    headers = {"Content-Type": "application/json"}
    if load.token:
        headers["Authorization"] = f"Bearer {load.token}"
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)
    fixed = _body(rng, prefix, load) if mode == "replay" else None
    result: dict[str, Any] = {
        "requests": 0,
        "non_201": 0,
        "socket_errors": 0,
        "replayed": 0,
        "histogram": {},
        "samples": "",
    }
    hist: dict[int, int] = result["histogram"]
    time.sleep(max(0.0, start_at - time.time()))
    end = start_at + seconds
    counter = 0
    while time.time() < end:
        counter += 1
        body = fixed or _body(rng, f"{prefix}-{counter}", load)
        t0 = time.perf_counter()
        try:
            conn.request("POST", url.path, body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException):
            result["socket_errors"] += 1
            conn.close()
            continue
        us = int((time.perf_counter() - t0) * 1e6)
        hist[us] = hist.get(us, 0) + 1
        result["requests"] += 1
        if resp.status != 201:
            result["non_201"] += 1
            if result["non_201"] <= 3:
                result["samples"] += f"{resp.status} {payload[:200]!r}\n"
        if resp.getheader("Idempotent-Replayed") == "true":
            result["replayed"] += 1
        if resp.will_close:
            conn.close()  # gunicorn sync workers close after each response
    queue.put(result)


# --------------------------------------------------------------------------------------
# Set-up: database, seed data, API key, servers
# --------------------------------------------------------------------------------------


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def patron_argv(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("patron")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "service.cli", *args]


def create_database(server_url: str, name: str) -> str:
    conn = psycopg2.connect(server_url.rstrip("/") + "/postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return server_url.rstrip("/") + "/" + name


def seed(db_url: str, members: int, stores: int) -> None:
    """Regions, stores and members (each with earlier purchases) in a few set-based statements."""
    conn = psycopg2.connect(db_url)
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO regions (code, name) SELECT 'R' || g, 'Region ' || g"
            " FROM generate_series(1, 5) g"
        )
        cur.execute(
            "INSERT INTO stores (code, name, region_id)"
            " SELECT 'S' || lpad(g::text, 3, '0'), 'Store ' || g,"
            "        (SELECT min(id) FROM regions) + g %% 5"
            " FROM generate_series(1, %s) g",
            (stores,),
        )
        cur.execute(
            "INSERT INTO members (external_id, name, home_store_id, timezone, consent_email)"
            " SELECT 'M' || lpad(g::text, 7, '0'), 'Member ' || g,"
            "        (SELECT min(id) FROM stores) + g %% %s, 'Asia/Shanghai', g %% 3 = 0"
            " FROM generate_series(1, %s) g",
            (stores, members),
        )
        cur.execute(
            "INSERT INTO member_stats (member_id, first_purchase_at, last_purchase_at,"
            "                          purchase_count, purchase_amount, net_spend)"
            " SELECT id, now() - interval '400 days', now() - interval '30 days',"
            "        3, 300, 300 FROM members"
        )
        # Age the statistics table like a live one (updated before, vacuumed since), so
        # the first update of each row is not slower than later ones for whichever
        # side happens to touch it first.
        cur.execute("UPDATE member_stats SET updated_at = updated_at")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE")
    conn.close()


def db_counts(db_url: str) -> tuple[int, int]:
    conn = psycopg2.connect(db_url)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM transactions")
        txs = cur.fetchone()[0]
        cur.execute("SELECT sum(purchase_count) FROM member_stats")
        purchases = cur.fetchone()[0]
    conn.close()
    return int(txs), int(purchases)


def wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server on port {port} exited with {proc.returncode}")
        try:
            url = f"http://127.0.0.1:{port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"server on port {port} did not become healthy")


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # gunicorn arbiter: graceful shutdown of its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def machine_notes() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    """utime + stime of one process in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _machine_busy() -> float:
    """CPU seconds the whole machine has spent not idle since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS


@dataclass
class Snapshot:
    app: dict[int, float]  # worker pid -> CPU seconds
    db: dict[int, float]  # backend pid -> CPU seconds
    children: float  # CPU seconds of finished children of this script (the load generator)
    busy: float  # machine CPU seconds not idle
    at: float


def wait_quiet(max_wait: float, cores: float, window: float = 2.0) -> float:
    """Wait until the machine's other work uses fewer than `cores` CPUs; returns seconds waited.

    Benchmarks on a shared machine are meaningless while another job holds a core.
    """
    start = time.monotonic()
    while time.monotonic() - start < max_wait:
        busy, at = _machine_busy(), time.monotonic()
        time.sleep(window)
        if (_machine_busy() - busy) / (time.monotonic() - at) < cores:
            break
    return time.monotonic() - start


class CpuMeter:
    """Attributes CPU time to one server: its gunicorn workers and their database backends."""

    def __init__(self, proc: subprocess.Popen[bytes], db_url: str, application_name: str):
        self.proc = proc
        self.db_url = db_url
        self.application_name = application_name

    def _pids(self) -> tuple[list[int], list[int]]:
        conn = psycopg2.connect(self.db_url)
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                (self.application_name,),
            )
            backends = [row[0] for row in cur.fetchall()]
        conn.close()
        return _children(self.proc.pid), backends

    def snapshot(self) -> Snapshot:
        workers, backends = self._pids()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return Snapshot(
            {pid: _proc_cpu(pid) for pid in workers},
            {pid: _proc_cpu(pid) for pid in backends},
            children.ru_utime + children.ru_stime,
            _machine_busy(),
            time.monotonic(),
        )

    def since(self, before: Snapshot) -> CpuUse:
        after = self.snapshot()
        app = sum(cpu - before.app.get(pid, 0.0) for pid, cpu in after.app.items())
        db = sum(cpu - before.db.get(pid, 0.0) for pid, cpu in after.db.items())
        client = after.children - before.children
        total = after.busy - before.busy
        return CpuUse(
            app=round(app, 2),
            db=round(db, 2),
            client=round(client, 2),
            other=round(max(0.0, total - app - db - client), 2),
            wall=round(after.at - before.at, 2),
        )


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _other_cores(run: Run) -> float:
    return run.cpu.other / run.cpu.wall if run.cpu and run.cpu.wall else float("inf")


def summarize(name: str, runs: list[Run]) -> dict[str, Any]:
    hist: dict[int, int] = {}
    for r in runs:
        for us, n in r.histogram.items():
            hist[us] = hist.get(us, 0) + n
    requests = sum(r.requests for r in runs)
    seconds = sum(r.seconds for r in runs)
    server_cpu = sum(r.cpu.server for r in runs if r.cpu)
    app_cpu = sum(r.cpu.app for r in runs if r.cpu)
    other_cpu = sum(r.cpu.other for r in runs if r.cpu)
    return {
        "target": name,
        "requests": requests,
        "seconds": round(seconds, 2),
        "rps": round(requests / seconds, 1) if seconds else 0.0,
        "p50_ms": round(percentile(hist, 50), 2),
        "p90_ms": round(percentile(hist, 90), 2),
        "p99_ms": round(percentile(hist, 99), 2),
        "max_ms": round(max(hist) / 1000, 2) if hist else None,
        "server_cpu_ms_per_request": round(server_cpu / requests * 1000, 2) if requests else None,
        "app_cpu_ms_per_request": round(app_cpu / requests * 1000, 2) if requests else None,
        # Cores used by everything else on the machine during these runs (ideally ~0).
        "other_cores": round(other_cpu / seconds, 2) if seconds else None,
        "non_201": sum(r.non_201 for r in runs),
        "socket_errors": sum(r.socket_errors for r in runs),
        "replayed": sum(r.replayed for r in runs),
        "per_round_rps": [round(r.rps, 1) for r in runs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=3, help="seconds per measured run")
    parser.add_argument("--rounds", type=int, default=20, help="alternating patron/bare rounds")
    parser.add_argument("--warmup", type=float, default=5, help="seconds of warm-up per side")
    parser.add_argument("--replay", type=float, default=5, help="seconds of replays (0: skip)")
    parser.add_argument("--connections", type=int, default=4, help="concurrent clients")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers per server")
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--stores", type=int, default=50)
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument(
        "--pg", default="postgresql://postgres@127.0.0.1:5432", help="PostgreSQL server URL"
    )
    parser.add_argument("--db-name", default="patron_bench_purchase")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--keep-db", action="store_true", help="reuse the seeded database")
    parser.add_argument(
        "--campaigns",
        type=int,
        default=0,
        help="active purchase-triggered campaigns (bench/bench_campaigns.py PURCHASE_CAMPAIGNS)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60,
        help="before each run, wait up to this many seconds for other jobs to leave the CPUs",
    )
    parser.add_argument(
        "--quiet-cores", type=float, default=0.2, help="'quiet' means fewer busy cores than this"
    )
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve_bare:
        serve_bare(args.serve_bare, args.workers)
        return 0

    # Stop the servers on Ctrl-C or SIGTERM too (the ExitStack below cleans up on exit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "python"
    OUT.mkdir(parents=True, exist_ok=True)
    db_url = args.pg.rstrip("/") + "/" + args.db_name
    env = {**os.environ, "DATABASE_URL": db_url, "REDIS_URL": args.redis_url}
    env["PYTHONUNBUFFERED"] = "1"
    # Measure the source tree this script lives in, whatever the installed copy is.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

    if args.keep_db:
        print(f"database {db_url}: reusing", flush=True)
    else:
        print(f"database {db_url}: creating, migrating, seeding {args.members} members", flush=True)
        create_database(args.pg, args.db_name)
        subprocess.run(patron_argv("db", "upgrade"), env=env, check=True, cwd=ROOT)
        seed(db_url, args.members, args.stores)
    if args.campaigns:
        from bench.bench_campaigns import install_purchase_campaigns

        # Ends the campaigns an earlier run left active (--keep-db), then adds these.
        ids = install_purchase_campaigns(db_url, args.campaigns)
        print(f"{len(ids)} active purchase campaigns (ids {ids[0]}..{ids[-1]})", flush=True)
    keys = subprocess.run(
        patron_argv("keys", "create", "--role", "pos", "--name", "bench-pos"),
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    token = keys.stdout.strip().splitlines()[-1]

    run_tag = datetime.now(UTC).strftime("%H%M%S")
    occurred_at = (datetime.now(TZ) - timedelta(hours=1)).replace(microsecond=0).isoformat()
    results: dict[str, list[Run]] = {"patron": [], "bare": [], "patron replay": []}
    replay_first = 0  # the first request of each replaying client records the purchase

    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "purchase.lua"
        script.write_text(WRK_SCRIPT)
        servers: dict[str, tuple[Load, CpuMeter]] = {}
        for name, path, auth in (("patron", PURCHASE_PATH, token), ("bare", BARE_PATH, None)):
            port = free_port()
            # The application name tells this server's database backends apart (CPU use).
            server_env = dict(env, DATABASE_URL=f"{db_url}?application_name=bench_{name}")
            if name == "patron":
                argv_ = patron_argv("serve", "--workers", str(args.workers), "--port", str(port))
            else:
                argv_ = [sys.executable, "-m", "bench.bench_purchase"]
                argv_ += ["--workers", str(args.workers), "--serve-bare", str(port)]
            proc = start(argv_, server_env, OUT / f"bench_purchase.{name}.log")
            stack.callback(stop, proc)
            wait_healthy(port, proc)
            load = Load(
                url=f"http://127.0.0.1:{port}{path}",
                token=auth,
                members=args.members,
                stores=args.stores,
                occurred_at=occurred_at,
                connections=args.connections,
                client=client,
                script=script,
            )
            servers[name] = (load, CpuMeter(proc, db_url, f"bench_{name}"))

        def measure(name: str, prefix: str, seconds: float, mode: str = "fresh") -> Run:
            load, meter = servers[name.split()[0]]
            waited = wait_quiet(args.quiet_wait, args.quiet_cores)
            if waited >= args.quiet_wait > 0:
                print(f"  (machine still busy after {waited:.0f} s; measuring anyway)")
            before = meter.snapshot()
            run = load.run(name, prefix, seconds, mode)
            run.cpu = meter.since(before)
            return run

        before_counts = db_counts(db_url)
        answered = 0
        print(f"warm-up: {args.warmup:g} s per side ({client}, {args.connections} clients)")
        for name in servers:
            warm = measure(name, f"w{run_tag}-{name[0]}", args.warmup)
            answered += warm.requests
            if warm.non_201 or warm.socket_errors:
                raise SystemExit(f"warm-up against {name} failed:\n{warm.samples}")
        for rnd in range(args.rounds):
            order = ["patron", "bare"] if rnd % 2 == 0 else ["bare", "patron"]
            for name in order:
                r = measure(name, f"r{run_tag}-{rnd}{name[0]}", args.duration)
                answered += r.requests
                results[name].append(r)
                assert r.cpu is not None
                print(
                    f"round {rnd + 1} {name:<6} {r.rps:7.1f} req/s  "
                    f"p50 {percentile(r.histogram, 50):6.2f} ms  "
                    f"p99 {percentile(r.histogram, 99):6.2f} ms  "
                    f"CPU/req {r.cpu.per_request_ms(r.requests):4.2f} ms "
                    f"(app {r.cpu.app / max(1, r.requests) * 1000:4.2f})  "
                    f"other load {r.cpu.other / r.cpu.wall:4.2f} cores  non-201 {r.non_201}",
                    flush=True,
                )
        if args.replay > 0:
            r = measure("patron replay", f"p{run_tag}", args.replay, mode="replay")
            results["patron replay"].append(r)
            replay_first = args.connections
        after_counts = db_counts(db_url)

    summary = [summarize(name, runs) for name, runs in results.items() if runs]
    by_name = {s["target"]: s for s in summary}
    ratio = by_name["patron"]["rps"] / by_name["bare"]["rps"]
    pairs = list(zip(results["patron"], results["bare"], strict=True))
    round_ratios = sorted(p.rps / b.rps for p, b in pairs)
    median_ratio = statistics.median(round_ratios)
    # Rounds in which nothing else ran on the machine (both runs of the pair): the
    # figures that describe Patron rather than its neighbours.
    quiet = [(p, b) for p, b in pairs if max(_other_cores(p), _other_cores(b)) < args.quiet_cores]
    quiet_summary = []
    quiet_ratio = None
    if quiet:
        quiet_summary = [
            summarize("patron (quiet)", [p for p, _ in quiet]),
            summarize("bare (quiet)", [b for _, b in quiet]),
        ]
        quiet_ratio = quiet_summary[0]["rps"] / quiet_summary[1]["rps"]
    print()
    print(
        f"{'target':<15} {'req/s':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
        f"{'CPU ms/req':>10} {'app':>5} {'other':>5} {'non-201':>7}"
    )
    for s in summary + quiet_summary:
        print(
            f"{s['target']:<15} {s['rps']:8.1f} {s['p50_ms']:7.2f} {s['p90_ms']:7.2f} "
            f"{s['p99_ms']:7.2f} {s['server_cpu_ms_per_request']:10.2f} "
            f"{s['app_cpu_ms_per_request']:5.2f} {s['other_cores']:5.2f} {s['non_201']:7d}"
        )
    print(
        f"throughput ratio patron/bare: {ratio:.2f} overall, {median_ratio:.2f} median of rounds"
        f" ({', '.join(f'{x:.2f}' for x in round_ratios)})"
    )
    if quiet_ratio is not None:
        print(f"quiet rounds ({len(quiet)} of {len(pairs)}): ratio {quiet_ratio:.2f}")
    else:
        print(f"no quiet rounds (other load below {args.quiet_cores} cores on both sides)")

    failures = []
    for s in summary:
        if s["non_201"] or s["socket_errors"]:
            samples = "".join(r.samples for r in results[s["target"]])
            failures.append(
                f"{s['target']}: {s['non_201']} non-201 responses and {s['socket_errors']} "
                f"socket errors\n{samples}"
            )
    new_txs = after_counts[0] - before_counts[0]
    new_purchases = after_counts[1] - before_counts[1]
    # Requests in flight when a run stops are committed but not counted by the client.
    upper = answered + args.connections * (2 * args.rounds + 2)
    if results["patron replay"]:
        rp = by_name["patron replay"]
        if rp["replayed"] < rp["requests"] - replay_first:
            failures.append(f"replay: only {rp['replayed']} of {rp['requests']} were replays")
        answered += replay_first
        upper += replay_first
    if not (answered <= new_txs <= upper) or new_purchases != new_txs:
        failures.append(
            f"database check: {new_txs} new transactions and {new_purchases} new purchase counts"
            f" for {answered} answered new purchases"
        )
    print(f"database check: {new_txs} new transaction rows, member_stats +{new_purchases}")

    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.bench_purchase", *(argv or sys.argv[1:])]),
        "client": client,
        "connections": args.connections,
        "workers": args.workers,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "warmup_s": args.warmup,
        "members": args.members,
        "stores": args.stores,
        "campaigns": args.campaigns,
        "machine": machine_notes(),
        "ratio": round(ratio, 3),
        "median_round_ratio": round(median_ratio, 3),
        "quiet_rounds": len(quiet),
        "quiet_ratio": round(quiet_ratio, 3) if quiet_ratio is not None else None,
        "results": summary + quiet_summary,
        "runs": [
            {k: v for k, v in asdict(r).items() if k != "histogram"}
            for runs in results.values()
            for r in runs
        ],
    }
    (OUT / "bench_purchase.json").write_text(json.dumps(report, indent=2))
    print(f"written {OUT / 'bench_purchase.json'}")
    if failures:
        print("FAILED:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
