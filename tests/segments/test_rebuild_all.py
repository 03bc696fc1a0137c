"""The one-pass full rebuild equals the importer's lifetime rebuild plus the window rebuild."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.orm import Session

from segments import stats
from service.importer import rebuild_member_stats
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
            # A stale row for a member without transactions: both rebuilds remove it.
            session.execute(
                text("INSERT INTO member_stats (member_id, purchase_count) VALUES (:m, 3)"),
                {"m": members[3]},
            )
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
