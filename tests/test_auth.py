"""API keys and the role × endpoint matrix."""

from __future__ import annotations

import hashlib

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.models import ApiKey
from tests.conftest import KeyFactory, purchase_payload, unique

ROLES = ("admin", "marketer", "approver", "pos", "analyst")

# endpoint → roles allowed; everyone else gets 403.
MATRIX = {
    ("GET", "/v1/stores"): set(ROLES),
    ("POST", "/v1/stores"): {"admin"},
    ("GET", "/v1/members"): set(ROLES),
    ("POST", "/v1/members"): {"admin", "marketer", "pos"},
    ("GET", "/v1/members/{m}"): set(ROLES),
    ("PUT", "/v1/members/{m}"): {"admin", "marketer", "pos"},
    ("PATCH", "/v1/members/{m}"): {"admin", "marketer", "pos"},
    ("GET", "/v1/members/{m}/profile"): set(ROLES),
    ("POST", "/v1/members/{m}/erasure"): {"admin"},
    ("POST", "/v1/events/purchases"): {"admin", "pos"},
    ("POST", "/v1/events/refunds"): {"admin", "pos"},
}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(("method", "path"), sorted(MATRIX))
def test_role_matrix(
    client: FlaskClient, auth: KeyFactory, store: str, role: str, method: str, path: str
):
    member = unique("M")
    client.put(f"/v1/members/{member}", json={"home_store": store}, headers=auth("admin"))
    bodies = {
        "/v1/stores": {"code": unique("S"), "name": "n", "region": "East"},
        "/v1/members": {"external_id": unique("M")},
        "/v1/members/{m}": {"name": "x"},
        "/v1/members/{m}/erasure": {},
        "/v1/events/purchases": purchase_payload(member, store),
        "/v1/events/refunds": {**purchase_payload(member, store), "original_transaction_id": "X"},
    }
    kwargs = {"json": bodies[path]} if method in ("POST", "PUT", "PATCH") else {}
    resp = client.open(path.format(m=member), method=method, headers=auth(role), **kwargs)
    if role in MATRIX[(method, path)]:
        assert resp.status_code not in (401, 403), resp.json
    else:
        assert resp.status_code == 403, resp.json
        assert resp.content_type == "application/problem+json"
        assert resp.json["type"].endswith("/forbidden")


def test_missing_or_malformed_key_is_401(client: FlaskClient):
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}):
        resp = client.get("/v1/members", headers=headers)
        assert resp.status_code == 401
        assert resp.content_type == "application/problem+json"
    unknown = client.get("/v1/members", headers={"Authorization": "Bearer ptn_nope"})
    assert unknown.status_code == 401


def test_auth_comes_before_validation(client: FlaskClient):
    resp = client.post("/v1/events/purchases", json={"garbage": True})
    assert resp.status_code == 401


def test_only_the_hash_is_stored_and_revocation_works(
    client: FlaskClient, auth: KeyFactory, session: Session, db_app
):
    headers = auth("analyst")
    raw = headers["Authorization"].split(" ", 1)[1]
    row = session.scalars(
        select(ApiKey).where(ApiKey.key_hash == hashlib.sha256(raw.encode()).digest())
    ).one()
    assert raw not in (row.name, row.prefix) and len(row.prefix) < len(raw)
    assert client.get("/v1/stores", headers=headers).status_code == 200
    session.execute(update(ApiKey).where(ApiKey.id == row.id).values(revoked_at=ApiKey.created_at))
    session.flush()
    db_app.extensions["patron.keycache"].clear()  # the short cache is part of the contract
    assert client.get("/v1/stores", headers=headers).status_code == 401


def test_store_scoped_key_sees_only_its_store(
    client: FlaskClient, auth: KeyFactory, store: str, session: Session
):
    from service.stores import upsert_store

    other = unique("S")
    upsert_store(session, other, "Other", "West", actor="test")
    session.flush()
    admin = auth("admin")
    mine, theirs = unique("M"), unique("M")
    client.put(f"/v1/members/{mine}", json={"home_store": store}, headers=admin)
    client.put(f"/v1/members/{theirs}", json={"home_store": other}, headers=admin)
    scoped = auth("pos", store=store)
    listed = client.get("/v1/members?limit=500", headers=scoped).json["items"]
    assert {m["home_store"] for m in listed} == {store}
    assert client.get(f"/v1/members/{mine}", headers=scoped).status_code == 200
    assert client.get(f"/v1/members/{theirs}", headers=scoped).status_code == 404
    assert client.get(f"/v1/members/{theirs}/profile", headers=scoped).status_code == 404
    assert (
        client.patch(f"/v1/members/{theirs}", json={"name": "x"}, headers=scoped).status_code == 404
    )
    # A sign-up at the till defaults to the till's store and cannot claim another.
    new = client.post("/v1/members", json={"external_id": unique("M")}, headers=scoped)
    assert new.status_code == 201 and new.json["home_store"] == store
    moved = client.post(
        "/v1/members", json={"external_id": unique("M"), "home_store": other}, headers=scoped
    )
    assert moved.status_code == 422 and "home_store" in moved.json["errors"]
    # An existing member of another store cannot be taken over by upsert either.
    hijack = client.put(f"/v1/members/{theirs}", json={"name": "x"}, headers=scoped)
    assert hijack.status_code in (404, 422)
    assert client.get(f"/v1/members/{theirs}", headers=admin).json["name"] is None
    assert (
        client.post(
            "/v1/events/purchases", json=purchase_payload(theirs, other), headers=scoped
        ).status_code
        == 422
    )
