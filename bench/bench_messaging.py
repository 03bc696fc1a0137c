"""Messaging throughput: outbox → dispatcher → RQ → 2 delivery workers → channel.

  DATABASE_URL=postgresql://... REDIS_URL=redis://.../N \
  .venv/bin/python -m bench.bench_messaging --noop 1000000 --http 40000 --workers 2

DESTRUCTIVE: drops and recreates the public schema of DATABASE_URL, flushes REDIS_URL's db.
The `noop` run delivers N messages to the no-op channel (the issue: 1M in ≤ 60 s with
≤ 1 RQ job per 100 messages); the `http` run delivers to an HTTP provider on loopback
(an asyncio server in its own process; the issue: ≥ 2,000 messages/s). The clock starts
when the dispatcher and workers start and stops when no message is left undelivered.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from multiprocessing import Process
from pathlib import Path

from sqlalchemy import create_engine, text

from service import migrate
from service.db import normalise_url

PATRON = str(Path(sys.executable).with_name("patron"))


def provider(port: int) -> None:
    """A minimal HTTP/1.1 keep-alive provider: answers 200 with an id to every POST."""

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while True:
                head_end = self.buffer.find(b"\r\n\r\n")
                if head_end < 0:
                    return
                head = self.buffer[:head_end].decode("latin-1")
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if len(self.buffer) < head_end + 4 + length:
                    return
                self.buffer = self.buffer[head_end + 4 + length :]
                body = b'{"id": "ok"}'
                self.transport.write(  # type: ignore[attr-defined]
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Proto, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(main())


def prepare(engine, members: int, messages: int) -> None:
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


def run(engine, env: dict[str, str], workers: int, total: int) -> dict[str, float]:
    import redis

    r = redis.Redis.from_url(env["REDIS_URL"])
    r.flushdb()
    procs = [subprocess.Popen([PATRON, "delivery-worker"], env=env) for _ in range(workers)]
    time.sleep(2.0)  # workers up before the clock starts
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
    finally:
        for p in [dispatcher, *procs]:
            p.terminate()
        for p in [dispatcher, *procs]:
            p.wait(30)
    from rq import Queue

    queue = Queue(env.get("PATRON_MESSAGE_QUEUE", "default"), connection=r)
    jobs = queue.finished_job_registry.count + queue.failed_job_registry.count
    with engine.connect() as conn:
        sent = conn.execute(
            text("SELECT count(*) FROM outbox_messages WHERE status = 'sent'")
        ).scalar()
    return {
        "messages": total,
        "sent": sent,
        "seconds": round(elapsed, 1),
        "per_second": round(total / elapsed),
        "jobs": jobs,
        "messages_per_job": round(total / max(jobs, 1), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--noop", type=int, default=1_000_000)
    parser.add_argument("--http", type=int, default=40_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    engine = create_engine(normalise_url(os.environ["DATABASE_URL"]))
    base = dict(os.environ)
    base.update(
        {
            "PATRON_LOG_LEVEL": "WARNING",
            "PATRON_QUIET_HOURS": "off",
            "PATRON_MESSAGE_QUEUE": "bench-messages",
            "PATRON_MESSAGE_BATCH": str(args.batch),
            "PATRON_MESSAGE_CHUNK": str(args.batch),
            "PATRON_DISPATCH_LIMIT": "20000",
            "PATRON_DISPATCH_INTERVAL": "0.2",
        }
    )
    if args.noop:
        prepare(engine, args.noop, args.noop)
        env = {**base, "PATRON_SMS_TRANSPORT": "noop"}
        print("noop:", run(engine, env, args.workers, args.noop), flush=True)
    if args.http:
        port = 18765
        server = Process(target=provider, args=(port,), daemon=True)
        server.start()
        prepare(engine, args.http, args.http)
        env = {
            **base,
            "PATRON_SMS_TRANSPORT": "http",
            "PATRON_SMS_URL": f"http://127.0.0.1:{port}/sms",
            "PATRON_SMS_CONCURRENCY": "16",
        }
        print("http:", run(engine, env, args.workers, args.http), flush=True)
        server.terminate()


if __name__ == "__main__":
    main()
