"""Messaging throughput: outbox → dispatcher → RQ → 2 delivery workers → channel.

  DATABASE_URL=postgresql://... REDIS_URL=redis://.../N \
  .venv/bin/python -m bench.bench_messaging --noop 1000000 --http 40000 --workers 2

DESTRUCTIVE: drops and recreates the public schema of DATABASE_URL, flushes REDIS_URL's db.
The `noop` run delivers N messages to the no-op channel (the issue: 1M in ≤ 60 s with
≤ 1 RQ job per 100 messages); the `http` run delivers to an HTTP provider on loopback
(the issue: ≥ 2,000 messages/s). The clock starts when the dispatcher and workers start
and stops when no message is left undelivered.

Besides wall time each run reports the CPU it cost per message — worker processes, the
dispatcher, the PostgreSQL backends serving them, the provider — read from /proc, so a
figure taken on a machine shared with other work can be judged: on a shared machine the
wall time says how much CPU the run got, the CPU per message what it needed.

  --provider-only N   measure the loopback provider alone (N requests from 2 client
                      processes of 16 kept-alive connections, one request in flight on
                      each, as the workers send): it must answer far faster than the
                      workers send, or the HTTP figure measures it.
  --clients N         client CPU per request of urllib3's PoolManager against the HTTP
                      channel (http.client, one kept-alive connection per thread).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from multiprocessing import Process, Queue
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

from service import migrate
from service.db import normalise_url

PATRON = str(Path(sys.executable).with_name("patron"))
ANSWER = b'{"id": "ok"}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(ANSWER)).encode()
    + b"\r\n\r\n"
    + ANSWER
)


def provider(port: int) -> None:
    """A minimal HTTP/1.1 keep-alive provider: answers 200 with an id to every POST.

    asyncio, one process per core sharing the port (SO_REUSEPORT): parsing is a find()
    for the end of the head and of Content-Length, and all answers to the requests that
    arrived together leave in one write.
    """

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            buffer = self.buffer + data
            answers = 0
            while True:
                head_end = buffer.find(b"\r\n\r\n")
                if head_end < 0:
                    break
                at = buffer.lower().find(b"content-length:", 0, head_end)
                length = 0
                if at >= 0:
                    line_end = buffer.find(b"\r\n", at, head_end + 2)
                    length = int(buffer[at + 15 : line_end])
                if len(buffer) < head_end + 4 + length:
                    break
                buffer = buffer[head_end + 4 + length :]
                answers += 1
            self.buffer = buffer
            if answers:
                self.transport.write(RESPONSE * answers)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Proto, "127.0.0.1", port, reuse_port=True)
        await server.serve_forever()

    asyncio.run(main())


def start_provider(port: int, processes: int) -> list[Process]:
    procs = [Process(target=provider, args=(port,), daemon=True) for _ in range(processes)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    return procs


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU of these processes so far (0 for those gone)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def backend_pids(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalars()
        )


def prepare(engine: Engine, members: int, messages: int) -> None:
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO members (external_id, phone, consent_sms, timezone, locale) "
                "SELECT 'B-' || n, '+86138' || lpad(n::text, 8, '0'), true, 'Asia/Shanghai', "
                "'zh-CN' FROM generate_series(1, :n) n"
            ),
            {"n": members},
        )
        conn.execute(
            text(
                "INSERT INTO message_templates (name, channel, locale, subject, body, updated_by) "
                "VALUES ('bench', 'sms', 'zh-CN', '', "
                "'{{ member.external_id }}，您的优惠券 {{ coupon.code }} 已到账', 'bench')"
            )
        )
        # As a campaign batch writes them: INSERT … SELECT with the defaults.
        conn.execute(
            text(
                "INSERT INTO outbox_messages (member_id, campaign_id, decision_id, template, "
                "kind, payload) SELECT id, 1, id, 'bench', 'marketing', "
                "jsonb_build_object('coupon', jsonb_build_object('code', 'C' || id, "
                "'amount_off', '20')) FROM members ORDER BY id LIMIT :m"
            ),
            {"m": messages},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE outbox_messages"))
        conn.execute(text("VACUUM ANALYZE members"))


def run(
    engine: Engine, env: dict[str, str], workers: int, total: int, others: list[int]
) -> dict[str, Any]:
    import redis

    r = redis.Redis.from_url(env["REDIS_URL"])
    r.flushdb()
    procs = [subprocess.Popen([PATRON, "delivery-worker"], env=env) for _ in range(workers)]
    time.sleep(2.0)  # workers up before the clock starts
    before_backends = set(backend_pids(engine))
    base = {
        "workers": cpu_seconds(p.pid for p in procs),
        "postgres": cpu_seconds(before_backends),
        "provider": cpu_seconds(others),
    }
    started = time.perf_counter()
    dispatcher = subprocess.Popen([PATRON, "dispatcher"], env=env)
    remaining = total
    try:
        while True:
            time.sleep(0.5)
            with engine.connect() as conn:
                remaining = conn.execute(
                    text(
                        "SELECT count(*) FROM outbox_messages "
                        "WHERE status IN ('queued', 'sending', 'deferred')"
                    )
                ).scalar()
            if remaining == 0:
                break
        elapsed = time.perf_counter() - started
        spent = {
            "workers": cpu_seconds(p.pid for p in procs) - base["workers"],
            "dispatcher": cpu_seconds([dispatcher.pid]),
            # Backends still open now; the workers' and dispatcher's are (pooled).
            "postgres": cpu_seconds(backend_pids(engine)) - base["postgres"],
            "provider": cpu_seconds(others) - base["provider"],
        }
    finally:
        for p in [dispatcher, *procs]:
            p.terminate()
        for p in [dispatcher, *procs]:
            p.wait(30)
    from rq import Queue as RQueue

    queue = RQueue(env.get("PATRON_MESSAGE_QUEUE", "default"), connection=r)
    jobs = queue.finished_job_registry.count + queue.failed_job_registry.count
    with engine.connect() as conn:
        sent = conn.execute(
            text("SELECT count(*) FROM outbox_messages WHERE status = 'sent'")
        ).scalar()
    per_message = {k: round(v / total * 1e6, 1) for k, v in spent.items() if v or k != "provider"}
    cpu_total = sum(spent.values())
    return {
        "messages": total,
        "sent": sent,
        "seconds": round(elapsed, 1),
        "per_second": round(total / elapsed),
        "jobs": jobs,
        "messages_per_job": round(total / max(jobs, 1), 1),
        "cpu_us_per_message": per_message,
        # What 2 otherwise idle cores could do at this CPU cost (a projection, not a run).
        "cpu_bound_per_second_on_2_cores": round(2 * total / cpu_total) if cpu_total else None,
        "load_average": os.getloadavg()[0],
    }


def _blast(port: int, count: int, connections: int, out: Queue) -> None:
    """Send `count` requests over `connections` kept-alive connections, one in flight on
    each, as the workers do (no pipelining): a load generator that costs little per
    request (one send and one recv), so the provider's own limit shows."""
    body = json.dumps({"to": "+8613800000000", "text": "x" * 40, "message_id": 1}).encode()
    request = (
        b"POST /sms HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Idempotency-Key: patron-msg-1\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    for sock in socks:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    received = 0
    rounds = count // connections
    for _ in range(rounds):
        for sock in socks:
            sock.sendall(request)
        for sock in socks:
            data = b""
            while not data.endswith(ANSWER):
                data += sock.recv(4096)
            received += 1
    for sock in socks:
        sock.close()
    out.put(received)


def provider_only(requests: int, processes: int, connections: int) -> dict[str, Any]:
    port = 18766
    servers = start_provider(port, processes)
    out: Queue = Queue()
    share = requests // connections  # per client process, 16 connections each
    clients = [Process(target=_blast, args=(port, share, 32, out)) for _ in range(connections)]
    base = cpu_seconds(p.pid for p in servers)
    started = time.perf_counter()
    for c in clients:
        c.start()
    done = sum(out.get() for _ in clients)
    elapsed = time.perf_counter() - started
    spent = cpu_seconds(p.pid for p in servers) - base
    for c in clients:
        c.join()
    for s in servers:
        s.terminate()
    return {
        "requests": done,
        "seconds": round(elapsed, 2),
        "per_second": round(done / elapsed),
        "provider_cpu_us_per_request": round(spent / done * 1e6, 1),
        "provider_processes": processes,
        "load_average": os.getloadavg()[0],
    }


def clients(requests: int) -> dict[str, Any]:
    """Client CPU per request, urllib3 PoolManager vs the HTTP channel, 16 threads each."""
    from concurrent.futures import ThreadPoolExecutor

    import urllib3

    from campaigns.channels import Outgoing
    from campaigns.channels.config import MessagingConfig
    from campaigns.channels.http import HttpProviderChannel

    port = 18767
    servers = start_provider(port, 1)
    url = f"http://127.0.0.1:{port}/sms"
    config = MessagingConfig.from_env(
        {"PATRON_SMS_TRANSPORT": "http", "PATRON_SMS_URL": url, "PATRON_SMS_CONCURRENCY": "16"}
    )
    channel = HttpProviderChannel(config.channels["sms"])
    messages = [
        Outgoing(i, "sms", "+8613800000000", "", "B-1，您的优惠券 C1 已到账", i, "B-1")
        for i in range(requests)
    ]
    pool = urllib3.PoolManager(maxsize=16, retries=False, timeout=urllib3.Timeout(total=5))

    def with_urllib3(message: Outgoing) -> int:
        body = channel.request_body(message)
        headers = channel.headers_for(message, body)
        return pool.request("POST", url, body=body, headers=headers).status

    results: dict[str, Any] = {}
    with ThreadPoolExecutor(16) as executor:
        for name, call in (("urllib3_pool_manager", with_urllib3), ("channel", channel.send_one)):
            list(executor.map(call, messages[:200]))  # connections open, code warm
            cpu, wall = time.process_time(), time.perf_counter()
            list(executor.map(call, messages))
            results[name] = {
                "client_cpu_us_per_request": round((time.process_time() - cpu) / requests * 1e6),
                "per_second": round(requests / (time.perf_counter() - wall)),
            }
    channel.close()
    for s in servers:
        s.terminate()
    return {**results, "load_average": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--noop", type=int, default=1_000_000)
    parser.add_argument("--http", type=int, default=40_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2000, help="messages per RQ job")
    parser.add_argument("--chunk", type=int, default=1000, help="messages per transaction")
    parser.add_argument("--http-concurrency", type=int, default=16)
    parser.add_argument("--provider-processes", type=int, default=1)
    parser.add_argument("--provider-only", type=int, default=0)
    parser.add_argument("--clients", type=int, default=0)
    args = parser.parse_args()
    if args.provider_only:
        print(
            "provider:",
            provider_only(args.provider_only, args.provider_processes, 2),
            flush=True,
        )
        return
    if args.clients:
        print("clients:", clients(args.clients), flush=True)
        return
    engine = create_engine(normalise_url(os.environ["DATABASE_URL"]))
    base = dict(os.environ)
    base.update(
        {
            "PATRON_LOG_LEVEL": "WARNING",
            "PATRON_QUIET_HOURS": "off",
            "PATRON_MESSAGE_QUEUE": "bench-messages",
            "PATRON_MESSAGE_BATCH": str(args.batch),
            "PATRON_MESSAGE_CHUNK": str(args.chunk),
            "PATRON_DISPATCH_LIMIT": "20000",
            "PATRON_DISPATCH_INTERVAL": "0.2",
        }
    )
    if args.noop:
        prepare(engine, args.noop, args.noop)
        env = {**base, "PATRON_SMS_TRANSPORT": "noop"}
        print("noop:", run(engine, env, args.workers, args.noop, []), flush=True)
    if args.http:
        port = 18765
        servers = start_provider(port, args.provider_processes)
        prepare(engine, args.http, args.http)
        env = {
            **base,
            "PATRON_SMS_TRANSPORT": "http",
            "PATRON_SMS_URL": f"http://127.0.0.1:{port}/sms",
            "PATRON_SMS_CONCURRENCY": str(args.http_concurrency),
        }
        pids = [p.pid for p in servers if p.pid is not None]
        print("http:", run(engine, env, args.workers, args.http, pids), flush=True)
        for s in servers:
            s.terminate()


if __name__ == "__main__":
    main()
