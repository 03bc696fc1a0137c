"""Fixtures for the rule language tests: the vocabulary, stores, and member factories."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from rules import Vocabulary
from service.models import Member, MemberStats, Store
from service.stores import upsert_store
from service.vocabulary import default_vocabulary

STORES = {"S-A": "East", "S-B": "North", "S-C": "East"}


@pytest.fixture(scope="session")
def vocab() -> Vocabulary:
    return default_vocabulary()


@pytest.fixture
def stores(session: Session) -> dict[str, int]:
    """Stores S-A, S-B, S-C in regions East / North; returns code -> id."""
    for code, region in STORES.items():
        upsert_store(session, code, f"Store {code}", region, actor="test")
    session.flush()
    rows = session.execute(select(Store.code, Store.id).where(Store.code.in_(STORES)))
    return {code: sid for code, sid in rows}


AddMembers = Callable[..., int]


def add_members(session: Session, stores: dict[str, int], specs: list[dict[str, Any]]) -> list[int]:
    """Insert members (and member_stats rows) from `{"member": {...}, "stats": {...}|None}`."""
    ids: list[int] = []
    for spec in specs:
        values = dict(spec["member"])
        code = values.pop("home_store", None)
        values["home_store_id"] = stores[code] if code is not None else None
        values.setdefault("external_id", "R-" + uuid.uuid4().hex[:16])
        member_id = session.execute(
            insert(Member).values(**values).returning(Member.id)
        ).scalar_one()
        if spec.get("stats") is not None:
            session.execute(insert(MemberStats).values(member_id=member_id, **spec["stats"]))
        ids.append(member_id)
    session.flush()
    return ids


@pytest.fixture
def member_factory(session: Session, stores: dict[str, int]) -> AddMembers:
    def make(**fields: Any) -> int:
        stats = fields.pop("stats", None)
        return add_members(session, stores, [{"member": fields, "stats": stats}])[0]

    return make
