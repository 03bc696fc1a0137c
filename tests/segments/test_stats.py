"""Rolling windows: purchases, refunds and daily ageing give what a rebuild gives."""

from __future__ import annotations

import itertools
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.orm import Session

from segments import stats
from tests.segments.conftest import (
    TZ,
    WINDOW_COLUMNS,
    add_member,
    add_purchase,
    add_refund,
    windows_of,
)

ZONE = ZoneInfo(TZ)
START = date(2025, 12, 20)


def local(day: date, hour: int = 12, minute: int = 0) -> datetime:
    return datetime.combine(day, time(hour, minute), tzinfo=ZONE)


def expected_windows(
    purchases: list[tuple[int, datetime, Decimal, Decimal]], as_of: date
) -> dict[int, tuple[object, ...]]:
    """(member, occurred_at, amount, refunded) -> the window columns, computed in Python."""
    out: dict[int, list[object]] = {}
    for member, when, amount, refunded in purchases:
        row = out.setdefault(member, [0, 0, 0, Decimal(0), Decimal(0), Decimal(0), 0, Decimal(0)])
        day = when.astimezone(ZONE).date()
        for i, n in enumerate((30, 90, 365)):
            if day >= as_of - timedelta(days=n - 1):
                row[i] += 1  # type: ignore[operator]
                row[3 + i] += amount - refunded  # type: ignore[operator]
        row[6] += 1  # type: ignore[operator]
        row[7] += amount - refunded  # type: ignore[operator]
    return {m: tuple(v) for m, v in out.items()}


events = st.lists(
    st.tuples(
        st.integers(0, 2),  # member
        st.one_of(st.just(0), st.integers(-400, 0)),  # days before the current date
        st.integers(0, 23),
        st.sampled_from((0, 1, 59)),
        st.decimals(min_value=Decimal("0"), max_value=Decimal("500"), places=2),
        st.one_of(st.none(), st.decimals(min_value=Decimal("0.01"), max_value=1, places=2)),
    ),
    max_size=5,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    steps=st.lists(st.tuples(st.integers(0, 120), events), min_size=1, max_size=5),
)
def test_incremental_windows_equal_a_rebuild(
    session: Session, shop: int, isolated: None, steps: list[tuple[int, list]]
) -> None:
    savepoint = session.begin_nested()
    try:
        members = [add_member(session, shop) for _ in range(3)]
        stats.rebuild_windows(session, START, timezone=TZ)
        day = START
        bought: list[list[object]] = []
        for jump, happenings in steps:
            day += timedelta(days=jump)
            stats.age_windows(session, day, TZ)
            for who, back, hour, minute, amount, refund_share in happenings:
                when = local(day + timedelta(days=back), hour, minute)
                tx = add_purchase(session, members[who], shop, when, amount)
                record: list[object] = [members[who], when, amount, Decimal(0)]
                bought.append(record)
                if refund_share is not None and amount > 0:
                    part = max(Decimal("0.01"), (amount * refund_share).quantize(Decimal("0.01")))
                    part = min(part, amount)
                    add_refund(session, tx, when + timedelta(hours=1), part)
                    record[3] = part
        expected = expected_windows([tuple(b) for b in bought], day)  # type: ignore[misc]
        assert windows_of(session, members) == expected
        # The rebuild from transactions finds nothing to change.
        assert stats.rebuild_windows(session, day, timezone=TZ) == 0
        assert windows_of(session, members) == expected
    finally:
        savepoint.rollback()


def test_a_purchase_leaves_each_window_on_its_day(
    session: Session, shop: int, isolated: None
) -> None:
    member = add_member(session, shop)
    stats.rebuild_windows(session, START, timezone=TZ)
    # 23:59 local on START is still START in Shanghai (15:59 UTC).
    add_purchase(session, member, shop, local(START, 23, 59), "10.00")
    seen = []
    for offset in (0, 29, 30, 89, 90, 364, 365):
        stats.age_windows(session, START + timedelta(days=offset), TZ)
        seen.append(windows_of(session, [member])[member][:3])
    assert seen == [
        (1, 1, 1),
        (1, 1, 1),
        (0, 1, 1),
        (0, 1, 1),
        (0, 0, 1),
        (0, 0, 1),
        (0, 0, 0),
    ]
    # Ageing the same date again is a no-op; going back rebuilds.
    assert stats.age_windows(session, START + timedelta(days=365), TZ)["mode"] == "unchanged"
    assert stats.age_windows(session, START + timedelta(days=10), TZ)["mode"] == "rebuilt"
    assert windows_of(session, [member])[member][:3] == (1, 1, 1)


def test_local_midnight_decides_the_day(session: Session, shop: int, isolated: None) -> None:
    member = add_member(session, shop)
    as_of = date(2026, 3, 31)
    stats.rebuild_windows(session, as_of, timezone=TZ)
    first_day = as_of - timedelta(days=29)
    # 00:00 local of the first day counts; a microsecond before does not.
    add_purchase(session, member, shop, local(first_day, 0, 0), "5.00")
    add_purchase(session, member, shop, local(first_day, 0, 0) - timedelta(microseconds=1), "7.00")
    row = windows_of(session, [member])[member]
    assert row[0] == 1 and row[3] == Decimal("5.00")
    assert row[1] == 2 and row[4] == Decimal("12.00")
    assert stats.rebuild_windows(session, as_of, timezone=TZ) == 0


def test_partial_rebuild_must_use_the_stored_date(
    session: Session, shop: int, isolated: None
) -> None:
    member = add_member(session, shop)
    stats.rebuild_windows(session, START, timezone=TZ)
    add_purchase(session, member, shop, local(START), "3.00")
    session.execute(
        text("UPDATE member_stats SET purchases_30d = 0, spend_30d = 0 WHERE member_id = :m"),
        {"m": member},
    )
    assert stats.rebuild_windows(session, member_ids=[member]) == 1
    assert windows_of(session, [member])[member][0] == 1
    with pytest.raises(ValueError, match="partial rebuild"):
        stats.rebuild_windows(session, START + timedelta(days=1), member_ids=[member])


def test_history_of_changed_members_matches_a_rebuild(
    session: Session, shop: int, isolated: None
) -> None:
    member, other = add_member(session, shop), add_member(session, shop)
    stats.rebuild_windows(session, START, timezone=TZ)
    since = session.scalar(text("SELECT now()"))
    for offset in (0, 0, 3, 10, 30):  # purchase days 0, 3, 10, 30 -> gaps 3, 7, 20
        add_purchase(session, member, shop, local(START - timedelta(days=40 - offset)), "1")
    add_purchase(session, other, shop, local(START), "1")
    assert stats.refresh_history(session, since, TZ) == 2
    rows = dict(
        session.execute(
            text(
                "SELECT member_id, (purchase_days, median_interpurchase_days)::text"
                " FROM member_stats WHERE member_id IN (:a, :b)"
            ),
            {"a": member, "b": other},
        ).all()
    )
    assert rows == {member: "(4,7.0)", other: "(1,)"}
    assert stats.rebuild_windows(session, START, timezone=TZ) == 0
    # Nothing left to re-summarise.
    assert stats.refresh_history(session, since, TZ) == 0


def test_rebuild_all_stats_restores_everything(session: Session, shop: int, isolated: None) -> None:
    member = add_member(session, shop)
    stats.rebuild_windows(session, START, timezone=TZ)
    tx = add_purchase(session, member, shop, local(START), "80.00")
    add_refund(session, tx, local(START, 14), "30.00")
    before = windows_of(session, [member])
    session.execute(
        text(
            f"UPDATE member_stats SET {', '.join(f'{c} = 0' for c in WINDOW_COLUMNS)}"
            " WHERE member_id = :m"
        ),
        {"m": member},
    )
    stats.rebuild_all_stats(session, START, timezone=TZ)
    assert windows_of(session, [member]) == before
    assert before[member][3] == Decimal("50.00")


def python_history(days: list[date]) -> tuple[list[date], int, Decimal | None]:
    """Sorted distinct days, their number and the median gap, computed here in Python."""
    distinct = sorted(set(days))
    gaps = sorted((b - a).days for a, b in itertools.pairwise(distinct))
    if not gaps:
        return distinct, len(distinct), None
    mid = len(gaps) // 2
    median = Decimal(gaps[mid]) if len(gaps) % 2 else Decimal(gaps[mid - 1] + gaps[mid]) / 2
    return distinct, len(distinct), median.quantize(Decimal("0.1"))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    purchases=st.lists(
        st.tuples(st.integers(0, 2), st.integers(-500, 0), st.sampled_from((0, 12, 23))),
        min_size=1,
        max_size=12,
    ),
    unknown=st.sets(st.integers(0, 2)),
)
def test_history_from_stored_days_equals_history_from_transactions(
    session: Session,
    shop: int,
    isolated: None,
    purchases: list[tuple[int, int, int]],
    unknown: set[int],
) -> None:
    """Purchases in any order (back-dated, same day, around local midnight) keep the sorted
    days the purchase path stores; the refresh's summaries from them equal Python's and a
    rebuild from the transactions. Members whose days are unknown (NULL) are read from
    their transactions and get their days stored."""
    with session.begin_nested() as savepoint:
        members = [add_member(session, shop) for _ in range(3)]
        stats.rebuild_windows(session, START, timezone=TZ)
        since = session.scalar(text("SELECT now()"))
        days: dict[int, list[date]] = {}
        for who, offset, hour in purchases:
            when = local(START + timedelta(days=offset), hour)
            add_purchase(session, members[who], shop, when, "1")
            days.setdefault(members[who], []).append(when.date())
        session.execute(
            text("UPDATE member_stats SET purchase_dates = NULL WHERE member_id = ANY(:ids)"),
            {"ids": [members[i] for i in unknown]},
        )
        stats.refresh_history(session, since, TZ)
        query = text(
            "SELECT member_id, purchase_dates, purchase_days, median_interpurchase_days"
            " FROM member_stats WHERE member_id = ANY(:ids)"
        )
        got = {r[0]: tuple(r[1:]) for r in session.execute(query, {"ids": members})}
        assert got == {m: python_history(d) for m, d in days.items()}
        # The one-pass rebuild from the transactions finds the same history.
        state = stats.current_state(session)
        assert state is not None
        params: dict[str, object] = {"tz": TZ, **{f"s{n}": state.starts[n] for n in stats.WINDOWS}}
        stats._rebuild_all(session, params)
        assert {r[0]: tuple(r[1:]) for r in session.execute(query, {"ids": members})} == got
        savepoint.rollback()
