"""The outbox contract: queue_message, campaign batch inserts, counts, GET /v1/messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flask.testing import FlaskClient
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from campaigns.models_messaging import OutboxMessage
from campaigns.outbox import message_counts, queue_message
from service.models import AuditEntry, Member
from tests.conftest import KeyFactory, unique


def make_member(session: Session, **columns) -> Member:
    m = Member(external_id=unique("M"), **columns)
    session.add(m)
    session.flush()
    return m


def test_queue_message_is_idempotent_per_decision_and_template(session: Session):
    m = make_member(session)
    first = queue_message(session, member_id=m.id, template="bday", decision_id=9001)
    again = queue_message(session, member_id=m.id, template="bday", decision_id=9001)
    other = queue_message(session, member_id=m.id, template="bday-reminder", decision_id=9001)
    assert first is not None and again == first and other != first
    rows = session.scalars(select(OutboxMessage).where(OutboxMessage.decision_id == 9001)).all()
    assert len(rows) == 2
    assert {r.status for r in rows} == {"queued"} and {r.kind for r in rows} == {"marketing"}


def test_campaign_batch_insert_relies_on_defaults_and_skips_duplicates(session: Session):
    members = [make_member(session) for _ in range(3)]
    ids = [m.id for m in members]
    stmt = text(
        """
        INSERT INTO outbox_messages (member_id, campaign_id, decision_id, coupon_id, template,
                                     channel, kind, not_after, payload)
        SELECT m, 77, 5000 + m, NULL, 'winback', NULL, 'marketing', now() + interval '7 days',
               '{"x": 1}'
        FROM unnest(CAST(:ids AS bigint[])) m
        ON CONFLICT DO NOTHING
        """
    )
    assert session.execute(stmt, {"ids": ids}).rowcount == 3
    assert session.execute(stmt, {"ids": ids}).rowcount == 0  # a re-run writes nothing
    row = session.scalars(select(OutboxMessage).where(OutboxMessage.campaign_id == 77)).first()
    assert row is not None
    assert row.status == "queued" and row.attempts == 0 and row.dispatched_at is None
    assert abs(row.not_before - datetime.now(UTC)) < timedelta(minutes=1)


def test_message_counts_by_status_and_reason(session: Session):
    m = make_member(session)
    for n in range(4):
        queue_message(session, member_id=m.id, template="t", campaign_id=4242, decision_id=n + 1)
    session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.campaign_id == 4242, OutboxMessage.decision_id <= 2)
        .values(status="suppressed", reason="no_consent")
    )
    counts = message_counts(session, 4242)
    assert counts["total"] == 4
    assert counts["by_status"]["queued"] == 2 and counts["by_status"]["suppressed"] == 2
    assert counts["by_reason"] == {"suppressed": {"no_consent": 2}}


def test_list_messages_filters_and_pages(client: FlaskClient, auth: KeyFactory, session: Session):
    a, b = make_member(session), make_member(session)
    ids = [queue_message(session, member_id=a.id, template="t", campaign_id=31) for _ in range(3)]
    queue_message(session, member_id=b.id, template="t", campaign_id=32, channel="email")
    session.execute(update(OutboxMessage).where(OutboxMessage.id == ids[0]).values(status="sent"))
    headers = auth("analyst")
    resp = client.get(f"/v1/messages?member_id={a.external_id}&limit=2", headers=headers)
    assert resp.status_code == 200
    page = resp.json
    assert [m["id"] for m in page["items"]] == [ids[2], ids[1]]  # newest first
    rest = client.get(
        f"/v1/messages?member_id={a.external_id}&limit=2&cursor={page['next_cursor']}",
        headers=headers,
    ).json
    assert [m["id"] for m in rest["items"]] == [ids[0]] and rest["next_cursor"] is None
    sent = client.get("/v1/messages?campaign_id=31&status=sent", headers=headers).json["items"]
    assert [m["id"] for m in sent] == [ids[0]]
    email = client.get("/v1/messages?campaign_id=32&channel=email", headers=headers).json
    assert len(email["items"]) == 1 and email["items"][0]["member_id"] == b.external_id
    bad = client.get("/v1/messages?status=lost", headers=headers)
    assert bad.status_code == 422 and "status" in bad.json["errors"]
    # A cursor of another list (here the members list's) is refused, not misread as an id.
    members_cursor = client.get("/v1/members?limit=1", headers=headers).json["next_cursor"]
    assert members_cursor is not None
    foreign = client.get(f"/v1/messages?cursor={members_cursor}", headers=headers)
    assert foreign.status_code == 422 and "cursor" in foreign.json["errors"]
    assert client.get("/v1/messages", headers=auth("pos")).status_code == 403


def test_profile_shows_message_status(client: FlaskClient, auth: KeyFactory, session: Session):
    m = make_member(session)
    mid = queue_message(session, member_id=m.id, template="welcome", kind="transactional")
    session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.id == mid)
        .values(status="deferred", reason="quiet_hours")
    )
    body = client.get(f"/v1/members/{m.external_id}/profile", headers=auth("marketer")).json
    assert body["messages"][0]["id"] == mid
    assert body["messages"][0]["status"] == "deferred"
    assert body["messages"][0]["reason"] == "quiet_hours"


def test_retry_requeues_dead_messages_only_and_is_audited(
    client: FlaskClient, auth: KeyFactory, session: Session
):
    m = make_member(session)
    mid = queue_message(session, member_id=m.id, template="t")
    headers = auth("marketer")
    assert client.post(f"/v1/messages/{mid}/retry", headers=headers).status_code == 409
    session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.id == mid)
        .values(status="dead", attempts=8, reason="max_attempts")
    )
    resp = client.post(f"/v1/messages/{mid}/retry", headers=headers)
    assert resp.status_code == 200
    assert resp.json["status"] == "queued" and resp.json["attempts"] == 0
    assert (
        session.scalar(select(AuditEntry.action).where(AuditEntry.entity_id == str(mid)))
        == "message.retried"
    )
    assert client.post("/v1/messages/999999999/retry", headers=headers).status_code == 404


def test_queue_depth_and_failures_are_visible(client: FlaskClient, auth: KeyFactory):
    ready = client.get("/readyz")
    assert ready.status_code == 200
    queue = ready.json["details"]["message_queue"]
    assert set(queue) == {"name", "depth", "started", "failed"}
    stats = client.get("/v1/messages/stats", headers=auth("analyst")).json
    assert set(stats["by_status"]) >= {"queued", "sent", "dead"}
    assert stats["queue"]["depth"] == queue["depth"]
