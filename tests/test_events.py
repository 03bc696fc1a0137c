"""Purchase and refund events: statistics, idempotent replays, refunds bounded, bad input."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import Member, MemberStats, Transaction
from tests.conftest import KeyFactory, purchase_payload, unique


@pytest.fixture
def member(client: FlaskClient, auth: KeyFactory, store: str) -> str:
    ext = unique("M")
    resp = client.put(f"/v1/members/{ext}", json={"home_store": store}, headers=auth("marketer"))
    assert resp.status_code == 201
    return ext


@pytest.fixture
def pos(auth: KeyFactory) -> dict[str, str]:
    return auth("pos")


def stats_of(session: Session, external_id: str) -> MemberStats | None:
    member_id = session.scalar(select(Member.id).where(Member.external_id == external_id))
    session.expire_all()
    return session.get(MemberStats, member_id)


def count_transactions(session: Session, external_id: str) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(Transaction)
            .join(Member, Member.id == Transaction.member_id)
            .where(Member.external_id == external_id)
        )
        or 0
    )


def test_purchase_updates_statistics_and_answers_the_till(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    resp = client.post("/v1/events/purchases", json=purchase_payload(member, store), headers=pos)
    assert resp.status_code == 201
    body = resp.json
    assert body["member"]["purchase_count"] == 1
    assert body["member"]["net_spend"] == "128.50"
    assert body["rewards"] == {"coupons": [], "tier_change": None, "offers": []}
    stats = stats_of(session, member)
    assert stats is not None
    assert stats.purchase_count == 1 and str(stats.purchase_amount) == "128.50"


def test_first_and_last_purchase_follow_occurred_at_not_arrival(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    # A till that was offline sends its older sale after a newer one.
    for when in ("2026-10-05T12:00:00+08:00", "2026-10-01T12:00:00+08:00"):
        payload = purchase_payload(member, store, occurred_at=when)
        assert client.post("/v1/events/purchases", json=payload, headers=pos).status_code == 201
    stats = stats_of(session, member)
    assert stats is not None
    assert stats.first_purchase_at.isoformat() == "2026-10-01T04:00:00+00:00"
    assert stats.last_purchase_at.isoformat() == "2026-10-05T04:00:00+00:00"


def test_replay_by_transaction_id_returns_original_and_changes_nothing(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    payload = purchase_payload(member, store)
    first = client.post("/v1/events/purchases", json=payload, headers=pos)
    second = client.post("/v1/events/purchases", json=payload, headers=pos)
    assert second.status_code == first.status_code == 201
    assert second.get_data() == first.get_data()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert count_transactions(session, member) == 1
    stats = stats_of(session, member)
    assert stats is not None and stats.purchase_count == 1


def test_replay_by_idempotency_key(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    key = unique("idem")
    payload = purchase_payload(member, store)
    first = client.post(
        "/v1/events/purchases", json=payload, headers={**pos, "Idempotency-Key": key}
    )
    again = client.post(
        "/v1/events/purchases", json=payload, headers={**pos, "Idempotency-Key": key}
    )
    assert first.status_code == 201 and again.get_data() == first.get_data()
    assert count_transactions(session, member) == 1


def test_same_key_with_different_body_is_a_conflict(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    key = unique("idem")
    client.post(
        "/v1/events/purchases",
        json=purchase_payload(member, store),
        headers={**pos, "Idempotency-Key": key},
    )
    other = client.post(
        "/v1/events/purchases",
        json=purchase_payload(member, store, amount="1.00"),
        headers={**pos, "Idempotency-Key": key},
    )
    assert other.status_code == 409
    assert other.content_type == "application/problem+json"
    assert other.json["type"].endswith("/conflict")
    same_txn = purchase_payload(member, store)
    client.post("/v1/events/purchases", json=same_txn, headers=pos)
    changed = client.post(
        "/v1/events/purchases", json={**same_txn, "amount": "999.00"}, headers=pos
    )
    assert changed.status_code == 409
    assert count_transactions(session, member) == 2


def refund(member: str, store: str, original: str, amount: str, **kw: Any) -> dict[str, Any]:
    body = purchase_payload(member, store, amount=amount, **kw)
    body["original_transaction_id"] = original
    body["transaction_id"] = kw.get("transaction_id", unique("REF"))
    body.pop("items")
    return body


def test_refunds_accumulate_and_cannot_exceed_the_purchase(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    purchase = purchase_payload(member, store, amount="100.00")
    client.post("/v1/events/purchases", json=purchase, headers=pos)
    original = purchase["transaction_id"]
    r1 = client.post(
        "/v1/events/refunds", json=refund(member, store, original, "60.00"), headers=pos
    )
    assert r1.status_code == 201 and r1.json["refundable_remaining"] == "40.00"
    too_much = client.post(
        "/v1/events/refunds", json=refund(member, store, original, "40.01"), headers=pos
    )
    assert too_much.status_code == 422
    assert too_much.json["errors"]["amount"] == ["at most 40.00 can still be refunded"]
    r2 = client.post(
        "/v1/events/refunds", json=refund(member, store, original, "40.00"), headers=pos
    )
    assert r2.status_code == 201 and r2.json["refundable_remaining"] == "0.00"
    stats = stats_of(session, member)
    assert stats is not None
    assert (stats.refund_count, str(stats.refund_amount), str(stats.net_spend)) == (
        2,
        "100.00",
        "0.00",
    )
    # The rejected refund left nothing behind.
    assert count_transactions(session, member) == 3


def test_refund_must_reference_a_purchase_of_the_same_member(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, auth: KeyFactory
):
    other = unique("M")
    client.put(f"/v1/members/{other}", json={"home_store": store}, headers=auth("marketer"))
    theirs = purchase_payload(other, store)
    client.post("/v1/events/purchases", json=theirs, headers=pos)
    unknown = client.post(
        "/v1/events/refunds", json=refund(member, store, "NO-SUCH-TXN", "1.00"), headers=pos
    )
    assert unknown.status_code == 422 and "original_transaction_id" in unknown.json["errors"]
    cross = client.post(
        "/v1/events/refunds",
        json=refund(member, store, theirs["transaction_id"], "1.00"),
        headers=pos,
    )
    assert cross.status_code == 422 and "original_transaction_id" in cross.json["errors"]


def test_refund_replay_is_idempotent(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    purchase = purchase_payload(member, store, amount="100.00")
    client.post("/v1/events/purchases", json=purchase, headers=pos)
    body = refund(member, store, purchase["transaction_id"], "30.00")
    first = client.post("/v1/events/refunds", json=body, headers=pos)
    second = client.post("/v1/events/refunds", json=body, headers=pos)
    assert first.status_code == 201 and second.get_data() == first.get_data()
    stats = stats_of(session, member)
    assert stats is not None and str(stats.refund_amount) == "30.00"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"amount": 12.5}, "amount"),
        ({"amount": "12.345"}, "amount"),
        ({"amount": "-5.00"}, "amount"),
        ({"amount": "-0.01"}, "amount"),
        ({"amount": "abc"}, "amount"),
        ({"amount": "NaN"}, "amount"),
        ({"currency": "usd"}, "currency"),
        ({"currency": "USD"}, "currency"),
        ({"channel": "phone"}, "channel"),
        ({"occurred_at": "2026-11-01T10:00:00"}, "occurred_at"),
        ({"occurred_at": "2026-02-30T10:00:00+08:00"}, "occurred_at"),
        ({"occurred_at": "2099-01-01T00:00:00Z"}, "occurred_at"),
        ({"member_id": ""}, "member_id"),
        ({"transaction_id": "x" * 65}, "transaction_id"),
        ({"store": "NO-SUCH-STORE"}, "store"),
        ({"member_id": "NO-SUCH-MEMBER"}, "member_id"),
        ({"items": [{"sku": "A-1", "amount": "1.00", "quantity": 0}]}, "items"),
        ({"items": "shoes"}, "items"),
        ({"tip": "1.00"}, "tip"),
    ],
)
def test_bad_purchase_is_422_naming_the_field_and_writes_nothing(
    client: FlaskClient,
    pos: dict[str, str],
    member: str,
    store: str,
    session: Session,
    change: dict[str, Any],
    field: str,
):
    resp = client.post(
        "/v1/events/purchases", json={**purchase_payload(member, store), **change}, headers=pos
    )
    assert resp.status_code == 422, resp.json
    assert resp.content_type == "application/problem+json"
    assert field in resp.json["errors"], resp.json
    assert count_transactions(session, member) == 0


@pytest.mark.parametrize("missing", ["member_id", "transaction_id", "amount", "occurred_at"])
def test_missing_required_field(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, missing: str
):
    body = purchase_payload(member, store)
    del body[missing]
    resp = client.post("/v1/events/purchases", json=body, headers=pos)
    assert resp.status_code == 422
    assert resp.json["errors"][missing] == ["Missing data for required field."]


def test_malformed_json_and_wrong_content_type(client: FlaskClient, pos: dict[str, str]):
    bad = client.post(
        "/v1/events/purchases", data='{"amount": ', content_type="application/json", headers=pos
    )
    assert bad.status_code == 400
    assert bad.content_type == "application/problem+json"
    assert bad.json["type"].endswith("/malformed-json")
    form = client.post("/v1/events/purchases", data="amount=1", headers=pos)
    assert form.status_code in (400, 415, 422)
    assert form.content_type == "application/problem+json"


def test_oversize_body_is_413(client: FlaskClient, pos: dict[str, str]):
    huge = '{"items": [' + ",".join(['{"sku": "x", "amount": "1.00"}'] * 40_000) + "]}"
    resp = client.post(
        "/v1/events/purchases", data=huge, content_type="application/json", headers=pos
    )
    assert resp.status_code == 413
    assert resp.json["type"].endswith("/payload-too-large")


def test_store_scoped_key_records_only_its_store(
    client: FlaskClient, auth: KeyFactory, member: str, store: str, session: Session
):
    from service.stores import upsert_store

    other = unique("S")
    upsert_store(session, other, "Other", "West", actor="test")
    session.flush()
    scoped = auth("pos", store=other)
    resp = client.post("/v1/events/purchases", json=purchase_payload(member, store), headers=scoped)
    assert resp.status_code == 422
    assert "own store" in resp.json["errors"]["store"][0]
    ok = client.post("/v1/events/purchases", json=purchase_payload(member, other), headers=scoped)
    assert ok.status_code == 201


def test_zero_purchase_counts_but_zero_refund_is_rejected(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    gift = purchase_payload(member, store, amount="0.00", items=None)
    gift.pop("items")
    assert client.post("/v1/events/purchases", json=gift, headers=pos).status_code == 201
    stats = stats_of(session, member)
    assert stats is not None and stats.purchase_count == 1
    nothing = client.post(
        "/v1/events/refunds",
        json=refund(member, store, gift["transaction_id"], "0.00"),
        headers=pos,
    )
    assert nothing.status_code == 422 and "amount" in nothing.json["errors"]


def test_purchase_and_refund_keep_rolling_windows_equal_to_a_rebuild(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import text

    from segments.stats import rebuild_windows

    now = datetime.now(UTC)
    recent = purchase_payload(
        member, store, amount="80.00", occurred_at=(now - timedelta(days=2)).isoformat()
    )
    old = purchase_payload(
        member, store, amount="20.00", occurred_at=(now - timedelta(days=200)).isoformat()
    )
    first = client.post("/v1/events/purchases", json=recent, headers=pos)
    assert first.json["member"]["windows"]["30d"] == {"purchases": 1, "spend": "80.00"}
    second = client.post("/v1/events/purchases", json=old, headers=pos)
    assert second.json["member"]["windows"]["30d"] == {"purchases": 1, "spend": "80.00"}
    assert second.json["member"]["windows"]["365d"] == {"purchases": 2, "spend": "100.00"}
    r = client.post(
        "/v1/events/refunds",
        json=refund(member, store, recent["transaction_id"], "30.00"),
        headers=pos,
    )
    assert r.status_code == 201
    query = text(
        "SELECT purchases_30d, spend_30d, purchases_365d, spend_365d FROM member_stats ms"
        " JOIN members m ON m.id = ms.member_id WHERE m.external_id = :m"
    )
    incremental = session.execute(query, {"m": member}).one()
    assert str(incremental.spend_30d) == "50.00"
    rebuild_windows(session)
    assert session.execute(query, {"m": member}).one() == incremental


def test_each_purchase_adds_its_local_day_to_the_members_purchase_dates(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    """The days the daily refresh summarises come from the purchase path, in order, once."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import text

    from segments.stats import current_state, rebuild_windows

    rebuild_windows(session)  # a window state: its time zone decides the local day
    state = current_state(session)
    assert state is not None
    now = datetime.now(UTC).replace(microsecond=0)
    days = [now - timedelta(days=3), now - timedelta(days=40), now - timedelta(days=3), now]
    for when in days:  # the second is back-dated, the third on a day already there
        payload = purchase_payload(member, store, amount="5.00", occurred_at=when.isoformat())
        assert client.post("/v1/events/purchases", json=payload, headers=pos).status_code == 201
    query = text(
        "SELECT purchase_dates FROM member_stats ms JOIN members m ON m.id = ms.member_id"
        " WHERE m.external_id = :m"
    )
    from zoneinfo import ZoneInfo

    zone = ZoneInfo(state.timezone)
    expected = sorted({d.astimezone(zone).date() for d in days})
    assert session.execute(query, {"m": member}).scalar_one() == expected
    # A rebuild from the transactions finds the same days.
    session.execute(
        text(
            "UPDATE member_stats SET purchase_dates = NULL WHERE member_id ="
            " (SELECT id FROM members WHERE external_id = :m)"
        ),
        {"m": member},
    )
    rebuild_windows(session)
    assert session.execute(query, {"m": member}).scalar_one() == expected
