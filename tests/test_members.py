"""Members API: upsert by external id, read, list by cursor, update, erase."""

from __future__ import annotations

from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import AuditEntry, Member, MemberStats, Transaction
from tests.conftest import KeyFactory, purchase_payload, unique


def new_member(client: FlaskClient, headers: dict[str, str], store: str, **fields: object) -> dict:
    body = {
        "external_id": unique("M"),
        "name": "李雷",
        "gender": "male",
        "birth_date": "1990-02-28",
        "phone": "+8613812345678",
        "email": "lilei@example.com",
        "timezone": "Asia/Shanghai",
        "locale": "zh-CN",
        "home_store": store,
        "consent": {"email": True, "sms": False},
        "tags": ["vip"],
        "attributes": {"favourite_category": "shoes"},
    }
    body.update(fields)
    resp = client.post("/v1/members", json=body, headers=headers)
    assert resp.status_code == 201, resp.json
    return resp.json


def test_create_then_update_by_external_id(client: FlaskClient, auth: KeyFactory, store: str):
    h = auth("marketer")
    created = new_member(client, h, store)
    assert created["consent"] == {"email": True, "sms": False, "push": False, "wechat": False}
    assert created["home_store"] == store
    again = client.post(
        "/v1/members",
        json={"external_id": created["external_id"], "name": "Li Lei", "tags": ["vip", "new"]},
        headers=h,
    )
    assert again.status_code == 200
    assert again.json["name"] == "Li Lei"
    assert again.json["tags"] == ["vip", "new"]
    # Fields not sent are kept.
    assert again.json["email"] == "lilei@example.com"
    assert again.json["birth_date"] == "1990-02-28"


def test_put_creates_and_patch_changes_some_fields(
    client: FlaskClient, auth: KeyFactory, store: str
):
    h = auth("marketer")
    ext = unique("M")
    put = client.put(f"/v1/members/{ext}", json={"name": "A", "home_store": store}, headers=h)
    assert put.status_code == 201
    patch = client.patch(
        f"/v1/members/{ext}", json={"consent": {"sms": True}, "locale": "en"}, headers=h
    )
    assert patch.status_code == 200
    assert patch.json["consent"]["sms"] is True
    assert patch.json["locale"] == "en"
    assert patch.json["name"] == "A"
    assert client.get(f"/v1/members/{ext}", headers=h).json["locale"] == "en"


def test_get_unknown_member_is_problem_404(client: FlaskClient, auth: KeyFactory):
    resp = client.get("/v1/members/NOPE-1", headers=auth("analyst"))
    assert resp.status_code == 404
    assert resp.content_type == "application/problem+json"
    assert resp.json["type"].endswith("/not-found")


def test_list_paginates_by_cursor_and_filters(
    client: FlaskClient, auth: KeyFactory, store: str, session: Session
):
    from service.stores import upsert_store

    other = unique("S")
    upsert_store(session, other, "Other", "North", actor="test")
    session.flush()
    h = auth("marketer")
    mine = [new_member(client, h, store, tags=["vip"] if i % 2 else ["x"]) for i in range(5)]
    new_member(client, h, other)
    seen: list[str] = []
    cursor = None
    while True:
        q = f"/v1/members?store={store}&limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(q, headers=h).json
        seen += [m["external_id"] for m in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [m["external_id"] for m in mine]
    vip = client.get(f"/v1/members?store={store}&tag=vip", headers=h).json["items"]
    assert [m["external_id"] for m in vip] == [mine[1]["external_id"], mine[3]["external_id"]]
    north = client.get("/v1/members?region=North", headers=h).json["items"]
    assert {m["home_store"] for m in north} == {other}


def test_bad_cursor_is_422_naming_the_field(client: FlaskClient, auth: KeyFactory):
    resp = client.get("/v1/members?cursor=%%%garbage", headers=auth("analyst"))
    assert resp.status_code == 422
    assert "cursor" in resp.json["errors"]


def test_validation_names_each_bad_field(client: FlaskClient, auth: KeyFactory, store: str):
    resp = client.post(
        "/v1/members",
        json={
            "external_id": "bad id with spaces",
            "gender": "robot",
            "birth_date": "2999-01-01",
            "email": "not-an-email",
            "timezone": "Mars/Olympus",
            "locale": "chinese",
            "consent": {"fax": True},
            "tags": ["x" * 65],
            "attributes": {"nested": {"a": 1}},
            "surprise": 1,
        },
        headers=auth("marketer"),
    )
    assert resp.status_code == 422
    assert resp.content_type == "application/problem+json"
    errors = resp.json["errors"]
    for field in (
        "external_id",
        "gender",
        "birth_date",
        "email",
        "timezone",
        "locale",
        "consent",
        "tags",
        "surprise",
    ):
        assert field in errors, field


def test_attributes_are_bounded(client: FlaskClient, auth: KeyFactory, store: str):
    h = auth("marketer")
    too_many = {f"k{i}": i for i in range(51)}
    resp = client.post(
        "/v1/members", json={"external_id": unique("M"), "attributes": too_many}, headers=h
    )
    assert resp.status_code == 422
    assert "attributes" in resp.json["errors"]
    too_big = {"k": "x" * 5000}
    resp = client.post(
        "/v1/members", json={"external_id": unique("M"), "attributes": too_big}, headers=h
    )
    assert resp.status_code == 422


def test_unknown_home_store_is_rejected_and_nothing_written(client: FlaskClient, auth: KeyFactory):
    h = auth("marketer")
    ext = unique("M")
    resp = client.post("/v1/members", json={"external_id": ext, "home_store": "NOWHERE"}, headers=h)
    assert resp.status_code == 422
    assert "home_store" in resp.json["errors"]
    assert client.get(f"/v1/members/{ext}", headers=h).status_code == 404


def test_profile_shows_statistics(client: FlaskClient, auth: KeyFactory, store: str):
    m = new_member(client, auth("marketer"), store)
    pos = auth("pos")
    for amount, day in (("100.00", "01"), ("50.25", "03")):
        r = client.post(
            "/v1/events/purchases",
            json=purchase_payload(
                m["external_id"], store, amount=amount, occurred_at=f"2026-10-{day}T09:00:00Z"
            ),
            headers=pos,
        )
        assert r.status_code == 201
    profile = client.get(f"/v1/members/{m['external_id']}/profile", headers=auth("analyst")).json
    assert profile["stats"]["purchase_count"] == 2
    assert profile["stats"]["net_spend"] == "150.25"
    assert profile["stats"]["first_purchase_at"].startswith("2026-10-01T09:00:00")
    assert profile["stats"]["last_purchase_at"].startswith("2026-10-03T09:00:00")


def test_erase_removes_personal_data_keeps_aggregates_and_is_audited(
    client: FlaskClient, auth: KeyFactory, store: str, session: Session
):
    m = new_member(client, auth("marketer"), store)
    ext = m["external_id"]
    pos = auth("pos")
    assert (
        client.post(
            "/v1/events/purchases", json=purchase_payload(ext, store), headers=pos
        ).status_code
        == 201
    )
    admin = auth("admin")
    resp = client.post(f"/v1/members/{ext}/erasure", json={"reason": "GDPR request"}, headers=admin)
    assert resp.status_code == 200
    erased = resp.json
    for field in ("name", "gender", "birth_date", "phone", "email"):
        assert erased[field] is None, field
    assert erased["tags"] == [] and erased["attributes"] == {}
    assert not any(erased["consent"].values())
    assert erased["status"] == "erased" and erased["erased_at"]
    # Aggregates stay: the purchase and the statistics are still counted.
    member_id = session.scalar(select(Member.id).where(Member.external_id == ext))
    assert session.scalar(select(func.count()).where(Transaction.member_id == member_id)) == 1
    stats = session.get(MemberStats, member_id)
    assert stats is not None and stats.purchase_count == 1
    audit = session.scalars(
        select(AuditEntry).where(AuditEntry.entity_id == ext, AuditEntry.action == "member.erased")
    ).all()
    assert len(audit) == 1 and audit[0].details["reason"] == "GDPR request"
    # An erased member cannot be changed or receive new purchases.
    assert client.patch(f"/v1/members/{ext}", json={"name": "X"}, headers=admin).status_code == 410
    again = client.post("/v1/events/purchases", json=purchase_payload(ext, store), headers=pos)
    assert again.status_code == 422
    assert "erased" in again.json["errors"]["member_id"][0]


def test_erase_is_admin_only(client: FlaskClient, auth: KeyFactory, store: str):
    m = new_member(client, auth("marketer"), store)
    resp = client.post(f"/v1/members/{m['external_id']}/erasure", json={}, headers=auth("marketer"))
    assert resp.status_code == 403
    assert resp.content_type == "application/problem+json"
