"""Coupons: templates, issuing, validation reasons, redemption, replay, rollback, time zones."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from campaigns import codes, coupons
from campaigns.models_coupons import Coupon, CouponRedemption
from service.errors import Conflict
from service.members import upsert_member
from service.models import Member
from service.stores import upsert_store
from tests.conftest import KeyFactory, unique

TZ = "Asia/Shanghai"
SH = ZoneInfo(TZ)
# A Wednesday, noon in Shanghai.
T = datetime(2026, 11, 4, 12, 0, tzinfo=SH)


@pytest.fixture
def shops(session: Session) -> dict[str, str]:
    """Two stores in one region and a third in another: {'a', 'b', 'c', 'region', 'other'}."""
    region, other = unique("RG"), unique("RG")
    out = {"region": region, "other": other}
    for name, reg in (("a", region), ("b", region), ("c", other)):
        out[name] = unique("S")
        upsert_store(session, out[name], f"Store {name}", reg, actor="test")
    session.flush()
    return out


def make_member(session: Session) -> tuple[str, int]:
    ext = unique("M")
    upsert_member(session, ext, {}, actor="test")
    session.flush()
    return ext, int(session.scalar(select(Member.id).where(Member.external_id == ext)) or 0)


def make_template(session: Session, **overrides: Any) -> coupons.Template:
    data: dict[str, Any] = {
        "code": unique("TPL"),
        "name": "Test coupon",
        "kind": "amount",
        "amount_off": Decimal("50.00"),
        "min_spend": Decimal("0"),
        "valid_days": 30,
    }
    data.update(overrides)
    return coupons.create_template(session, data, actor="test", default_timezone=TZ, currency="CNY")


def issue(session: Session, template: coupons.Template, member_id: int, at: datetime) -> str:
    issued = coupons.issue_coupon(
        session,
        template_code=template.code,
        member_id=member_id,
        campaign_id=None,
        decision_id=None,
        issued_at=at,
    )
    return str(issued["code"])


def redeem(
    session: Session,
    code: str,
    store: str,
    *,
    member: str | None = None,
    amount: str = "300.00",
    at: datetime = T,
    key: str | None = None,
) -> coupons.RedeemResult:
    return coupons.redeem(
        session,
        idempotency_key=key or unique("K"),
        code=code,
        member=member,
        store=store,
        order_amount=Decimal(amount),
        transaction_id=None,
        at=at,
        currency="CNY",
    )


def validate_http(
    client: FlaskClient,
    headers: dict[str, str],
    code: str,
    store: str,
    *,
    member: str | None = None,
    amount: str = "300.00",
    at: datetime = T,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "code": code,
        "store": store,
        "order_amount": amount,
        "at": at.isoformat(),
    }
    if member:
        body["member_id"] = member
    resp = client.post("/v1/coupons/validate", json=body, headers=headers)
    assert resp.status_code == 200, resp.get_json()
    result: dict[str, Any] = resp.get_json()
    return result


def redemptions_of(session: Session, code: str) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(CouponRedemption)
            .join(Coupon, Coupon.id == CouponRedemption.coupon_id)
            .where(Coupon.code == codes.normalise(code))
        )
        or 0
    )


# --------------------------------------------------------------------------------------
# Templates over HTTP
# --------------------------------------------------------------------------------------


def test_marketer_creates_lists_and_archives_a_template(
    client: FlaskClient, auth: KeyFactory, shops: dict[str, str]
):
    marketer = auth("marketer")
    code = unique("BDAY")
    resp = client.post(
        "/v1/coupons/templates",
        json={
            "code": code,
            "name": "15% off up to 80",
            "kind": "percent",
            "percent_off": "15",
            "face_value": "80.00",
            "min_spend": "100.00",
            "valid_days": 14,
            "weekdays": [5, 1, 1],
            "hours_from": "10:00",
            "hours_until": "22:00",
            "regions": [shops["region"]],
        },
        headers=marketer,
    )
    assert resp.status_code == 201, resp.get_json()
    body = resp.get_json()
    assert body["weekdays"] == [1, 5]
    assert (body["value"], body["face_value"], body["timezone"]) == ("15.00", "80.00", TZ)
    assert body["created_by"].startswith("key:")
    assert client.get(f"/v1/coupons/templates/{code}", headers=auth("pos")).get_json() == body

    again = client.post(
        "/v1/coupons/templates",
        json={"code": code, "name": "x", "kind": "amount", "amount_off": "5", "valid_days": 1},
        headers=marketer,
    )
    assert again.status_code == 409 and "code" in again.get_json()["errors"]

    archived = client.delete(f"/v1/coupons/templates/{code}", headers=marketer)
    assert archived.status_code == 200 and archived.get_json()["archived"] is True
    listed = client.get("/v1/coupons/templates?limit=1000", headers=marketer).get_json()
    assert code not in [t["code"] for t in listed["items"]]
    listed = client.get(
        "/v1/coupons/templates?limit=1000&include_archived=true", headers=marketer
    ).get_json()
    assert code in [t["code"] for t in listed["items"]]


def test_templates_paginate_by_cursor(client: FlaskClient, auth: KeyFactory, session: Session):
    made = [make_template(session).code for _ in range(3)]
    headers = auth("analyst")
    seen: list[str] = []
    cursor = None
    while True:
        url = "/v1/coupons/templates?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=headers).get_json()
        seen += [t["code"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen[-3:] == made
    bad = client.get("/v1/coupons/templates?cursor=nope", headers=headers)
    assert bad.status_code == 422 and "cursor" in bad.get_json()["errors"]


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"kind": "percent", "amount_off": None}, "percent_off"),
        ({"kind": "percent", "percent_off": "15", "amount_off": None}, "face_value"),
        ({"kind": "percent", "percent_off": "150", "face_value": "9"}, "percent_off"),
        ({"kind": "free_item", "amount_off": None, "face_value": "20"}, "free_item_sku"),
        ({"amount_off": 12.5}, "amount_off"),
        ({"amount_off": "12.345"}, "amount_off"),
        ({"face_value": "20.00"}, "face_value"),
        ({"free_item_sku": "SKU-1"}, "free_item_sku"),
        ({"valid_from": "2026-11-01T00:00:00+08:00"}, "valid_days"),
        ({"valid_days": None}, "valid_days"),
        ({"valid_days": 0}, "valid_days"),
        (
            {
                "valid_days": None,
                "valid_from": "2026-11-02T00:00:00+08:00",
                "valid_until": "2026-11-01T00:00:00+08:00",
            },
            "valid_until",
        ),
        ({"valid_days": None, "valid_from": "2026-11-02T00:00:00"}, "valid_from"),
        ({"weekdays": [0, 8]}, "weekdays"),
        ({"weekdays": []}, "weekdays"),
        ({"hours_from": "10:00"}, "hours_until"),
        ({"hours_from": "25:00", "hours_until": "10:00"}, "hours_from"),
        ({"hours_from": "10:00", "hours_until": "10:00"}, "hours_until"),
        ({"stores": ["NO-SUCH-STORE"]}, "stores"),
        ({"regions": ["NO-SUCH-REGION"]}, "regions"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"currency": "USD"}, "currency"),
        ({"code": "has space"}, "code"),
        ({"name": ""}, "name"),
        ({"kind": "bogus"}, "kind"),
        ({"min_spend": "-1"}, "min_spend"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_template_fields_are_named_and_nothing_is_stored(
    client: FlaskClient, auth: KeyFactory, session: Session, patch: dict[str, Any], field: str
):
    body: dict[str, Any] = {
        "code": unique("BAD"),
        "name": "Bad",
        "kind": "amount",
        "amount_off": "10.00",
        "valid_days": 7,
    }
    body.update(patch)
    body = {k: v for k, v in body.items() if v is not None}
    resp = client.post("/v1/coupons/templates", json=body, headers=auth("marketer"))
    assert resp.status_code == 422, resp.get_json()
    assert resp.mimetype == "application/problem+json"
    assert field in resp.get_json()["errors"], resp.get_json()
    assert coupons.get_template(session, body["code"]) is None


def test_only_marketers_write_templates_and_tills_cannot(client: FlaskClient, auth: KeyFactory):
    body = {"code": unique("X"), "name": "x", "kind": "amount", "amount_off": "5", "valid_days": 1}
    assert client.post("/v1/coupons/templates", json=body, headers=auth("pos")).status_code == 403
    assert client.post("/v1/coupons/templates", json=body).status_code == 401


# --------------------------------------------------------------------------------------
# Issuing and validity
# --------------------------------------------------------------------------------------


def test_issue_is_idempotent_per_decision(session: Session):
    template = make_template(session)
    _, member_id = make_member(session)
    decision = int(datetime.now(UTC).timestamp() * 1e6)
    first = coupons.issue_coupon(
        session,
        template_code=template.code,
        member_id=member_id,
        campaign_id=7,
        decision_id=decision,
        issued_at=T,
    )
    again = coupons.issue_coupon(
        session,
        template_code=template.code,
        member_id=member_id,
        campaign_id=7,
        decision_id=decision,
        issued_at=T + timedelta(hours=1),
    )
    assert again == first
    assert first["kind"] == "amount" and first["value"] == "50.00"
    assert first["face_value"] == "50.00"
    assert codes.is_well_formed(first["code"])
    n = session.scalar(select(func.count()).where(Coupon.decision_id == decision))
    assert n == 1


def test_archived_or_ended_templates_issue_nothing(session: Session):
    _, member_id = make_member(session)
    archived = make_template(session)
    coupons.archive_template(session, archived.code, actor="test")
    ended = make_template(
        session, valid_days=None, valid_from=T - timedelta(days=9), valid_until=T - timedelta(1)
    )
    for template, reason in ((archived, "template_archived"), (ended, "template_expired")):
        with pytest.raises(Conflict) as exc:
            coupons.issue_coupon(
                session,
                template_code=template.code,
                member_id=member_id,
                campaign_id=None,
                decision_id=None,
                issued_at=T,
            )
        assert exc.value.errors == {"template": [reason]}


def test_valid_days_end_at_local_midnight(session: Session):
    template = make_template(session, valid_days=1)
    # 23:30 in Shanghai is 15:30 UTC: the coupon is good for the rest of the local day only.
    issued = datetime(2026, 11, 4, 23, 30, tzinfo=SH)
    valid_from, valid_until = coupons.validity(template, issued)
    assert valid_from == issued
    assert valid_until == datetime(2026, 11, 5, 0, 0, tzinfo=SH)
    assert valid_until.tzinfo == UTC and valid_until.hour == 16
    week = make_template(session, valid_days=7, timezone="America/New_York")
    # Across the end of daylight saving time (1 November 2026 in New York).
    _, until = coupons.validity(week, datetime(2026, 10, 30, 12, tzinfo=UTC))
    assert until == datetime(2026, 11, 6, 0, 0, tzinfo=ZoneInfo("America/New_York"))


def test_redemption_at_the_last_local_minute_works_and_at_midnight_is_expired(
    client: FlaskClient, auth: KeyFactory, session: Session, shops: dict[str, str]
):
    template = make_template(session, valid_days=1)
    ext, member_id = make_member(session)
    code = issue(session, template, member_id, datetime(2026, 11, 4, 9, 0, tzinfo=SH))
    pos = auth("pos")
    last_minute = datetime(2026, 11, 4, 23, 59, 59, tzinfo=SH)
    midnight = datetime(2026, 11, 5, 0, 0, tzinfo=SH)
    ok = validate_http(client, pos, code, shops["a"], member=ext, at=last_minute)
    assert ok["valid"] is True and ok["discount"] == "50.00"
    late = validate_http(client, pos, code, shops["a"], member=ext, at=midnight)
    assert (late["valid"], late["reason"]) == (False, "expired")
    # The same instants written in UTC give the same answers.
    late_utc = validate_http(client, pos, code, shops["a"], member=ext, at=midnight.astimezone(UTC))
    assert late_utc["reason"] == "expired"
    with pytest.raises(coupons.CouponNotUsable) as exc:
        redeem(session, code, shops["a"], member=ext, at=midnight)
    assert exc.value.extra["reason"] == "expired"
    assert redeem(session, code, shops["a"], member=ext, at=last_minute).status == 201


# --------------------------------------------------------------------------------------
# Every reason, from validate (HTTP) and from redeem (service), which must agree
# --------------------------------------------------------------------------------------

Case = Callable[[Session, dict[str, str]], dict[str, Any]]


def _member_coupon(session: Session, shops: dict[str, str], **template: Any) -> dict[str, Any]:
    t = make_template(session, **template)
    ext, member_id = make_member(session)
    code = issue(session, t, member_id, T - timedelta(days=1))
    return {"code": code, "member": ext, "store": shops["a"], "amount": "300.00"}


def _case_mistyped(session: Session, shops: dict[str, str]) -> dict[str, Any]:
    c = _member_coupon(session, shops)
    raw = codes.normalise(c["code"])
    wrong = codes.ALPHABET[(codes.ALPHABET.index(raw[3]) + 1) % codes.BASE]
    return {**c, "code": raw[:3] + wrong + raw[4:]}


def _case_unknown(session: Session, shops: dict[str, str]) -> dict[str, Any]:
    return {**_member_coupon(session, shops), "code": codes.new_code()}


def _case_void(session: Session, shops: dict[str, str]) -> dict[str, Any]:
    c = _member_coupon(session, shops)
    coupons.void_coupon(session, c["code"], actor="test")
    return c


def _case_used(session: Session, shops: dict[str, str]) -> dict[str, Any]:
    c = _member_coupon(session, shops)
    redeem(session, c["code"], c["store"], member=c["member"])
    return c


def _case_member_required(session: Session, shops: dict[str, str]) -> dict[str, Any]:
    return {**_member_coupon(session, shops), "member": None}


def _case_other_member(session: Session, shops: dict[str, str]) -> dict[str, Any]:
    return {**_member_coupon(session, shops), "member": make_member(session)[0]}


def _case_not_yet(session: Session, shops: dict[str, str]) -> dict[str, Any]:
    start = T + timedelta(seconds=1)
    return _member_coupon(
        session, shops, valid_days=None, valid_from=start, valid_until=start + timedelta(days=3)
    )


def _case_expired(session: Session, shops: dict[str, str]) -> dict[str, Any]:
    return _member_coupon(
        session, shops, valid_days=None, valid_from=T - timedelta(days=3), valid_until=T
    )


def _case_wrong_store(session: Session, shops: dict[str, str]) -> dict[str, Any]:
    return _member_coupon(session, shops, stores=[shops["b"]], regions=[shops["other"]])


def _case_wrong_weekday(session: Session, shops: dict[str, str]) -> dict[str, Any]:
    return _member_coupon(session, shops, weekdays=[6, 7])


def _case_wrong_hour(session: Session, shops: dict[str, str]) -> dict[str, Any]:
    return _member_coupon(session, shops, hours_from=_t(18), hours_until=_t(22))


def _case_min_spend(session: Session, shops: dict[str, str]) -> dict[str, Any]:
    return {**_member_coupon(session, shops, min_spend=Decimal("500")), "amount": "499.99"}


def _t(hour: int, minute: int = 0) -> time:
    return time(hour, minute)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_case_mistyped, "mistyped"),
        (_case_unknown, "unknown"),
        (_case_void, "void"),
        (_case_used, "already_used"),
        (_case_member_required, "member_required"),
        (_case_other_member, "other_member"),
        (_case_not_yet, "not_yet_valid"),
        (_case_expired, "expired"),
        (_case_wrong_store, "wrong_store"),
        (_case_wrong_weekday, "wrong_weekday"),
        (_case_wrong_hour, "wrong_hour"),
        (_case_min_spend, "min_spend_not_met"),
    ],
)
def test_every_reason_from_validate_and_redeem(
    client: FlaskClient,
    auth: KeyFactory,
    session: Session,
    shops: dict[str, str],
    make: Case,
    reason: str,
):
    case = make(session, shops)
    answer = validate_http(
        client,
        auth("pos"),
        case["code"],
        case["store"],
        member=case["member"],
        amount=case["amount"],
    )
    assert (answer["valid"], answer["reason"], answer["discount"]) == (False, reason, None)
    assert answer["detail"] == coupons.REASON_DETAILS[reason]
    before = redemptions_of(session, case["code"])
    with pytest.raises(coupons.CouponNotUsable) as exc:
        redeem(session, case["code"], case["store"], member=case["member"], amount=case["amount"])
    assert exc.value.extra["reason"] == reason
    assert redemptions_of(session, case["code"]) == before, "a failure writes nothing"


def test_store_or_region_lists_accept_either(
    client: FlaskClient, auth: KeyFactory, session: Session, shops: dict[str, str]
):
    by_store = _member_coupon(session, shops, stores=[shops["a"]])
    by_region = _member_coupon(session, shops, regions=[shops["region"]])
    pos = auth("pos")
    for case in (by_store, by_region):
        ok = validate_http(client, pos, case["code"], shops["a"], member=case["member"])
        assert ok["valid"], ok
    assert validate_http(client, pos, by_region["code"], shops["b"], member=by_region["member"])[
        "valid"
    ]
    wrong = validate_http(client, pos, by_store["code"], shops["b"], member=by_store["member"])
    assert wrong["reason"] == "wrong_store"
    assert (
        validate_http(client, pos, by_region["code"], shops["c"], member=by_region["member"])[
            "reason"
        ]
        == "wrong_store"
    )


def test_weekday_and_hour_windows_use_the_template_zone(
    client: FlaskClient, auth: KeyFactory, session: Session, shops: dict[str, str]
):
    ny = ZoneInfo("America/New_York")
    weekend = _member_coupon(
        session,
        shops,
        timezone="America/New_York",
        weekdays=[6, 7],
        valid_days=None,
        valid_from=T - timedelta(days=30),
        valid_until=T + timedelta(days=30),
    )
    pos = auth("pos")
    # Friday 22:00 in New York is already Saturday in UTC and in Shanghai: not the weekend.
    friday_night = datetime(2026, 11, 6, 22, 0, tzinfo=ny)
    assert (
        validate_http(
            client, pos, weekend["code"], shops["a"], member=weekend["member"], at=friday_night
        )["reason"]
        == "wrong_weekday"
    )
    saturday = datetime(2026, 11, 7, 0, 0, tzinfo=ny)
    assert validate_http(
        client, pos, weekend["code"], shops["a"], member=weekend["member"], at=saturday
    )["valid"]

    night = _member_coupon(
        session,
        shops,
        hours_from=_t(22),
        hours_until=_t(2),
        valid_days=None,
        valid_from=T - timedelta(days=30),
        valid_until=T + timedelta(days=30),
    )
    expected = {
        (21, 59): "wrong_hour",
        (22, 0): None,
        (23, 30): None,
        (0, 0): None,
        (1, 59): None,
        (2, 0): "wrong_hour",
        (12, 0): "wrong_hour",
    }
    for (hour, minute), reason in expected.items():
        at = datetime(2026, 11, 4, hour, minute, tzinfo=SH)
        got = validate_http(client, pos, night["code"], shops["a"], member=night["member"], at=at)
        assert got["reason"] == reason, (hour, minute, got)


def test_discounts_by_kind(session: Session, shops: dict[str, str]):
    pct = _member_coupon(
        session, shops, kind="percent", amount_off=None, percent_off=Decimal("15"),
        face_value=Decimal("40.00"),
    )  # fmt: skip
    body = json.loads(
        redeem(session, pct["code"], shops["a"], member=pct["member"], amount="100.05").body
    )
    assert body["discount"] == "15.01"  # 15.0075 rounds half up to cents
    capped = _member_coupon(
        session, shops, kind="percent", amount_off=None, percent_off=Decimal("15"),
        face_value=Decimal("40.00"),
    )  # fmt: skip
    body = json.loads(
        redeem(session, capped["code"], shops["a"], member=capped["member"], amount="1000").body
    )
    assert body["discount"] == "40.00"
    small = _member_coupon(session, shops)  # 50 off
    body = json.loads(
        redeem(session, small["code"], shops["a"], member=small["member"], amount="30.00").body
    )
    assert body["discount"] == "30.00", "never more than the order"
    item = _member_coupon(
        session, shops, kind="free_item", amount_off=None, free_item_sku="LATTE",
        face_value=Decimal("32.00"),
    )  # fmt: skip
    body = json.loads(redeem(session, item["code"], shops["a"], member=item["member"]).body)
    assert (body["kind"], body["value"], body["discount"]) == ("free_item", "LATTE", "32.00")


# --------------------------------------------------------------------------------------
# Redemption over HTTP: idempotency, conflicts, rollback, scope
# --------------------------------------------------------------------------------------


def _redeem_http(
    client: FlaskClient, headers: dict[str, str], key: str | None, body: dict[str, Any]
) -> Any:
    h = dict(headers)
    if key is not None:
        h["Idempotency-Key"] = key
    return client.post("/v1/coupons/redemptions", json=body, headers=h)


def test_redeem_replays_the_first_answer_and_consumes_once(
    client: FlaskClient, auth: KeyFactory, session: Session, shops: dict[str, str]
):
    case = _member_coupon(session, shops)
    # Issued yesterday relative to T, valid 30 days: also valid now only if T is near now.
    template = make_template(session)
    ext, member_id = make_member(session)
    code = issue(session, template, member_id, datetime.now(UTC))
    del case
    pos = auth("pos", store=shops["a"])
    body = {
        "code": codes.display(code).lower(),
        "member_id": ext,
        "store": shops["a"],
        "order_amount": "268.00",
        "transaction_id": unique("POS"),
    }
    key = unique("K")
    first = _redeem_http(client, pos, key, body)
    assert first.status_code == 201, first.get_json()
    data = first.get_json()
    assert data["discount"] == "50.00" and data["code"] == codes.display(code)
    assert data["status"] == "redeemed" and data["member_id"] == ext
    second = _redeem_http(client, pos, key, body)
    assert second.status_code == 201
    assert second.data == first.data, "byte-identical replay"
    assert second.headers["Idempotent-Replayed"] == "true"
    assert redemptions_of(session, code) == 1
    # The same key with another body is a conflict, and changes nothing.
    other = _redeem_http(client, pos, key, {**body, "order_amount": "300.00"})
    assert other.status_code == 409 and other.mimetype == "application/problem+json"
    # A new key for the used coupon: already used.
    used = _redeem_http(client, pos, unique("K"), body)
    assert used.status_code == 422
    assert used.get_json()["reason"] == "already_used"
    detail = client.get(f"/v1/coupons/{code}", headers=pos).get_json()
    assert detail["status"] == "redeemed" and detail["redeemed_at"] is not None


def test_redeem_requires_an_idempotency_key_and_names_bad_fields(
    client: FlaskClient, auth: KeyFactory, shops: dict[str, str], session: Session
):
    pos = auth("pos")
    body = {"code": codes.new_code(), "store": shops["a"], "order_amount": "10.00"}
    missing = _redeem_http(client, pos, None, body)
    assert missing.status_code == 422 and "Idempotency-Key" in missing.get_json()["errors"]
    for patch, field in (
        ({"order_amount": 10.5}, "order_amount"),
        ({"order_amount": "-1"}, "order_amount"),
        ({"store": "NO-SUCH"}, "store"),
        ({"member_id": "NO-SUCH-MEMBER"}, "member_id"),
        ({"currency": "USD"}, "currency"),
        ({"code": ""}, "code"),
        ({"coupon": "x"}, "coupon"),
    ):
        resp = _redeem_http(client, pos, unique("K"), {**body, **patch})
        assert resp.status_code == 422, (patch, resp.get_json())
        assert field in resp.get_json()["errors"], (patch, resp.get_json())
    assert session.scalar(select(func.count()).select_from(CouponRedemption).where(
        CouponRedemption.store_id.is_(None))) == 0  # fmt: skip


def test_store_scoped_keys_only_work_at_their_store(
    client: FlaskClient, auth: KeyFactory, session: Session, shops: dict[str, str]
):
    template = make_template(session)
    ext, member_id = make_member(session)
    code = issue(session, template, member_id, datetime.now(UTC))
    pos_a = auth("pos", store=shops["a"])
    body = {"code": code, "member_id": ext, "store": shops["b"], "order_amount": "100.00"}
    resp = client.post("/v1/coupons/validate", json=body, headers=pos_a)
    assert resp.status_code == 422 and "store" in resp.get_json()["errors"]
    resp = _redeem_http(client, pos_a, unique("K"), body)
    assert resp.status_code == 422 and "store" in resp.get_json()["errors"]
    assert redemptions_of(session, code) == 0
    done = _redeem_http(client, auth("pos", store=shops["b"]), unique("K"), body)
    assert done.status_code == 201
    rid = done.get_json()["redemption_id"]
    # Another store's till can neither see nor roll back this redemption.
    assert client.get(f"/v1/coupons/redemptions/{rid}", headers=pos_a).status_code == 404
    resp = client.post(f"/v1/coupons/redemptions/{rid}/rollback", json={}, headers=pos_a)
    assert resp.status_code == 404
    assert client.get(f"/v1/coupons/{code}", headers=pos_a).get_json()["status"] == "redeemed"


def test_rollback_makes_the_coupon_usable_again_and_is_idempotent(
    client: FlaskClient, auth: KeyFactory, session: Session, shops: dict[str, str]
):
    template = make_template(session)
    ext, member_id = make_member(session)
    code = issue(session, template, member_id, datetime.now(UTC))
    pos = auth("pos")
    body = {"code": code, "member_id": ext, "store": shops["a"], "order_amount": "100.00"}
    key = unique("K")
    first = _redeem_http(client, pos, key, body)
    rid = first.get_json()["redemption_id"]
    url = f"/v1/coupons/redemptions/{rid}/rollback"
    undone = client.post(url, json={"reason": "refund"}, headers=pos)
    assert undone.status_code == 200, undone.get_json()
    state = undone.get_json()
    assert (state["status"], state["coupon_status"], state["rollback_reason"]) == (
        "rolled_back",
        "issued",
        "refund",
    )
    again = client.post(url, json={"reason": "refund"}, headers=pos)
    assert again.status_code == 200 and again.get_json() == state
    assert client.post(url, json={"reason": "lost"}, headers=pos).status_code == 422
    assert (
        client.post("/v1/coupons/redemptions/999999999/rollback", json={}, headers=pos).status_code
        == 404
    )
    # The first key still replays its first answer (the till's retry of that sale)...
    replay = _redeem_http(client, pos, key, body)
    assert replay.data == first.data
    # ...and a new sale can use the coupon again, once.
    second = _redeem_http(client, pos, unique("K"), body)
    assert second.status_code == 201 and second.get_json()["redemption_id"] != rid
    assert _redeem_http(client, pos, unique("K"), body).get_json()["reason"] == "already_used"
    live = session.scalar(
        select(func.count()).where(
            CouponRedemption.coupon_id == session.scalar(
                select(Coupon.id).where(Coupon.code == codes.normalise(code))),
            CouponRedemption.status == "redeemed",
        )
    )  # fmt: skip
    assert live == 1


def test_a_failed_redemption_is_reevaluated_on_retry(session: Session, shops: dict[str, str]):
    case = _member_coupon(session, shops)
    first = redeem(session, case["code"], case["store"], member=case["member"])
    rid = json.loads(first.body)["redemption_id"]
    key = unique("K")
    with pytest.raises(coupons.CouponNotUsable):
        redeem(session, case["code"], case["store"], member=case["member"], key=key)
    coupons.rollback_redemption(session, rid, reason="void", at=T)
    retried = redeem(session, case["code"], case["store"], member=case["member"], key=key)
    assert retried.status == 201 and not retried.replayed


def test_void_is_staff_only_idempotent_and_refused_after_redemption(
    client: FlaskClient, auth: KeyFactory, session: Session, shops: dict[str, str]
):
    case = _member_coupon(session, shops)
    url = f"/v1/coupons/{case['code']}/void"
    assert client.post(url, headers=auth("pos")).status_code == 403
    marketer = auth("marketer")
    first = client.post(url, headers=marketer)
    assert first.status_code == 200 and first.get_json()["status"] == "void"
    assert client.post(url, headers=marketer).get_json() == first.get_json()
    used = _member_coupon(session, shops)
    redeem(session, used["code"], used["store"], member=used["member"])
    assert client.post(f"/v1/coupons/{used['code']}/void", headers=marketer).status_code == 409


def test_profile_lists_the_members_coupons(
    client: FlaskClient, auth: KeyFactory, session: Session, shops: dict[str, str]
):
    template = make_template(session, valid_days=None, valid_from=T - timedelta(days=2),
                             valid_until=T - timedelta(days=1))  # fmt: skip
    live = make_template(session)
    ext, member_id = make_member(session)
    old = issue(session, template, member_id, T - timedelta(days=2))
    new = issue(session, live, member_id, datetime.now(UTC))
    profile = client.get(f"/v1/members/{ext}/profile", headers=auth("marketer"))
    assert profile.status_code == 200, profile.get_json()
    listed = profile.get_json()["coupons"]
    assert [(c["code"], c["template"], c["status"]) for c in listed] == [
        (new, live.code, "issued"),
        (old, template.code, "expired"),
    ]
    assert listed[0]["valid_until"]


# --------------------------------------------------------------------------------------
# Bulk bearer codes
# --------------------------------------------------------------------------------------


def test_bulk_codes_inline_export_and_bearer_redemption(
    client: FlaskClient, auth: KeyFactory, session: Session, shops: dict[str, str]
):
    template = make_template(session)
    marketer = auth("marketer")
    key = unique("B")
    url = f"/v1/coupons/templates/{template.code}/batches"
    made = client.post(url, json={"count": 200, "label": "flyer"},
                       headers={**marketer, "Idempotency-Key": key})  # fmt: skip
    assert made.status_code == 201, made.get_json()
    batch = made.get_json()
    assert (batch["status"], batch["generated"], batch["requested"]) == ("done", 200, 200)
    again = client.post(url, json={"count": 200, "label": "flyer"},
                        headers={**marketer, "Idempotency-Key": key})  # fmt: skip
    assert again.get_json()["id"] == batch["id"]
    other = client.post(url, json={"count": 300}, headers={**marketer, "Idempotency-Key": key})
    assert other.status_code == 409
    csv = client.get(f"/v1/coupons/batches/{batch['id']}/codes", headers=marketer)
    assert csv.status_code == 200 and csv.mimetype == "text/csv"
    lines = csv.get_data(as_text=True).splitlines()
    assert lines[0] == "code" and len(lines) == 201 and len(set(lines[1:])) == 200
    assert all(codes.is_well_formed(c) for c in lines[1:])
    # A bearer code is redeemable by anyone, without a member.
    pos = auth("pos")
    body = {"code": lines[1], "store": shops["a"], "order_amount": "80.00"}
    assert _redeem_http(client, pos, unique("K"), body).status_code == 201
    assert client.post(url, json={"count": 0}, headers=marketer).status_code == 422


def test_large_batches_go_to_a_job_that_generates_exactly_once(
    client: FlaskClient,
    auth: KeyFactory,
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(coupons, "INLINE_BATCH_MAX", 10)
    template = make_template(session)
    resp = client.post(f"/v1/coupons/templates/{template.code}/batches", json={"count": 50},
                       headers=auth("marketer"))  # fmt: skip
    assert resp.status_code == 202 and resp.get_json()["job_id"]
    batch_id = resp.get_json()["id"]
    assert resp.get_json()["status"] == "pending"
    # What the job does (its own unit of work in a worker), run twice as a retry would.
    monkeypatch.setattr(coupons, "BATCH_CHUNK", 16)  # several chunks
    assert coupons.fill_batch(session, batch_id)["status"] == "done"
    assert coupons.fill_batch(session, batch_id)["generated"] == 50
    assert coupons.count_codes(session, batch_id) == 50


# --------------------------------------------------------------------------------------
# The SQL conditions (redeem) and the Python explanation (validate) agree
# --------------------------------------------------------------------------------------


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    minutes=st.integers(-3 * 24 * 60, 10 * 24 * 60),
    store=st.sampled_from(["a", "b", "c"]),
    who=st.sampled_from(["owner", "other", "none"]),
    cents=st.integers(0, 100_000),
    which=st.integers(0, 2),
)
def test_redeem_succeeds_exactly_when_validate_says_valid(
    session: Session,
    shops: dict[str, str],
    agreement_fixtures: list[dict[str, Any]],
    minutes: int,
    store: str,
    who: str,
    cents: int,
    which: int,
):
    case = agreement_fixtures[which]
    at = T + timedelta(minutes=minutes)
    member = {"owner": case["member"], "other": case["other"], "none": None}[who]
    amount = Decimal(cents) / 100
    verdict = coupons.validate_coupon(
        session, code=case["code"], member=member, store=shops[store], order_amount=amount, at=at
    )
    savepoint = session.begin_nested()
    try:
        result = redeem(
            session, case["code"], shops[store], member=member, amount=str(amount), at=at
        )
        outcome = None
        assert result.status == 201
    except coupons.CouponNotUsable as exc:
        outcome = exc.extra["reason"]
    finally:
        savepoint.rollback()
    assert outcome == verdict["reason"], (at, store, who, amount, verdict)


@pytest.fixture
def agreement_fixtures(session: Session, shops: dict[str, str]) -> list[dict[str, Any]]:
    window = {"valid_days": None, "valid_from": T, "valid_until": T + timedelta(days=7)}
    templates = [
        make_template(session, **window, weekdays=[1, 3, 5], min_spend=Decimal("200"),
                      regions=[shops["region"]]),
        make_template(session, **window, hours_from=_t(21, 30), hours_until=_t(1, 15),
                      stores=[shops["c"]], timezone="Europe/London"),
        make_template(session, kind="percent", amount_off=None, percent_off=Decimal("12.5"),
                      face_value=Decimal("60"), valid_days=3, weekdays=[7],
                      hours_from=_t(9), hours_until=_t(18)),
    ]  # fmt: skip
    out = []
    for t in templates:
        ext, member_id = make_member(session)
        out.append(
            {"code": issue(session, t, member_id, T), "member": ext,
             "other": make_member(session)[0]}
        )  # fmt: skip
    return out
