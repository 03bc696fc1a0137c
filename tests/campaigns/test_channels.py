"""Channels against real local servers: SMTP (aiosmtpd), an HTTP provider, webhooks;
the shared rate limit; the call-centre task list over the API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from email import message_from_bytes

import pytest
from aiosmtpd.controller import Controller
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from campaigns.channels import Outgoing, Result, build_channel
from campaigns.channels.config import MessagingConfigError
from campaigns.channels.ratelimit import RateLimiter
from campaigns.channels.webhook import SIGNATURE_HEADER, sign, verify
from campaigns.dispatch import deliver, make_runtime
from service.models import Member
from service.redis_client import get_redis
from tests.campaigns.messaging_helpers import (
    RecordingServer,
    committed_data,
    config_for,
    free_port,
)
from tests.conftest import KeyFactory, unique


def outgoing(message_id: int = 1, **kw) -> Outgoing:
    base = dict(
        message_id=message_id,
        channel="sms",
        to="+8613800000000",
        subject="Hi",
        body="生日快乐",
        member_id=1,
        member_external_id="M-1",
        campaign_id=7,
        template="bday",
    )
    base.update(kw)
    return Outgoing(**base)


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.endswith("@invalid.example"):
            return "550 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 Message accepted"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, port
    controller.stop()


def test_email_goes_through_a_real_smtp_server_with_a_stable_message_id(smtp):
    inbox, port = smtp
    config = config_for(
        {
            "PATRON_EMAIL_TRANSPORT": "smtp",
            "PATRON_EMAIL_HOST": "127.0.0.1",
            "PATRON_EMAIL_PORT": str(port),
            "PATRON_EMAIL_FROM": "Shop <news@shop.example>",
        }
    )
    channel = build_channel(config.channels["email"])
    outcomes = channel.send_many(
        [
            outgoing(11, channel="email", to="ann@example.com", subject="生日快乐"),
            outgoing(12, channel="email", to="bob@invalid.example"),
        ]
    )
    assert [o.result for o in outcomes] == [Result.SENT, Result.PERMANENT]
    assert len(inbox.messages) == 1
    sender, rcpts, raw = inbox.messages[0]
    email = message_from_bytes(raw)
    assert sender == "news@shop.example" and rcpts == ["ann@example.com"]
    assert email["X-Patron-Message-Id"] == "11"
    assert "patron-msg-11" in email["Message-ID"]
    assert email.get_payload(decode=True).decode().strip() == "生日快乐"


def test_unreachable_smtp_server_is_a_transient_failure():
    config = config_for(
        {
            "PATRON_EMAIL_TRANSPORT": "smtp",
            "PATRON_EMAIL_HOST": "127.0.0.1",
            "PATRON_EMAIL_PORT": str(free_port()),
            "PATRON_EMAIL_TIMEOUT": "1",
        }
    )
    outcome = build_channel(config.channels["email"]).send_one(outgoing(channel="email"))
    assert outcome.result == Result.TRANSIENT


def test_http_provider_request_shape_credentials_and_idempotency_key():
    with RecordingServer() as server:
        config = config_for(
            {
                "PATRON_PUSH_TRANSPORT": "http",
                "PATRON_PUSH_URL": server.url,
                "PATRON_PUSH_TOKEN": "s3cret",
                "PATRON_PUSH_HEADERS": '{"X-App": "shop"}',
                "PATRON_PUSH_BODY": '{"audience": {"alias": ["$to"]}, '
                '"notification": {"title": "$subject", "alert": "$body"}, "ref": "m-$message_id"}',
            }
        )
        channel = build_channel(config.channels["push"])
        outcome = channel.send_one(outgoing(5, channel="push", to="M-1"))
    assert outcome.result == Result.SENT and outcome.provider_id == "prov-1"
    request = server.requests[0]
    assert request.json == {
        "audience": {"alias": ["M-1"]},
        "notification": {"title": "Hi", "alert": "生日快乐"},
        "ref": "m-5",
    }
    assert request.headers["Authorization"] == "Bearer s3cret"
    assert request.headers["X-App"] == "shop"
    assert request.headers["Idempotency-Key"] == "patron-msg-5"


def test_wechat_error_codes_in_a_200_answer_are_failures():
    with RecordingServer() as server:
        server.responder = lambda i, h: (
            200,
            {},
            b'{"errcode": -1, "errmsg": "system busy"}'
            if i == 0
            else b'{"errcode": 40003, "errmsg": "invalid openid"}',
        )
        config = config_for({"PATRON_WECHAT_TRANSPORT": "http", "PATRON_WECHAT_URL": server.url})
        channel = build_channel(config.channels["wechat"])
        first = channel.send_one(outgoing(channel="wechat", to="oX"))
        second = channel.send_one(outgoing(2, channel="wechat", to="oX"))
    assert first.result == Result.TRANSIENT and second.result == Result.PERMANENT
    assert server.requests[0].json == {
        "touser": "oX",
        "msgtype": "text",
        "text": {"content": "生日快乐"},
    }


def test_provider_timeout_is_transient():
    import threading

    with RecordingServer(gate=threading.Event()) as server:
        config = config_for(
            {
                "PATRON_SMS_TRANSPORT": "http",
                "PATRON_SMS_URL": server.url,
                "PATRON_SMS_TIMEOUT": "0.3",
            }
        )
        outcome = build_channel(config.channels["sms"]).send_one(outgoing())
    assert outcome.result == Result.TRANSIENT


def test_webhook_is_signed_and_the_receiver_helper_verifies_it():
    with RecordingServer() as server:
        config = config_for(
            {
                "PATRON_WEBHOOK_TRANSPORT": "webhook",
                "PATRON_WEBHOOK_URL": server.url,
                "PATRON_WEBHOOK_SECRET": "whsec",
            }
        )
        assert (
            build_channel(config.channels["webhook"])
            .send_one(outgoing(9, channel="webhook"))
            .result
            == Result.SENT
        )
    request = server.requests[0]
    header = request.headers[SIGNATURE_HEADER]
    assert verify("whsec", request.body, header)
    assert request.json["id"] == 9 and request.json["body"] == "生日快乐"
    assert not verify("other", request.body, header)
    assert not verify("whsec", request.body + b" ", header)  # body tampered
    old = sign("whsec", request.body, int(time.time()) - 3600)
    assert not verify("whsec", request.body, old)  # replayed an hour later
    assert verify("whsec", request.body, old, tolerance=7200)


def test_misconfigured_channels_are_named():
    with pytest.raises(MessagingConfigError, match="PATRON_SMS_URL"):
        config_for({"PATRON_SMS_TRANSPORT": "http"})
    with pytest.raises(MessagingConfigError, match="PATRON_WEBHOOK_SECRET"):
        config_for({"PATRON_WEBHOOK_TRANSPORT": "webhook", "PATRON_WEBHOOK_URL": "http://x"})
    with pytest.raises(MessagingConfigError, match="PATRON_EMAIL_TRANSPORT"):
        config_for({"PATRON_EMAIL_TRANSPORT": "carrier-pigeon"})


def test_rate_limit_is_shared_by_all_workers(app: Flask):
    connection = get_redis(app)
    name = unique("rl")
    a, b = RateLimiter(connection), RateLimiter(connection)
    granted_a, _ = a.try_acquire(name, 10, 8)
    granted_b, wait = b.try_acquire(name, 10, 8)
    assert (granted_a, granted_b) == (8, 2)  # one bucket of 10/s for both
    assert 0 < wait <= 0.1
    time.sleep(0.35)
    assert 2 <= a.try_acquire(name, 10, 10)[0] <= 4


def test_rate_limited_channel_paces_delivery(engine: Engine, app: Flask):
    with committed_data(engine) as data, RecordingServer() as server:
        config = config_for(
            {
                "PATRON_SMS_TRANSPORT": "http",
                "PATRON_SMS_URL": server.url,
                "PATRON_SMS_RATE": "20",
                "PATRON_FREQUENCY_CAP": "off",
            }
        )
        rt = make_runtime(engine, config, get_redis(app))
        rt.limiter.prefix = unique("patron:rate:") + ":"  # type: ignore[union-attr]
        t = data.template("paced", {("sms", "zh-CN"): ("", "hi")})
        ids = data.messages(data.members(30), t)
        started = time.monotonic()
        deliver(rt, ids)
        elapsed = time.monotonic() - started
    assert len(server.requests) == 30
    assert elapsed >= 0.45  # 20 at once (the bucket), then 10 more at 20/s


def test_call_centre_tasks_are_claimed_and_closed_once(
    client: FlaskClient, auth: KeyFactory, session: Session
):
    member = Member(external_id=unique("M"), name="王五", phone="+8613900000000")
    session.add(member)
    session.flush()
    task_id = session.execute(
        text(
            "INSERT INTO call_tasks (message_id, member_id, subject, script, phone) "
            "VALUES (:m, :member, '回访', '请致电', '+8613900000000') RETURNING id"
        ),
        {"m": 10_000_000 + member.id, "member": member.id},
    ).scalar()
    agent, other = auth("marketer"), auth("marketer")
    listed = client.get("/v1/tasks?status=open&limit=500", headers=agent).json["items"]
    assert task_id in [t["id"] for t in listed]
    close_early = client.post(
        f"/v1/tasks/{task_id}/close", json={"outcome": "reached"}, headers=agent
    )
    assert close_early.status_code == 409
    assert client.post(f"/v1/tasks/{task_id}/claim", headers=agent).json["status"] == "claimed"
    assert client.post(f"/v1/tasks/{task_id}/claim", headers=agent).status_code == 200
    assert client.post(f"/v1/tasks/{task_id}/claim", headers=other).status_code == 409
    mine = client.get("/v1/tasks?mine=true", headers=agent).json["items"]
    assert [t["id"] for t in mine] == [task_id] and mine[0]["member_name"] == "王五"
    bad = client.post(f"/v1/tasks/{task_id}/close", json={"outcome": "maybe"}, headers=agent)
    assert bad.status_code == 422 and "outcome" in bad.json["errors"]
    assert (
        client.post(
            f"/v1/tasks/{task_id}/close", json={"outcome": "reached"}, headers=other
        ).status_code
        == 409
    )
    done = client.post(
        f"/v1/tasks/{task_id}/close", json={"outcome": "reached", "note": "ok"}, headers=agent
    )
    assert done.status_code == 200 and done.json["outcome"] == "reached"
    again = client.post(f"/v1/tasks/{task_id}/close", json={"outcome": "reached"}, headers=agent)
    assert again.status_code == 200  # a retried close is harmless
    assert client.post(f"/v1/tasks/{task_id}/claim", headers=agent).status_code == 409
    assert client.get("/v1/tasks", headers=auth("pos")).status_code == 403
