"""Fault tests with real processes: a worker SIGKILLed mid-batch, Redis stopped while
purchases keep arriving, a provider answering 500 then 200.

Workers are `patron delivery-worker` subprocesses; the dispatcher and sweeper run in a
thread of the test. Deliveries are counted at the recording HTTP provider, which (like
real providers) honours the Idempotency-Key.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import redis
import requests
from sqlalchemy import Engine, text

from campaigns.channels.config import MessagingConfig
from campaigns.dispatch import run_dispatcher
from service.app import create_app
from service.config import Config
from service.stores import upsert_store
from tests.campaigns.messaging_helpers import Data, RecordingServer, committed_data, free_port
from tests.conftest import LiveServer, purchase_payload, unique

PATRON = str(Path(sys.executable).with_name("patron"))
REDIS_SERVER = shutil.which("redis-server")


def worker_env(config: Config, redis_url: str, provider: RecordingServer, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": str(config.database_url),
            "REDIS_URL": redis_url,
            "PATRON_LOG_LEVEL": "WARNING",
            "PATRON_QUIET_HOURS": "off",
            "PATRON_FREQUENCY_CAP": "off",
            "PATRON_SMS_TRANSPORT": "http",
            "PATRON_SMS_URL": provider.url,
            "PATRON_MESSAGE_QUEUE": f"faults-{uuid.uuid4().hex[:8]}",
            "PATRON_MESSAGE_BATCH": "100",
            "PATRON_MESSAGE_CHUNK": "50",
            "PATRON_MESSAGE_LEASE_SECONDS": "3",
            "PATRON_REDISPATCH_SECONDS": "3",
            "PATRON_RETRY_BASE_SECONDS": "0.3",
            "PATRON_DISPATCH_INTERVAL": "0.2",
        }
    )
    env.update(extra)
    return env


def start_worker(env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [PATRON, "delivery-worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def dispatcher(engine: Engine, env: dict) -> Iterator[None]:
    config = MessagingConfig.from_env(env)
    halt = threading.Event()
    connection = redis.Redis.from_url(env["REDIS_URL"], socket_timeout=2, socket_connect_timeout=1)
    thread = threading.Thread(
        target=run_dispatcher,
        args=(engine, connection, config),
        kwargs={"stop": halt},
        daemon=True,
    )
    thread.start()
    try:
        yield
    finally:
        halt.set()
        thread.join(15)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def all_sent(data: Data, ids: list[int]) -> Callable[[], bool]:
    return lambda: {r["status"] for r in data.statuses(ids).values()} == {"sent"}


@pytest.fixture
def data(engine: Engine) -> Iterator[Data]:
    with committed_data(engine) as d:
        yield d


@pytest.mark.slow
def test_worker_killed_mid_batch_then_every_message_delivered_exactly_once(
    engine: Engine, config: Config, data: Data
):
    t = data.template("kill", {("sms", "zh-CN"): ("", "hello {{ member.external_id }}")})
    ids = data.messages(data.members(300), t)
    gate = threading.Event()
    with RecordingServer() as provider:
        # After 120 requests the provider stalls: the worker is stuck mid-chunk with
        # requests in flight when it is killed.
        def responder(index: int, headers: dict) -> tuple[int, dict, bytes]:
            if index >= 120 and not gate.is_set():
                gate.wait(20)
            return 200, {}, b'{"id": "ok"}'

        provider.responder = responder
        env = worker_env(config, str(config.redis_url), provider)
        with dispatcher(engine, env):
            first = start_worker(env)
            wait_for(lambda: len(provider.requests) > 120, 60, "the worker to reach the stall")
            first.send_signal(signal.SIGKILL)
            first.wait()
            gate.set()  # the stalled requests now complete at the provider: Patron never hears
            second = start_worker(env)
            try:
                wait_for(all_sent(data, ids), 90, "every message to be sent")
            finally:
                stop(second)
    assert provider.delivered_ids() == sorted(ids), "each message delivered exactly once"
    # Only sends in flight or not yet recorded at the kill went out again, with the same
    # idempotency key: at most 2 × the channel's concurrency (8): 8 in flight, 8 being recorded.
    assert provider.duplicates <= 16
    # The rows the killed worker held were reclaimed after their lease and sent again.
    assert any(r["attempts"] == 2 for r in data.statuses(ids).values())


@contextmanager
def own_redis(port: int) -> Iterator[subprocess.Popen]:
    assert REDIS_SERVER, "redis-server is needed for the outage test"
    process = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--bind",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    wait_for(lambda: _pings(client), 10, "redis to start")
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.mark.slow
def test_redis_outage_loses_no_purchase_or_message_and_delivery_resumes(
    engine: Engine, config: Config, data: Data, committed
):
    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    store = unique("S")
    committed(lambda s: upsert_store(s, store, "Outage store", "East", actor="test"))
    members = data.members(1)
    external = data.prefix + "-0-1"
    t = data.template("outage", {("sms", "zh-CN"): ("", "thanks")})
    from service.auth import create_key

    key = committed(lambda s: create_key(s, "pos", "outage-pos"))
    app = create_app(replace(config, redis_url=redis_url), engine=engine)
    ids: list[int] = []
    posted: list[str] = []

    def purchase_and_message() -> None:
        payload = purchase_payload(external, store)
        resp = requests.post(
            f"{server.url}/v1/events/purchases",
            json=payload,
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert resp.status_code == 201, resp.text
        posted.append(payload["transaction_id"])
        # What a purchase-triggered campaign writes with its decision.
        ids.extend(data.messages(members, t, kind="transactional"))

    with RecordingServer() as provider, LiveServer(app) as server:
        env = worker_env(config, redis_url, provider)
        with own_redis(port) as redis_process, dispatcher(engine, env):
            worker = start_worker(env)
            for _ in range(20):
                purchase_and_message()
            wait_for(all_sent(data, ids), 60, "delivery before the outage")
            redis_process.terminate()
            redis_process.wait(10)
            for _ in range(30):  # purchases keep arriving while Redis is down
                purchase_and_message()
            time.sleep(1.5)
            assert {r["status"] for r in data.statuses(ids[20:]).values()} == {"queued"}
            stop(worker)
            with own_redis(port):  # back, empty: every job it held is gone
                worker = start_worker(env)
                try:
                    wait_for(all_sent(data, ids), 90, "delivery after Redis returned")
                finally:
                    stop(worker)
    with engine.connect() as conn:
        recorded = conn.execute(
            text("SELECT count(*) FROM transactions WHERE external_id = ANY(:ids)"),
            {"ids": posted},
        ).scalar()
        conn.execute(text("SELECT 1"))
    assert recorded == len(posted) == 50
    assert provider.delivered_ids() == sorted(ids)


@pytest.mark.slow
def test_provider_500_then_200_delivers_once(engine: Engine, config: Config, data: Data):
    t = data.template("flaky", {("sms", "zh-CN"): ("", "hi")})
    ids = data.messages(data.members(40), t)
    seen: set[str] = set()
    lock = threading.Lock()

    def responder(index: int, headers: dict) -> tuple[int, dict, bytes]:
        key = headers["Idempotency-Key"]
        with lock:
            first_time = key not in seen
            seen.add(key)
        return (500, {}, b"oops") if first_time else (200, {}, b'{"id": "ok"}')

    with RecordingServer(responder=responder) as provider:
        env = worker_env(config, str(config.redis_url), provider)
        with dispatcher(engine, env):
            worker = start_worker(env)
            try:
                wait_for(all_sent(data, ids), 60, "delivery after the retry")
            finally:
                stop(worker)
    assert provider.delivered_ids() == sorted(ids)
    assert len(provider.requests) == 2 * len(ids) and provider.duplicates == 0
    assert {r["attempts"] for r in data.statuses(ids).values()} == {2}
