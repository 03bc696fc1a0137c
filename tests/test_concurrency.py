"""Retries from many clients at once, against a real threaded server with real commits."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from threading import Barrier
from typing import Any

import requests
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.auth import create_key
from service.members import upsert_member
from service.models import Member, MemberStats, Transaction
from service.stores import upsert_store
from tests.conftest import LiveServer, purchase_payload, unique


def seed(committed: Any) -> tuple[str, str, str]:
    store, member = unique("S"), unique("M")

    def run(s: Session) -> str:
        upsert_store(s, store, "Live", "East", actor="test")
        s.flush()
        upsert_member(s, member, {}, actor="test")
        return create_key(s, "pos", "live-pos")

    key = committed(run)
    return store, member, key


def fire(url: str, key: str, bodies: list[dict[str, Any]], headers: dict[str, str] | None = None):
    barrier = Barrier(len(bodies))

    def post(body: dict[str, Any]) -> requests.Response:
        barrier.wait()
        return requests.post(
            url,
            json=body,
            headers={"Authorization": f"Bearer {key}", **(headers or {})},
            timeout=30,
        )

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def test_same_purchase_from_20_clients_is_stored_once(
    live_server: LiveServer, committed: Any, engine: Any
):
    store, member, key = seed(committed)
    payload = purchase_payload(member, store)
    responses = fire(f"{live_server.url}/v1/events/purchases", key, [payload] * 20)
    assert [r.status_code for r in responses] == [201] * 20
    assert len({r.content for r in responses}) == 1, "every client sees the original answer"
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 19
    with Session(engine) as s:
        member_id = s.scalar(select(Member.id).where(Member.external_id == member))
        n = s.scalar(select(func.count()).where(Transaction.member_id == member_id))
        stats = s.get(MemberStats, member_id)
    assert n == 1
    assert stats is not None and stats.purchase_count == 1


def test_same_idempotency_key_from_20_clients(live_server: LiveServer, committed: Any, engine: Any):
    store, member, key = seed(committed)
    payload = purchase_payload(member, store)
    responses = fire(
        f"{live_server.url}/v1/events/purchases",
        key,
        [payload] * 20,
        headers={"Idempotency-Key": unique("K")},
    )
    assert {r.status_code for r in responses} == {201}
    with Session(engine) as s:
        member_id = s.scalar(select(Member.id).where(Member.external_id == member))
        assert s.scalar(select(func.count()).where(Transaction.member_id == member_id)) == 1


def test_concurrent_refunds_never_exceed_the_purchase(
    live_server: LiveServer, committed: Any, engine: Any
):
    store, member, key = seed(committed)
    purchase = purchase_payload(member, store, amount="100.00")
    assert (
        requests.post(
            f"{live_server.url}/v1/events/purchases",
            json=purchase,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        ).status_code
        == 201
    )
    refunds = []
    for _ in range(12):
        body = purchase_payload(member, store, amount="20.00", transaction_id=unique("R"))
        body["original_transaction_id"] = purchase["transaction_id"]
        refunds.append(body)
    responses = fire(f"{live_server.url}/v1/events/refunds", key, refunds)
    codes = sorted(r.status_code for r in responses)
    assert codes.count(201) == 5 and codes.count(422) == 7
    with Session(engine) as s:
        member_id = s.scalar(select(Member.id).where(Member.external_id == member))
        stats = s.get(MemberStats, member_id)
        assert stats is not None
        assert (stats.refund_count, str(stats.refund_amount), str(stats.net_spend)) == (
            5,
            "100.00",
            "0.00",
        )
