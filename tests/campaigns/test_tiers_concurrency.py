"""Tiers with real commits: concurrent clients on a threaded server, and the CLI review."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from threading import Barrier
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from campaigns import tiers
from campaigns.models_tiers import TierChange
from service.auth import create_key
from service.cli import main
from service.config import Config
from service.members import upsert_member
from service.models import Member
from service.stores import upsert_store
from tests.conftest import LiveServer, purchase_payload, unique

RANK = {None: 0, "silver": 1, "gold": 2, "diamond": 3}


def seed(committed: Any) -> tuple[str, str, str]:
    store, member = unique("S"), unique("M")

    def run(s: Session) -> str:
        upsert_store(s, store, "Live", "East", actor="test")
        s.flush()
        upsert_member(s, member, {}, actor="test")
        return create_key(s, "pos", "live-pos")

    return store, member, committed(run)


def purchase(url: str, key: str, member: str, store: str, amount: str) -> requests.Response:
    body = purchase_payload(
        member,
        store,
        amount=amount,
        occurred_at=(datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
    )
    del body["items"]
    return requests.post(
        f"{url}/v1/events/purchases",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def changes(engine: Engine, member: str) -> list[tuple[Any, ...]]:
    with Session(engine) as s:
        member_id = s.scalar(select(Member.id).where(Member.external_id == member))
        rows = s.execute(
            select(TierChange.from_tier, TierChange.to_tier, TierChange.reason)
            .where(TierChange.member_id == member_id)
            .order_by(TierChange.id)
        ).all()
    return [tuple(r) for r in rows]


def test_two_concurrent_purchases_crossing_the_threshold_upgrade_once(
    live_server: LiveServer, committed: Any, engine: Engine
):
    for _ in range(5):
        store, member, key = seed(committed)
        first = purchase(live_server.url, key, member, store, "1500.00")
        assert first.status_code == 201
        assert first.json()["rewards"]["tier_change"] is None
        barrier = Barrier(2)

        def buy(
            _: int,
            member: str = member,
            store: str = store,
            key: str = key,
            gate: Barrier = barrier,
        ):
            gate.wait()
            return purchase(live_server.url, key, member, store, "600.00")

        with ThreadPoolExecutor(2) as pool:
            responses = list(pool.map(buy, range(2)))
        assert [r.status_code for r in responses] == [201, 201]
        told = [r.json()["rewards"]["tier_change"] for r in responses]
        assert sum(t is not None for t in told) == 1, told
        assert changes(engine, member) == [(None, "silver", "purchase")]


def test_purchases_racing_campaign_upgrades_keep_one_consistent_history(
    live_server: LiveServer, committed: Any, engine: Engine
):
    store, member, key = seed(committed)
    assert purchase(live_server.url, key, member, store, "1500.00").status_code == 201
    with Session(engine) as s:
        member_id = s.scalar(select(Member.id).where(Member.external_id == member))
    assert member_id is not None
    barrier = Barrier(9)

    def buy(_: int) -> Any:
        barrier.wait()
        return purchase(live_server.url, key, member, store, "600.00").status_code

    def campaign(_: int) -> Any:
        barrier.wait()
        with Session(engine) as s, s.begin():
            return tiers.upgrade_tier(
                s, member_id, "gold", reason="campaign", actor="campaign:1", campaign_id=1
            )

    with ThreadPoolExecutor(9) as pool:
        bought = [pool.submit(buy, i) for i in range(6)]
        upgraded = [pool.submit(campaign, i) for i in range(3)]
        assert [f.result() for f in bought] == [201] * 6
        campaign_results = [f.result() for f in upgraded]
    assert sum(r is not None for r in campaign_results) == 1
    history = changes(engine, member)
    # Every change starts where the previous one ended and only ever goes up.
    previous = None
    for from_tier, to_tier, _ in history:
        assert from_tier == previous, history
        assert RANK[to_tier] > RANK[from_tier], history
        previous = to_tier
    assert previous == "gold"
    assert [h[1] for h in history].count("gold") == 1
    with Session(engine) as s:
        assert s.scalar(select(Member.tier).where(Member.id == member_id)) == "gold"


def test_cli_review_runs_the_review_for_a_date(
    committed: Any, engine: Engine, config: Config, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("DATABASE_URL", config.database_url or "")
    monkeypatch.setenv("REDIS_URL", config.redis_url or "")
    member = unique("M")

    def run(s: Session) -> None:
        upsert_member(s, member, {}, actor="test")
        s.execute(
            text(
                "WITH m AS (UPDATE members SET tier = 'gold' WHERE external_id = :e RETURNING id)"
                " INSERT INTO member_tiers (member_id, tier_since, review_on)"
                " SELECT id, now(), DATE '2026-12-01' FROM m"
            ),
            {"e": member},
        )

    committed(run)
    early = CliRunner().invoke(main, ["tiers", "review", "--as-of", "2026-11-30"])
    assert early.exit_code == 0, early.output
    with Session(engine) as s:
        assert s.scalar(select(Member.tier).where(Member.external_id == member)) == "gold"
    result = CliRunner().invoke(main, ["tiers", "review", "--as-of", "2026-12-01"])
    assert result.exit_code == 0, result.output
    assert "tier review as of 2026-12-01" in result.output
    assert "downgraded=" in result.output
    with Session(engine) as s:
        assert s.scalar(select(Member.tier).where(Member.external_id == member)) == "silver"
