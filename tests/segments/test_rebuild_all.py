"""The full rebuild equals the importer's plus the window rebuild, split or in one statement."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from segments import stats
from service.importer import rebuild_member_stats
from service.stores import upsert_store
from tests.segments.conftest import TZ, add_member, add_purchase, add_refund
from tests.segments.test_stats import START, local

COLUMNS = (
    "first_purchase_at, last_purchase_at, purchase_count, purchase_amount, refund_count,"
    " refund_amount, net_spend, purchases_30d, purchases_90d, purchases_365d, spend_30d,"
    " spend_90d, spend_365d, purchase_days, median_interpurchase_days"
)


def everything(session: Session, ids: list[int]) -> dict[int, tuple[Any, ...]]:
    rows = session.execute(
        text(f"SELECT member_id, {COLUMNS} FROM member_stats WHERE member_id = ANY(:ids)"),
        {"ids": ids},
    ).all()
    return {r[0]: tuple(r[1:]) for r in rows}


purchases = st.lists(
    st.tuples(
        st.integers(0, 3),  # member
        st.integers(0, 500),  # days before START
        st.sampled_from((0, 7, 15, 23)),  # local hour: several on one day, late at night
        st.decimals(min_value=Decimal("0"), max_value=Decimal("300"), places=2),
        st.one_of(st.none(), st.decimals(min_value=Decimal("0.01"), max_value=1, places=2)),
    ),
    max_size=14,
)


def record(
    session: Session, shop: int, bought: list[tuple[int, int, int, Decimal, Any]]
) -> list[int]:
    """Four members with the purchases (and partial refunds) drawn; returns their ids."""
    members = [add_member(session, shop) for _ in range(4)]
    for who, back, hour, amount, refund_share in bought:
        when = local(START - timedelta(days=back), hour)
        tx = add_purchase(session, members[who], shop, when, amount)
        if refund_share is not None and amount > 0:
            part = min(
                amount, max(Decimal("0.01"), (amount * refund_share).quantize(Decimal("0.01")))
            )
            add_refund(session, tx, when + timedelta(minutes=30), part)
    if not any(b[0] == 3 for b in bought):
        # A stale row for a member without transactions: every rebuild removes it.
        session.execute(
            text("INSERT INTO member_stats (member_id, purchase_count) VALUES (:m, 3)"),
            {"m": members[3]},
        )
    return members


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(bought=purchases)
def test_one_pass_rebuild_equals_the_importers_and_the_window_rebuild(
    session: Session, shop: int, isolated: None, bought: list[tuple[int, int, int, Decimal, Any]]
) -> None:
    savepoint = session.begin_nested()
    try:
        members = record(session, shop, bought)
        rebuild_member_stats(session, members)
        stats.rebuild_windows(session, START, members, timezone=TZ)
        expected = everything(session, members)
        session.execute(
            text(
                "UPDATE member_stats SET purchase_count = 0, net_spend = 1, spend_90d = 7,"
                " purchase_days = 0, median_interpurchase_days = 99 WHERE member_id = ANY(:ids)"
            ),
            {"ids": members},
        )
        stats.rebuild_all_stats(session, START, timezone=TZ)
        assert everything(session, members) == expected
        # Nothing left to change: a second rebuild writes no row.
        assert stats.rebuild_all_stats(session, START, timezone=TZ) == 0
    finally:
        savepoint.rollback()


# --- the split rebuild: parts computed by connections of their own ----------------------------
#
# Those connections read what is committed (an exported snapshot), so these tests commit
# their members and transactions and delete them afterwards; the rebuilds are rolled back.


def scratch_tables(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(
            conn.scalars(
                text("SELECT relname FROM pg_class WHERE starts_with(relname, :prefix)"),
                {"prefix": stats.SCRATCH_PREFIX},
            )
        )


@contextmanager
def committed(
    engine: Engine, bought: list[tuple[int, int, int, Decimal, Any]]
) -> Iterator[list[int]]:
    """Four members and their history, committed; deleted again (with any scratch tables)."""
    stats._drop_tables(engine, scratch_tables(engine))
    code = "SPLIT-" + uuid.uuid4().hex[:8]
    with Session(engine) as s, s.begin():
        upsert_store(s, code, "Split store", "SEG-East", actor="test")
        shop = int(s.scalar(text("SELECT id FROM stores WHERE code = :c"), {"c": code}))
        members = record(s, shop, bought)
    try:
        yield members
    finally:
        with Session(engine) as s, s.begin():
            s.execute(text("DELETE FROM transactions WHERE member_id = ANY(:m)"), {"m": members})
            s.execute(text("DELETE FROM members WHERE id = ANY(:m)"), {"m": members})
            s.execute(text("DELETE FROM stores WHERE id = :s"), {"s": shop})
        stats._drop_tables(engine, scratch_tables(engine))


def cut_between(members: list[int]) -> Callable[[Any, int], Any]:
    """Part boundaries between the members, so that every part holds some of them."""
    return lambda bind, parts: [(None, members[1]), (members[1], members[3]), (members[3], None)]


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(bought=purchases)
def test_split_rebuild_equals_the_one_statement_rebuild(
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    bought: list[tuple[int, int, int, Decimal, Any]],
) -> None:
    with committed(engine, bought) as members:
        monkeypatch.setattr(stats, "_ranges", cut_between(members))
        computed: list[str] = []
        compute = stats._compute_part

        def counted(*args: Any) -> None:
            computed.append(args[2])
            compute(*args)

        monkeypatch.setattr(stats, "_compute_part", counted)
        results = {}
        for parts in (1, 3):
            with Session(engine) as s, s.begin():
                zone = s.scalar(text("SHOW TimeZone"))
                written = stats.rebuild_all_stats(s, START, timezone=TZ, parts=parts)
                results[parts] = (written, everything(s, members))
                assert s.scalar(text("SHOW TimeZone")) == zone
                # This transaction dropped the part tables.
                assert not s.scalar(
                    text("SELECT count(*) FROM pg_class WHERE starts_with(relname, :prefix)"),
                    {"prefix": stats.SCRATCH_PREFIX},
                )
                s.rollback()
        assert len(computed) == 3
        assert results[3] == results[1]


def test_a_failed_part_fails_the_rebuild_and_leaves_no_table(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    with committed(
        engine, [(0, 3, 7, Decimal("10.00"), None), (2, 40, 23, Decimal("5"), None)]
    ) as members:
        monkeypatch.setattr(stats, "_ranges", cut_between(members))
        compute = stats._compute_part

        def failing(*args: Any) -> None:
            compute(*args)  # its table is committed
            if args[2].endswith("_2"):
                raise RuntimeError("part failed")

        monkeypatch.setattr(stats, "_compute_part", failing)
        with Session(engine) as s, s.begin():
            with pytest.raises(RuntimeError, match="part failed"):
                stats.rebuild_all_stats(s, START, timezone=TZ, parts=3)
            assert s.scalar(text("SELECT 1")) == 1  # the transaction is still usable
            s.rollback()
        assert scratch_tables(engine) == set()


def test_a_failed_write_releases_and_drops_the_part_tables(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    with committed(engine, [(1, 0, 12, Decimal("10.00"), None)]):
        # Fails in this transaction after the part tables were read (locked) by it.
        monkeypatch.setattr(
            stats, "_WRITE", "SELECT CAST(r.member_id / 0 AS int) FROM {rows} r {agg}"
        )
        with Session(engine) as s, s.begin():
            with pytest.raises(DBAPIError, match="division by zero"):
                stats.rebuild_all_stats(s, START, timezone=TZ, parts=2)
            assert s.scalar(text("SELECT 1")) == 1
            s.rollback()
        assert scratch_tables(engine) == set()


def test_tables_left_by_a_rolled_back_rebuild_are_dropped_by_the_next(engine: Engine) -> None:
    with committed(engine, [(0, 1, 12, Decimal("10.00"), None)]):
        with Session(engine) as s, s.begin():
            stats.rebuild_all_stats(s, START, timezone=TZ, parts=2)
            s.rollback()  # undoes the DROP of its tables
        left = scratch_tables(engine)
        assert len(left) == 2
        with Session(engine) as s, s.begin():
            stats.rebuild_all_stats(s, START, timezone=TZ, parts=2)
            s.rollback()
        assert not left & scratch_tables(engine)


def test_a_transaction_that_wrote_or_is_in_a_savepoint_rebuilds_in_one_statement(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any) -> int:
        raise AssertionError("split although other connections cannot see the same data")

    monkeypatch.setattr(stats, "_rebuild_in_parts", refuse)
    with Session(engine) as s, s.begin():
        s.execute(text("CREATE TEMP TABLE wrote_something (i int)"))
        stats.rebuild_all_stats(s, START, timezone=TZ, parts=2)
        s.rollback()
    with Session(engine) as s, s.begin():
        s.begin_nested()
        stats.rebuild_all_stats(s, START, timezone=TZ, parts=2)
        s.rollback()


def test_part_ranges_cover_every_member_id_once(session: Session) -> None:
    for parts in (2, 3, 5):
        ranges = stats._ranges(session, parts)
        assert ranges[0][0] is None and ranges[-1][1] is None
        assert all(a[1] == b[0] and a[1] is not None for a, b in itertools.pairwise(ranges))
        assert all(lo is None or hi is None or lo < hi for lo, hi in ranges)
