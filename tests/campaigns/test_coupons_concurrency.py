"""Many tills at once, through a real threaded HTTP server with real commits."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from threading import Barrier
from typing import Any

import requests
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from campaigns import codes, coupons
from campaigns.models_coupons import Coupon, CouponRedemption
from service.auth import create_key
from service.members import upsert_member
from service.models import Member
from service.stores import upsert_store
from tests.conftest import LiveServer, unique


def seed(committed: Any) -> dict[str, str]:
    store, member = unique("S"), unique("M")

    def run(s: Session) -> dict[str, str]:
        upsert_store(s, store, "Live", "East", actor="test")
        upsert_member(s, member, {}, actor="test")
        s.flush()
        template = coupons.create_template(
            s,
            {"code": unique("LIVE"), "name": "Live", "kind": "amount",
             "amount_off": Decimal("20"), "valid_days": 3},
            actor="test", default_timezone="Asia/Shanghai", currency="CNY",
        )  # fmt: skip
        member_id = s.scalar(select(Member.id).where(Member.external_id == member))
        assert member_id is not None
        code = coupons.issue_coupon(
            s,
            template_code=template.code,
            member_id=member_id,
            campaign_id=None,
            decision_id=None,
            issued_at=datetime.now(UTC),
        )["code"]
        return {"code": code, "key": create_key(s, "pos", "live-pos")}

    return {"store": store, "member": member, **committed(run)}


def fire(
    url: str, api_key: str, calls: list[tuple[str, dict[str, Any]]]
) -> list[requests.Response]:
    barrier = Barrier(len(calls))

    def post(call: tuple[str, dict[str, Any]]) -> requests.Response:
        idem, body = call
        headers = {"Authorization": f"Bearer {api_key}", "Idempotency-Key": idem}
        barrier.wait()
        return requests.post(url, json=body, headers=headers, timeout=60)

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(post, calls))


def _state(engine: Engine, code: str) -> tuple[str, int, int]:
    with Session(engine) as s:
        coupon = s.execute(select(Coupon.id, Coupon.status).where(Coupon.code == code)).one()
        total = s.scalar(select(func.count()).where(CouponRedemption.coupon_id == coupon.id))
        live = s.scalar(
            select(func.count()).where(
                CouponRedemption.coupon_id == coupon.id, CouponRedemption.status == "redeemed"
            )
        )
    return coupon.status, int(total or 0), int(live or 0)


def test_50_tills_redeeming_one_single_use_code_exactly_one_succeeds(
    live_server: LiveServer, committed: Any, engine: Engine
):
    seeded = seed(committed)
    body = {"code": seeded["code"], "member_id": seeded["member"], "store": seeded["store"],
            "order_amount": "120.00"}  # fmt: skip
    responses = fire(
        f"{live_server.url}/v1/coupons/redemptions",
        seeded["key"],
        [(unique("K"), {**body, "transaction_id": unique("T")}) for _ in range(50)],
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(201) == 1, statuses
    assert statuses.count(422) == 49, statuses
    assert {r.json()["reason"] for r in responses if r.status_code == 422} == {"already_used"}
    assert _state(engine, codes.normalise(seeded["code"])) == ("redeemed", 1, 1)


def test_20_retries_of_one_redemption_get_the_same_answer_and_consume_once(
    live_server: LiveServer, committed: Any, engine: Engine
):
    seeded = seed(committed)
    body = {"code": seeded["code"], "member_id": seeded["member"], "store": seeded["store"],
            "order_amount": "120.00", "transaction_id": unique("T")}  # fmt: skip
    key = unique("K")
    responses = fire(f"{live_server.url}/v1/coupons/redemptions", seeded["key"], [(key, body)] * 20)
    assert [r.status_code for r in responses] == [201] * 20
    assert len({r.content for r in responses}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 19
    assert _state(engine, codes.normalise(seeded["code"])) == ("redeemed", 1, 1)


def test_concurrent_rollbacks_of_one_redemption_release_the_coupon_once(
    live_server: LiveServer, committed: Any, engine: Engine
):
    seeded = seed(committed)
    body = {"code": seeded["code"], "member_id": seeded["member"], "store": seeded["store"],
            "order_amount": "120.00"}  # fmt: skip
    [first] = fire(
        f"{live_server.url}/v1/coupons/redemptions", seeded["key"], [(unique("K"), body)]
    )
    assert first.status_code == 201, first.text
    rid = first.json()["redemption_id"]
    responses = fire(
        f"{live_server.url}/v1/coupons/redemptions/{rid}/rollback",
        seeded["key"],
        [(unique("K"), {"reason": "refund"})] * 10,
    )
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1
    assert _state(engine, codes.normalise(seeded["code"])) == ("issued", 1, 0)
    # Usable again, by exactly one of 10 concurrent tills.
    again = fire(
        f"{live_server.url}/v1/coupons/redemptions",
        seeded["key"],
        [(unique("K"), body) for _ in range(10)],
    )
    assert sorted(r.status_code for r in again).count(201) == 1
    assert _state(engine, codes.normalise(seeded["code"])) == ("redeemed", 2, 1)
