"""Workers against committed rows: consent at send time, the cap under concurrent workers,
retries, quiet hours, racing workers, the dispatcher and the sweeper."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import redis
from flask import Flask
from rq import Queue
from sqlalchemy import Engine, text

from campaigns.dispatch import (
    deliver,
    dispatch_once,
    make_runtime,
    message_queue,
    sweep,
)
from service.redis_client import get_redis
from tests.campaigns.messaging_helpers import Data, RecordingServer, committed_data, config_for

SMS = ("", "{{ member.name }}: {{ extra.text }}")


@pytest.fixture
def data(engine: Engine) -> Iterator[Data]:
    with committed_data(engine) as d:
        yield d


@pytest.fixture
def rconn(app: Flask) -> redis.Redis:
    return get_redis(app)


@pytest.fixture
def provider() -> Iterator[RecordingServer]:
    with RecordingServer() as server:
        yield server


def http_config(provider: RecordingServer, **env: str):
    return config_for({"PATRON_SMS_TRANSPORT": "http", "PATRON_SMS_URL": provider.url, **env})


def test_opt_out_after_enqueue_stops_the_send_and_falls_back(
    engine: Engine, data: Data, provider: RecordingServer, rconn: redis.Redis
):
    rt = make_runtime(engine, http_config(provider, PATRON_EMAIL_TRANSPORT="noop"), rconn)
    t = data.template("optout", {("sms", "zh-CN"): SMS, ("email", "zh-CN"): ("Hi", "hello")})
    only_sms, with_email = (
        data.members(1),
        data.members(1, email="x@example.com", consent_email=True),
    )
    ids = data.messages(only_sms + with_email, t, channel="sms", payload='{"text": "x"}')
    with engine.begin() as conn:  # the members opt out after the campaign queued the message
        conn.execute(
            text("UPDATE members SET consent_sms = false WHERE id = ANY(:ids)"),
            {"ids": only_sms + with_email},
        )
    deliver(rt, ids)
    rows = data.statuses(ids)
    assert (rows[ids[0]]["status"], rows[ids[0]]["reason"]) == ("suppressed", "no_consent")
    assert (rows[ids[1]]["status"], rows[ids[1]]["sent_channel"]) == ("sent", "email")
    assert provider.requests == []


def test_frequency_cap_holds_across_campaigns_with_concurrent_workers(
    engine: Engine, data: Data, provider: RecordingServer, rconn: redis.Redis
):
    config = http_config(provider)
    t = data.template("cap", {("sms", "zh-CN"): SMS})
    members = data.members(5)
    # Three campaigns each message every member twice: 6 messages per member.
    ids = []
    for campaign in (1, 2, 3):
        for _ in range(2):
            ids += data.messages(members, t, campaign_id=campaign, payload='{"text": "x"}')
    # Each worker gets a different slice, so a member's messages race across workers.
    slices = [ids[i::3] for i in range(3)]
    barrier = threading.Barrier(3)

    def work(part: list[int]) -> None:
        rt = make_runtime(engine, config, rconn)
        barrier.wait()
        deliver(rt, part)

    threads = [threading.Thread(target=work, args=(s,)) for s in slices]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    rows = data.statuses(ids).values()
    for member in members:
        mine = [r for r in rows if r["member_id"] == member]
        sent = [r for r in mine if r["status"] == "sent"]
        deferred = [r for r in mine if r["status"] == "deferred"]
        assert len(sent) == 2, "the cap is 2 marketing messages per 7 days"
        assert len(deferred) == 4 and {r["reason"] for r in deferred} == {"frequency_cap"}
        first_slot_frees = min(r["contacted_at"] for r in sent) + timedelta(days=7)
        assert all(r["not_before"] == first_slot_frees for r in deferred)
    assert len(provider.requests) == 10


def test_two_workers_racing_the_same_batch_send_each_message_once(
    engine: Engine, data: Data, provider: RecordingServer, rconn: redis.Redis
):
    config = http_config(provider, PATRON_FREQUENCY_CAP="off", PATRON_MESSAGE_CHUNK="20")
    t = data.template("race", {("sms", "zh-CN"): SMS})
    ids = data.messages(data.members(120), t, payload='{"text": "x"}')
    barrier = threading.Barrier(2)

    def work() -> None:
        rt = make_runtime(engine, config, rconn)
        barrier.wait()
        deliver(rt, ids)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    keys = [r.headers["Idempotency-Key"] for r in provider.requests]
    assert len(keys) == len(set(keys)) == 120
    assert {r["status"] for r in data.statuses(ids).values()} == {"sent"}


def test_transient_permanent_and_retry_after_answers(
    engine: Engine, data: Data, rconn: redis.Redis
):
    answers = {
        "+8610000000001": (503, {}, b"busy"),
        "+8610000000002": (429, {"Retry-After": "120"}, b"slow down"),
        "+8610000000003": (400, {}, b'{"error": "invalid number"}'),
    }

    def responder(_: int, headers: dict) -> tuple[int, dict[str, str], bytes]:
        return (200, {}, b'{"id": "ok"}')

    with RecordingServer() as server:
        server.responder = lambda i, h: answers.get(server.requests[i].json["to"], (200, {}, b"{}"))
        config = http_config(
            server, PATRON_RETRY_BASE_SECONDS="10", PATRON_MESSAGE_MAX_ATTEMPTS="2"
        )
        rt = make_runtime(engine, config, rconn)
        t = data.template("codes", {("sms", "zh-CN"): SMS})
        ids = []
        for phone in answers:
            ids += data.messages(data.members(1, phone=phone), t, payload='{"text": "x"}')
        before = datetime.now(UTC)
        deliver(rt, ids)
        rows = data.statuses(ids)
        busy, slow, invalid = (rows[i] for i in ids)
        assert (busy["status"], busy["reason"], busy["attempts"]) == ("deferred", "retry", 1)
        # Exponential backoff with jitter: between half and all of the 10 s base.
        assert (
            before + timedelta(seconds=5)
            <= busy["not_before"]
            <= datetime.now(UTC) + timedelta(seconds=10)
        )
        assert slow["not_before"] >= before + timedelta(seconds=120)  # Retry-After honoured
        assert (invalid["status"], invalid["reason"]) == ("failed", "permanent_error")
        assert "invalid number" in invalid["last_error"]
        # The second transient failure reaches max attempts (2): dead, and visible.
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE outbox_messages SET not_before = now() WHERE id = ANY(:ids)"),
                {"ids": ids[:2]},
            )
        deliver(rt, ids)
        rows = data.statuses(ids)
        assert [rows[i]["status"] for i in ids[:2]] == ["dead", "dead"]
        assert rows[ids[0]]["reason"] == "max_attempts"


def test_quiet_hours_defer_to_the_members_morning(
    engine: Engine, data: Data, provider: RecordingServer, rconn: redis.Redis
):
    tz = "Asia/Shanghai"
    hour = datetime.now(ZoneInfo(tz)).hour
    window = f"{hour:02d}:00-{(hour + 1) % 24:02d}:00"  # the current hour is quiet
    rt = make_runtime(engine, http_config(provider, PATRON_QUIET_HOURS=window), rconn)
    t = data.template("quiet", {("sms", "zh-CN"): SMS})
    marketing = data.messages(data.members(1, timezone=tz), t, payload='{"text": "x"}')
    receipt = data.messages(
        data.members(1, timezone=tz), t, kind="transactional", payload='{"text": "x"}'
    )
    deliver(rt, marketing + receipt)
    rows = data.statuses(marketing + receipt)
    quiet, sent = rows[marketing[0]], rows[receipt[0]]
    end = datetime.now(ZoneInfo(tz)).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    assert (quiet["status"], quiet["reason"]) == ("deferred", "quiet_hours")
    assert quiet["not_before"] == end
    assert sent["status"] == "sent" and sent["overrides"] == ["quiet_hours"]


def test_call_centre_channel_creates_one_task_per_message(
    engine: Engine, data: Data, rconn: redis.Redis
):
    rt = make_runtime(engine, config_for(), rconn)
    t = data.template("call", {("call_centre", "zh-CN"): ("回访", "请致电 {{ member.name }}")})
    ids = data.messages(data.members(2, name="李四"), t, channel="call_centre")
    deliver(rt, ids)
    with engine.begin() as conn:  # a retried batch must not create a second task
        conn.execute(
            text("UPDATE outbox_messages SET status = 'queued' WHERE id = ANY(:ids)"), {"ids": ids}
        )
    deliver(rt, ids)
    with engine.connect() as conn:
        tasks = conn.execute(
            text("SELECT message_id, script, status FROM call_tasks WHERE message_id = ANY(:i)"),
            {"i": ids},
        ).all()
    assert sorted(t.message_id for t in tasks) == sorted(ids)
    assert {t.script for t in tasks} == {"请致电 李四"} and {t.status for t in tasks} == {"open"}


def test_dispatcher_batches_and_undoes_its_marks_when_redis_refuses(
    engine: Engine, data: Data, rconn: redis.Redis
):
    config = config_for({"PATRON_MESSAGE_BATCH": "100", "PATRON_MESSAGE_QUEUE": "msg-test"})
    t = data.template("batch", {("sms", "zh-CN"): SMS})
    ids = data.messages(data.members(250), t)
    dead = Queue("msg-test", connection=redis.Redis(port=1, socket_connect_timeout=0.2))
    with pytest.raises(redis.RedisError):
        dispatch_once(engine, dead, config)
    assert {r["dispatched_at"] for r in data.statuses(ids).values()} == {None}
    queue = message_queue(rconn, config)
    queue.empty()
    messages, jobs = dispatch_once(engine, queue, config)
    assert messages >= 250 and jobs == -(-messages // 100)
    assert all(len(job.args[0]) <= 100 for job in queue.jobs)
    assert set(ids) <= {i for job in queue.jobs for i in job.args[0]}
    assert dispatch_once(engine, queue, config) == (0, 0)  # nothing is handed out twice
    queue.empty()


def test_sweeper_reclaims_expired_leases_and_lost_jobs(engine: Engine, data: Data):
    config = config_for({"PATRON_REDISPATCH_SECONDS": "60", "PATRON_MESSAGE_MAX_ATTEMPTS": "3"})
    t = data.template("sweep", {("sms", "zh-CN"): SMS})
    stuck, lost, last = (data.messages(data.members(1), t) for _ in range(3))
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE outbox_messages SET status = 'sending', attempts = 1, "
                "lease_until = now() - interval '1 second' WHERE id = ANY(:ids)"
            ),
            {"ids": stuck},
        )
        conn.execute(
            text(
                "UPDATE outbox_messages SET status = 'sending', attempts = 3, "
                "lease_until = now() - interval '1 second' WHERE id = ANY(:ids)"
            ),
            {"ids": last},
        )
        conn.execute(
            text(
                "UPDATE outbox_messages SET dispatched_at = now() - interval '2 minutes' "
                "WHERE id = ANY(:ids)"
            ),
            {"ids": lost},
        )
    result = sweep(engine, config)
    assert result["reclaimed"] >= 2 and result["redispatched"] >= 1
    rows = data.statuses(stuck + lost + last)
    assert (rows[stuck[0]]["status"], rows[stuck[0]]["reason"]) == ("deferred", "lease_expired")
    assert rows[lost[0]]["dispatched_at"] is None and rows[lost[0]]["status"] == "queued"
    assert (rows[last[0]]["status"], rows[last[0]]["reason"]) == ("dead", "max_attempts")
