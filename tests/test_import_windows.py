"""Imported statistics equal a rebuild: lifetime figures, rolling windows, purchase days.

The importer computes windows and purchase days of members new to statistics inside
its merge statement and rebuilds only members that had statistics before; both must
give what segments.stats computes from the stored transactions.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, text

from segments.stats import rebuild_windows
from service.importer import rebuild_member_stats, run_import
from tests.test_import import World, tx

COLUMNS = (
    "member_id, first_purchase_at, last_purchase_at, purchase_count, purchase_amount,"
    " refund_count, refund_amount, net_spend, purchases_30d, purchases_90d, purchases_365d,"
    " spend_30d, spend_90d, spend_365d, purchase_days, median_interpurchase_days"
)
NOW = datetime.now(UTC).replace(microsecond=0)
# Offsets far apart, so that one instant falls on different local days.
OFFSETS = ("+08:00", "-05:00", "+00:00")

purchase = st.tuples(
    st.integers(0, 1),  # member
    st.integers(0, 400 * 24),  # hours ago: inside and outside every window
    st.integers(0, 30_000),  # amount in cents (zero is a valid purchase)
    st.sampled_from(OFFSETS),
)
refund = st.tuples(st.integers(0, 50), st.integers(1, 30_000))  # (purchase index, cents)


@pytest.fixture
def world(connection: Connection, tmp_path: Path) -> World:
    return World(connection, tmp_path)


def _when(hours_ago: int, offset: str) -> str:
    moment = NOW - timedelta(hours=hours_ago)
    sign = 1 if offset[0] == "+" else -1
    shift = timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])) * sign
    return (moment + shift).replace(tzinfo=None).isoformat() + offset


def _rows(world: World, tag: str, purchases: list[Any], refunds: list[Any]) -> list[list[str]]:
    rows = []
    for i, (member, hours, cents, offset) in enumerate(purchases):
        rows.append(
            tx(
                world.tid(f"{tag}P{i}"),
                world.members[member],
                world.stores[0],
                f"{cents / 100:.2f}",
                occurred=_when(hours, offset),
            )
        )
    for j, (target, cents) in enumerate(refunds):
        if not purchases:
            break
        index = target % len(purchases)
        member, hours, _, offset = purchases[index]
        rows.append(
            tx(
                world.tid(f"{tag}R{j}"),
                world.members[member],
                world.stores[0],
                f"{cents / 100:.2f}",
                kind="refund",
                original=world.tid(f"{tag}P{index}"),
                occurred=_when(max(hours - 1, 0), offset),
            )
        )
    return rows


def _stats(conn: Connection, ids: list[int]) -> list[tuple[Any, ...]]:
    return [
        tuple(r)
        for r in conn.execute(
            text(
                f"SELECT {COLUMNS} FROM member_stats WHERE member_id = ANY(:ids) ORDER BY member_id"
            ),
            {"ids": ids},
        )
    ]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    before=st.lists(purchase, max_size=6),
    before_refunds=st.lists(refund, max_size=2),
    now=st.lists(purchase, min_size=1, max_size=12),
    now_refunds=st.lists(refund, max_size=4),
)
def test_import_statistics_equal_a_rebuild_for_new_and_known_members(
    connection: Connection,
    tmp_path: Path,
    before: list[Any],
    before_refunds: list[Any],
    now: list[Any],
    now_refunds: list[Any],
) -> None:
    with connection.begin_nested() as example:
        world = World(connection, tmp_path)
        if before:
            # Member 0 (and perhaps 1) already have transactions and statistics.
            first = _rows(world, "A", before, before_refunds)
            run_import(connection, "transactions", world.transactions("a.csv", first))
        # The second file mixes purchases of known members, new members and refunds of
        # this file's purchases (some of them too large, hence rejected).
        report = run_import(
            connection,
            "transactions",
            world.transactions("b.csv", _rows(world, "B", now, now_refunds)),
        )
        assert report.inserted >= 1
        ids = list(
            connection.execute(
                text("SELECT id FROM members WHERE external_id = ANY(:m)"),
                {"m": world.members[:2]},
            ).scalars()
        )
        imported = _stats(connection, ids)
        rebuild_member_stats(connection, ids)
        rebuild_windows(connection, member_ids=ids)
        assert imported == _stats(connection, ids)
        example.rollback()


def test_members_with_earlier_statistics_are_rebuilt_not_overwritten(world: World):
    # A member whose purchases span two imports: purchase days and the median gap
    # need both files' purchases, which the merge statement alone does not see.
    m1 = world.members[0]
    s1 = world.stores[0]
    day = timedelta(days=1)
    first = [tx(world.tid("E1"), m1, s1, occurred=(NOW - 20 * day).isoformat())]
    second = [
        tx(world.tid("E2"), m1, s1, occurred=(NOW - 10 * day).isoformat()),
        tx(world.tid("E3"), m1, s1, occurred=(NOW - 4 * day).isoformat()),
    ]
    run_import(world.conn, "transactions", world.transactions("e1.csv", first))
    run_import(world.conn, "transactions", world.transactions("e2.csv", second))
    row = world.conn.execute(
        text(
            "SELECT purchase_count, purchases_30d, purchase_days, median_interpurchase_days"
            " FROM member_stats ms JOIN members m ON m.id = ms.member_id WHERE m.external_id = :m"
        ),
        {"m": m1},
    ).one()
    assert tuple(row) == (3, 3, 3, 8)  # gaps of 10 and 6 days
