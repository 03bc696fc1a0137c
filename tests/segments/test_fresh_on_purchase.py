"""Fresh on purchase: POST /v1/events/purchases re-evaluates the member's dynamic segments."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from segments import custom
from tests.conftest import KeyFactory, purchase_payload, unique


def _segment(client: FlaskClient, headers: dict[str, str], rule: str) -> int:
    resp = client.post(
        "/v1/segments",
        json={"name": f"fresh-{uuid.uuid4().hex[:10]}", "rule": rule},
        headers=headers,
    )
    assert resp.status_code == 201, resp.get_json()
    return int(resp.get_json()["id"])


def _members(client: FlaskClient, headers: dict[str, str], seg: int) -> list[str]:
    body = client.get(f"/v1/segments/{seg}/members", headers=headers).get_json()
    return [i["member_id"] for i in body["items"]]


def _changes(client: FlaskClient, headers: dict[str, str], seg: int) -> list[tuple[str, str]]:
    since = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    body = client.get(
        f"/v1/segments/{seg}/changes", query_string={"since": since}, headers=headers
    ).get_json()
    return [(i["member_id"], i["kind"]) for i in body["items"]]


def test_a_purchase_moves_the_member_into_a_dynamic_segment_at_once(
    client: FlaskClient, auth: KeyFactory, store: str, session: Session
):
    custom.forget_catalogue()
    staff = auth("marketer")
    pos = auth("pos")
    tag = "f" + uuid.uuid4().hex[:10]
    member = unique("M")
    resp = client.put(
        f"/v1/members/{member}", json={"home_store": store, "tags": [tag]}, headers=staff
    )
    assert resp.status_code == 201, resp.get_json()
    # Two purchases over 100 each cross the threshold; the tag keeps other tests' members out.
    big = _segment(client, staff, f'tags contains "{tag}" and net_spend > 200')
    repeat = _segment(client, staff, f'tags contains "{tag}" and purchase_count >= 2')
    one_timer = _segment(client, staff, f'tags contains "{tag}" and purchase_count = 1')
    # A segment that reads no purchase field is not touched by a purchase.
    by_tag = _segment(client, staff, f'tags contains "{tag}"')
    for seg in (big, repeat, one_timer, by_tag):
        assert _members(client, staff, seg) == []

    first = client.post("/v1/events/purchases", json=purchase_payload(member, store), headers=pos)
    assert first.status_code == 201, first.get_json()
    assert _members(client, staff, one_timer) == [member]
    assert _changes(client, staff, one_timer) == [(member, "entered")]
    assert _members(client, staff, big) == [] and _members(client, staff, repeat) == []
    assert _members(client, staff, by_tag) == []

    second = client.post("/v1/events/purchases", json=purchase_payload(member, store), headers=pos)
    assert second.status_code == 201
    assert second.get_json()["member"]["net_spend"] == "257.00"
    assert _members(client, staff, big) == [member]
    assert _changes(client, staff, big) == [(member, "entered")]
    assert _members(client, staff, repeat) == [member]
    assert _members(client, staff, one_timer) == []
    assert _changes(client, staff, one_timer) == [(member, "entered"), (member, "left")]

    # A replay of the same purchase changes nothing, membership and history included.
    payload = purchase_payload(member, store)
    assert client.post("/v1/events/purchases", json=payload, headers=pos).status_code == 201
    history = _changes(client, staff, big)
    assert client.post("/v1/events/purchases", json=payload, headers=pos).status_code == 201
    assert _changes(client, staff, big) == history == [(member, "entered")]
