"""The /v1/rules endpoints: vocabulary, validate, explain, saved versions, roles, OpenAPI."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import AuditEntry, Member
from tests.conftest import KeyFactory
from tests.rules.conftest import AddMembers

TEXT = "days_since_last_purchase >= 90 and net_spend > 500 and consent.sms = true"


def test_vocabulary_lists_fields_types_operators_and_values(
    client: FlaskClient, auth: KeyFactory
) -> None:
    resp = client.get("/v1/rules/vocabulary", headers=auth("analyst"))
    assert resp.status_code == 200
    body = resp.get_json()
    fields = {f["name"]: f for f in body["fields"]}
    assert fields["gender"]["values"] == ["female", "male", "other"]
    assert fields["net_spend"]["type"] == "money"
    assert {"op": "ge", "text": ">=", "label": "at least", "value": "scalar"} in fields[
        "net_spend"
    ]["operators"]
    assert body["limits"]["max_depth"] == 10 and body["limits"]["max_nodes"] == 200
    assert "is not set" in body["missing_values"]


@pytest.mark.parametrize(
    ("role", "status"),
    [("admin", 200), ("marketer", 200), ("approver", 200), ("analyst", 200), ("pos", 403)],
)
def test_reading_roles(client: FlaskClient, auth: KeyFactory, role: str, status: int) -> None:
    headers = auth(role)
    assert client.get("/v1/rules/vocabulary", headers=headers).status_code == status
    resp = client.post("/v1/rules/validate", json={"rule": TEXT}, headers=headers)
    assert resp.status_code == status


def test_authentication_is_required(client: FlaskClient) -> None:
    assert client.post("/v1/rules/validate", json={"rule": TEXT}).status_code == 401


def test_validate_text_returns_the_normalised_tree(client: FlaskClient, auth: KeyFactory) -> None:
    resp = client.post("/v1/rules/validate", json={"rule": TEXT}, headers=auth("marketer"))
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["text"] == TEXT
    assert body["rule"]["all"][1] == {"field": "net_spend", "op": "gt", "value": "500"}
    assert len(body["hash"]) == 64
    assert body["fields"] == ["consent.sms", "days_since_last_purchase", "net_spend"]
    again = client.post("/v1/rules/validate", json={"rule": body["rule"]}, headers=auth("marketer"))
    assert again.get_json() == body


def test_validate_reports_pointers(client: FlaskClient, auth: KeyFactory) -> None:
    rule = {
        "all": [
            {"field": "colour", "op": "eq", "value": "red"},
            {"any": []},
            {"field": "age", "op": "ge", "value": "old"},
        ]
    }
    resp = client.post("/v1/rules/validate", json={"rule": rule}, headers=auth("marketer"))
    assert resp.status_code == 422
    assert resp.mimetype == "application/problem+json"
    body = resp.get_json()
    assert body["type"].endswith("/validation-error")
    assert set(body["errors"]) == {"/all/0", "/all/1", "/all/2"}
    assert "unknown field 'colour'" in body["errors"]["/all/0"][0]
    assert body["problems"][0]["code"] == "unknown_field"
    assert "purchase_count" in body["problems"][0]["expected"]


def test_validate_reports_text_positions(client: FlaskClient, auth: KeyFactory) -> None:
    resp = client.post(
        "/v1/rules/validate", json={"rule": "age > 3 and colour = 1"}, headers=auth("marketer")
    )
    assert resp.status_code == 422
    assert resp.get_json()["problems"][0] == {
        "pointer": "/all/1",
        "code": "unknown_field",
        "message": "unknown field 'colour'",
        "expected": resp.get_json()["problems"][0]["expected"],
        "position": 12,
    }
    syntax = client.post("/v1/rules/validate", json={"rule": "age >"}, headers=auth("marketer"))
    assert syntax.status_code == 422
    body = syntax.get_json()
    assert body["problems"][0]["position"] == 5
    assert "expected a value" in body["errors"]["rule"][0]


def test_event_fields_need_the_event_scope(client: FlaskClient, auth: KeyFactory) -> None:
    rule = 'event.amount >= 200 and event.item_categories contains "shoes"'
    headers = auth("marketer")
    resp = client.post("/v1/rules/validate", json={"rule": rule}, headers=headers)
    assert resp.status_code == 422
    assert resp.get_json()["problems"][0]["code"] == "wrong_scope"
    ok = client.post("/v1/rules/validate", json={"rule": rule, "scope": "event"}, headers=headers)
    assert ok.status_code == 200


def test_explain_a_member(
    client: FlaskClient, auth: KeyFactory, session: Session, member_factory: AddMembers
) -> None:
    member_id = member_factory(
        consent_sms=True,
        stats={
            "net_spend": Decimal("800"),
            "last_purchase_at": datetime.now(UTC) - timedelta(days=100),
        },
    )
    external = session.scalar(select(Member.external_id).where(Member.id == member_id))
    resp = client.post(
        "/v1/rules/explain",
        json={"rule": TEXT, "member_id": external},
        headers=auth("approver"),
    )
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["outcome"] is True
    assert body["member_id"] == external
    assert [c["actual"] for c in body["trace"]["children"]] == [100, "800.00", True]
    then = client.post(
        "/v1/rules/explain",
        json={"rule": TEXT, "member_id": external, "at": "2000-01-01T00:00:00+00:00"},
        headers=auth("approver"),
    )
    assert then.get_json()["outcome"] is False
    assert then.get_json()["decided_by"] == ["/all/0"]


def test_explain_a_purchase(
    client: FlaskClient, auth: KeyFactory, session: Session, member_factory: AddMembers
) -> None:
    member_id = member_factory(home_store="S-A")
    external = session.scalar(select(Member.external_id).where(Member.id == member_id))
    rule = (
        'event.amount >= 200 and event.channel = "ecom" and event.item_categories contains "shoes"'
        ' and event.region = "East"'
    )
    event: dict[str, Any] = {
        "amount": "268.00",
        "store": "S-C",
        "channel": "ecom",
        "items": [{"sku": "A-1", "category": "shoes"}],
    }
    resp = client.post(
        "/v1/rules/explain",
        json={"rule": rule, "member_id": external, "event": event},
        headers=auth("marketer"),
    )
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["outcome"] is True
    event["amount"] = "199.99"
    resp = client.post(
        "/v1/rules/explain",
        json={"rule": rule, "member_id": external, "event": event},
        headers=auth("marketer"),
    )
    assert resp.get_json()["outcome"] is False
    assert resp.get_json()["decided_by"] == ["/all/0"]


def test_explain_unknown_member(client: FlaskClient, auth: KeyFactory) -> None:
    resp = client.post(
        "/v1/rules/explain", json={"rule": TEXT, "member_id": "nobody"}, headers=auth("analyst")
    )
    assert resp.status_code == 404
    assert resp.get_json()["errors"] == {"member_id": ["unknown member"]}


def test_explain_respects_a_store_scoped_key(
    client: FlaskClient, auth: KeyFactory, session: Session, member_factory: AddMembers
) -> None:
    member_id = member_factory(home_store="S-B")
    external = session.scalar(select(Member.external_id).where(Member.id == member_id))
    resp = client.post(
        "/v1/rules/explain",
        json={"rule": TEXT, "member_id": external},
        headers=auth("analyst", store="S-A"),
    )
    assert resp.status_code == 404


def test_saved_rules_are_versioned(client: FlaskClient, auth: KeyFactory, session: Session) -> None:
    headers = auth("marketer")
    created = client.post(
        "/v1/rules",
        json={"name": "win-back", "rule": TEXT, "description": "lapsed spenders"},
        headers=headers,
    )
    assert created.status_code == 201
    v1 = created.get_json()
    assert (v1["version"], v1["scope"], v1["text"]) == (1, "member", TEXT)
    assert v1["created_by"].startswith("key:")

    # Same content (even spelled differently) is not a new version.
    same = client.put(
        "/v1/rules/win-back", json={"rule": {"all": v1["rule"]["all"]}}, headers=headers
    )
    assert same.status_code == 200 and same.get_json()["version"] == 1

    edited = client.put(
        "/v1/rules/win-back",
        json={"rule": TEXT.replace("500", "800"), "base_version": 1},
        headers=headers,
    )
    assert edited.status_code == 201
    v2 = edited.get_json()
    assert v2["version"] == 2 and v2["hash"] != v1["hash"]
    assert v2["description"] == "lapsed spenders"

    stale = client.put(
        "/v1/rules/win-back", json={"rule": TEXT, "base_version": 1}, headers=headers
    )
    assert stale.status_code == 409

    assert client.get("/v1/rules/win-back", headers=headers).get_json()["version"] == 2
    old = client.get("/v1/rules/win-back/versions/1", headers=auth("analyst")).get_json()
    assert old["hash"] == v1["hash"] and old["text"] == TEXT
    versions = client.get("/v1/rules/win-back/versions", headers=headers).get_json()["items"]
    assert [v["version"] for v in versions] == [1, 2]
    listing = client.get("/v1/rules?limit=500", headers=headers).get_json()["items"]
    assert {r["name"]: r["version"] for r in listing if r["name"] == "win-back"} == {"win-back": 2}

    actions = session.scalars(
        select(AuditEntry.action).where(AuditEntry.entity_id == "win-back").order_by(AuditEntry.id)
    ).all()
    assert actions == ["rule.created", "rule.versioned"]


def test_saving_errors(client: FlaskClient, auth: KeyFactory) -> None:
    headers = auth("marketer")
    assert (
        client.post("/v1/rules", json={"name": "dup", "rule": TEXT}, headers=headers).status_code
        == 201
    )
    assert (
        client.post("/v1/rules", json={"name": "dup", "rule": TEXT}, headers=headers).status_code
        == 409
    )
    bad_name = client.post("/v1/rules", json={"name": "Bad Name", "rule": TEXT}, headers=headers)
    assert bad_name.status_code == 422 and "name" in bad_name.get_json()["errors"]
    reserved = client.post("/v1/rules", json={"name": "validate", "rule": TEXT}, headers=headers)
    assert reserved.status_code == 422
    invalid = client.post("/v1/rules", json={"name": "x", "rule": {"all": []}}, headers=headers)
    assert invalid.status_code == 422 and invalid.get_json()["errors"] == {
        "": ["'all' has no conditions; expected at least one condition"]
    }
    assert client.get("/v1/rules/missing", headers=headers).status_code == 404
    assert client.get("/v1/rules/dup/versions/9", headers=headers).status_code == 404
    assert client.put("/v1/rules/missing", json={"rule": TEXT}, headers=headers).status_code == 404


@pytest.mark.parametrize(
    ("role", "status"), [("marketer", 201), ("approver", 403), ("analyst", 403), ("pos", 403)]
)
def test_saving_roles(client: FlaskClient, auth: KeyFactory, role: str, status: int) -> None:
    resp = client.post("/v1/rules", json={"name": f"r-{role}", "rule": TEXT}, headers=auth(role))
    assert resp.status_code == status


def test_openapi_documents_the_endpoints_with_examples(client: FlaskClient) -> None:
    spec = client.get("/openapi.json").get_json()
    paths = spec["paths"]
    for path in (
        "/v1/rules/vocabulary",
        "/v1/rules/validate",
        "/v1/rules/explain",
        "/v1/rules",
        "/v1/rules/{name}",
        "/v1/rules/{name}/versions/{version}",
    ):
        assert path in paths
    examples = paths["/v1/rules/validate"]["post"]["requestBody"]["content"]["application/json"]
    assert set(examples["examples"]) == {"tree", "text", "event"}
    assert "422" in paths["/v1/rules/validate"]["post"]["responses"]


def test_a_saved_version_loads_as_the_same_rule(
    client: FlaskClient, auth: KeyFactory, session: Session
) -> None:
    from rules import to_text
    from service.rule_versions import load_rule
    from service.vocabulary import default_vocabulary

    headers = auth("marketer")
    first = client.post("/v1/rules", json={"name": "a", "rule": TEXT}, headers=headers).get_json()
    other = client.post(
        "/v1/rules", json={"name": "b", "rule": {"all": first["rule"]["all"]}}, headers=headers
    ).get_json()
    assert other["hash"] == first["hash"]  # same content, same hash, whatever the name
    rule, saved = load_rule(session, default_vocabulary(), "a", 1)
    assert rule.hash == first["hash"] and saved["version"] == 1
    assert to_text(rule.root) == TEXT
