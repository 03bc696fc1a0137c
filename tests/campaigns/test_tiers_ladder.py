"""The tier ladder over HTTP: read, replace atomically, validation per field, audit, cache."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from campaigns import tiers
from service.errors import ValidationFailed
from service.models import AuditEntry, Member
from tests.conftest import KeyFactory, purchase_payload, unique

LADDER = [
    {"name": "silver", "min_spend_12m": "2000.00", "min_purchases_12m": 4},
    {"name": "gold", "min_spend_12m": "8000.00", "min_purchases_12m": 12},
    {"name": "diamond", "min_spend_12m": "30000.00", "min_purchases_12m": 36},
]


@pytest.fixture
def admin(auth: KeyFactory) -> dict[str, str]:
    return auth("admin")


def put(client: FlaskClient, headers: dict[str, str], body: dict[str, Any]):
    return client.put("/v1/tiers", json=body, headers=headers)


def test_seeded_ladder_is_readable_by_staff_and_tills(client: FlaskClient, auth: KeyFactory):
    for role in ("marketer", "analyst", "pos"):
        resp = client.get("/v1/tiers", headers=auth(role))
        assert resp.status_code == 200
    body = resp.json
    assert [(t["name"], t["rank"]) for t in body["tiers"]] == [
        ("silver", 1),
        ("gold", 2),
        ("diamond", 3),
    ]
    assert body["tiers"][0]["min_spend_12m"] == "2000.00"
    assert body["tiers"][0]["min_purchases_12m"] == 4
    assert "OR" in body["rule"]


def test_only_admins_replace_the_ladder(client: FlaskClient, auth: KeyFactory):
    resp = put(client, auth("marketer"), {"tiers": LADDER})
    assert resp.status_code == 403


def test_replace_is_audited_and_bumps_the_version(
    client: FlaskClient, admin: dict[str, str], session: Session
):
    before = client.get("/v1/tiers", headers=admin).json
    new = [
        {"name": "bronze", "min_purchases_12m": 2},
        *LADDER,
    ]
    resp = put(client, admin, {"tiers": new, "base_version": before["version"]})
    assert resp.status_code == 200, resp.json
    assert resp.json["version"] == before["version"] + 1
    assert [t["name"] for t in resp.json["tiers"]] == ["bronze", "silver", "gold", "diamond"]
    assert resp.json["tiers"][0]["min_spend_12m"] is None
    assert client.get("/v1/tiers", headers=admin).json == resp.json
    entry = session.execute(
        select(AuditEntry.actor, AuditEntry.details).where(AuditEntry.action == "tiers.replaced")
    ).one()
    assert entry.actor.startswith("key:")
    assert entry.details["previous"] == ["silver", "gold", "diamond"]
    # A stale edit is refused rather than silently overwriting the one above.
    stale = put(client, admin, {"tiers": LADDER, "base_version": before["version"]})
    assert stale.status_code == 409
    assert "base_version" in stale.json["errors"]


@pytest.mark.parametrize(
    ("tiers_", "where", "field", "words"),
    [
        (
            [{"name": "gold", "min_spend_12m": "8000"}, {"name": "Gold", "min_spend_12m": "9000"}],
            "1",
            "name",
            "duplicate",
        ),
        (
            [{"name": "a", "min_spend_12m": "8000"}, {"name": "b", "min_spend_12m": "8000"}],
            "1",
            "min_spend_12m",
            "more than 8000",
        ),
        (
            [{"name": "a", "min_purchases_12m": 10}, {"name": "b", "min_purchases_12m": 3}],
            "1",
            "min_purchases_12m",
            "more than 10",
        ),
        ([{"name": "a"}], "0", "min_spend_12m", "set min_spend_12m or min_purchases_12m"),
        ([{"name": " padded", "min_spend_12m": "1"}], "0", "name", "surrounding spaces"),
    ],
)
def test_invalid_ladders_name_the_tier_and_field(
    client: FlaskClient,
    admin: dict[str, str],
    tiers_: list[dict[str, Any]],
    where: str,
    field: str,
    words: str,
):
    before = client.get("/v1/tiers", headers=admin).json
    resp = put(client, admin, {"tiers": tiers_})
    assert resp.status_code == 422
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    messages = resp.json["errors"]["tiers"][where][field]
    assert any(words in m for m in messages), messages
    assert client.get("/v1/tiers", headers=admin).json == before, "nothing was changed"


def test_schema_errors_are_per_field_too(client: FlaskClient, admin: dict[str, str]):
    resp = put(
        client,
        admin,
        {"tiers": [{"name": "a", "min_spend_12m": 12.5, "min_purchases_12m": 0, "x": 1}]},
    )
    assert resp.status_code == 422
    item = resp.json["errors"]["tiers"]["0"]
    assert set(item) == {"min_spend_12m", "min_purchases_12m", "x"}
    assert put(client, admin, {"tiers": []}).status_code == 422


def seed_member_with_tier(session: Session, tier: str) -> str:
    ext = unique("M")
    session.execute(
        text("INSERT INTO members (external_id, tier) VALUES (:e, :t)"), {"e": ext, "t": tier}
    )
    return ext


def test_dropping_a_tier_members_hold_needs_a_rename(
    client: FlaskClient, admin: dict[str, str], session: Session
):
    ext = seed_member_with_tier(session, "diamond")
    session.flush()
    two = LADDER[:2]
    resp = put(client, admin, {"tiers": two})
    assert resp.status_code == 409
    assert "diamond" in resp.json["errors"]["tiers"][0]
    renamed = [*two, {"name": "black", "min_spend_12m": "30000.00", "min_purchases_12m": 36}]
    ok = put(client, admin, {"tiers": renamed, "renames": {"diamond": "black"}})
    assert ok.status_code == 200, ok.json
    session.expire_all()
    assert session.scalar(select(Member.tier).where(Member.external_id == ext)) == "black"
    bad = put(client, admin, {"tiers": renamed, "renames": {"platinum": "black"}})
    assert bad.status_code == 422
    assert "platinum" in bad.json["errors"]["renames"]


def test_the_purchase_path_uses_the_new_ladder_at_once(
    client: FlaskClient, admin: dict[str, str], auth: KeyFactory, store: str, session: Session
):
    session.execute(text("DELETE FROM stats_windows"))
    cheap = [{"name": "silver", "min_spend_12m": "100.00"}, *LADDER[1:]]
    assert put(client, admin, {"tiers": cheap}).status_code == 200
    ext = unique("M")
    client.put(f"/v1/members/{ext}", json={"home_store": store}, headers=auth("marketer"))
    payload = purchase_payload(
        ext, store, occurred_at=(datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    )
    body = client.post("/v1/events/purchases", json=payload, headers=auth("pos")).json
    assert body["rewards"]["tier_change"]["to"] == "silver"


def test_ladder_cache_follows_replacements(session: Session):
    first = tiers.ladder(session)
    assert tiers.ladder(session) is first, "unchanged ladder comes from the cache"
    lower = [
        {"name": t.name, "min_spend_12m": t.min_spend_12m / 2, "min_purchases_12m": None}
        for t in first.tiers
    ]
    tiers.replace_ladder(session, lower, actor="test")
    now = tiers.ladder(session)
    assert [t.min_spend_12m for t in now.tiers] == [t.min_spend_12m / 2 for t in first.tiers]
    assert now.version == first.version + 1


def test_every_bad_tier_is_reported_at_once():
    with pytest.raises(ValidationFailed) as err:
        tiers.validate_ladder(
            [
                {"name": "", "min_spend_12m": Decimal("10")},
                {"name": "b"},
                {"name": "c", "min_spend_12m": Decimal("5")},
            ]
        )
    reported = err.value.errors["tiers"]
    assert set(reported) == {"0", "1", "2"}
    assert "name" in reported["0"]
    assert "min_spend_12m" in reported["1"]
    assert any("more than 10" in m for m in reported["2"]["min_spend_12m"])
