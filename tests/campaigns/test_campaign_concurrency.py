"""Budgets, caps and exclusivity hold under concurrent clients (real server, real commits)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import requests
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from campaigns import coupons as coupon_service
from campaigns import service as campaigns
from campaigns.runs import run_campaign
from service.auth import create_key
from service.members import upsert_member
from service.stores import upsert_store
from tests.campaigns.test_campaigns import PURCHASE_COUPON
from tests.conftest import LiveServer, purchase_payload, unique


@pytest.fixture
def world(committed: Any, engine: Engine) -> Iterator[dict[str, Any]]:
    """A store with 30 members, a POS key and an active purchase campaign (5 coupons)."""
    store = unique("S")
    members = [unique("M") for _ in range(30)]
    template = unique("TPL")

    def seed(s: Session) -> dict[str, Any]:
        upsert_store(s, store, "Live", "East", actor="test")
        s.flush()
        for m in members:
            upsert_member(s, m, {"home_store": store}, actor="test")
        coupon_service.create_template(
            s,
            {
                "code": template,
                "name": "t",
                "kind": "amount",
                "amount_off": Decimal("10"),
                "valid_days": 7,
            },
            actor="test",
            default_timezone="UTC",
            currency="CNY",
        )
        s.flush()
        c = campaigns.create_campaign(
            s,
            {
                "name": unique("race").lower(),
                "kind": "coupon",
                **PURCHASE_COUPON,
                "budget": {"coupons": 5},
                # No event condition, so the batch path can evaluate it too.
                "condition": None,
                "audience": {"stores": [store]},
                "actions": {"coupon": {"template": template}},
            },
            actor="marketer",
            approval_budget=Decimal(1000),
        )
        campaigns.activate(s, c["id"], actor="marketer")
        return {"campaign": c["id"], "key": create_key(s, "pos", "live-pos")}

    found = committed(seed)
    yield {"store": store, "members": members, **found}
    # Later tests must not see this committed campaign.
    committed(lambda s: campaigns.end(s, found["campaign"], actor="test"))


def _counts(engine: Engine, campaign_id: int) -> dict[str, Any]:
    with Session(engine) as s:
        row = s.execute(
            text(
                """
                SELECT c.issued_coupons,
                       (SELECT count(*) FROM coupons WHERE campaign_id = c.id) AS coupons,
                       (SELECT count(*) FROM decisions WHERE campaign_id = c.id
                          AND outcome = 'qualified') AS qualified,
                       (SELECT count(*) FROM decisions WHERE campaign_id = c.id
                          AND reason = 'budget_exhausted') AS exhausted
                FROM campaigns c WHERE c.id = :c
                """
            ),
            {"c": campaign_id},
        ).one()
    return dict(row._mapping)


def test_budget_is_exact_when_30_tills_race_for_5_coupons(
    live_server: LiveServer, world: dict[str, Any], engine: Engine
) -> None:
    barrier = threading.Barrier(30)

    def buy(member: str) -> requests.Response:
        barrier.wait()
        return requests.post(
            f"{live_server.url}/v1/events/purchases",
            json=purchase_payload(member, world["store"], amount="200.00"),
            headers={"Authorization": f"Bearer {world['key']}"},
            timeout=60,
        )

    with ThreadPoolExecutor(30) as pool:
        responses = list(pool.map(buy, world["members"]))
    assert {r.status_code for r in responses} == {201}
    received = sum(len(r.json()["rewards"]["coupons"]) for r in responses)
    counts = _counts(engine, world["campaign"])
    assert received == 5
    assert counts == {"issued_coupons": 5, "coupons": 5, "qualified": 5, "exhausted": 25}


def test_budget_is_exact_when_a_batch_run_and_tills_compete(
    live_server: LiveServer, world: dict[str, Any], engine: Engine
) -> None:
    tills, batch_members = world["members"][:15], world["members"][15:]
    barrier = threading.Barrier(len(tills) + 1)
    batch_result: dict[str, Any] = {}

    def buy(member: str) -> int:
        barrier.wait()
        r = requests.post(
            f"{live_server.url}/v1/events/purchases",
            json=purchase_payload(member, world["store"], amount="200.00"),
            headers={"Authorization": f"Bearer {world['key']}"},
            timeout=60,
        )
        assert r.status_code == 201
        return len(r.json()["rewards"]["coupons"])

    def batch() -> None:
        barrier.wait()
        with Session(engine) as s, s.begin():
            ids = (
                s.execute(
                    text("SELECT id FROM members WHERE external_id = ANY(:e)"), {"e": batch_members}
                )
                .scalars()
                .all()
            )
            from sqlalchemy import select

            from service.models import Member

            batch_result.update(
                run_campaign(
                    s,
                    world["campaign"],
                    run_key=unique("race"),
                    now=datetime.now(UTC),
                    members=select(Member.id).where(Member.id.in_(ids)),
                )
            )

    with ThreadPoolExecutor(len(tills) + 1) as pool:
        batch_future = pool.submit(batch)
        till_coupons = sum(pool.map(buy, tills))
        batch_future.result()
    counts = _counts(engine, world["campaign"])
    assert till_coupons + batch_result["coupons"] == 5
    assert counts["issued_coupons"] == 5 and counts["coupons"] == 5 and counts["qualified"] == 5
