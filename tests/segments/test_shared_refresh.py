"""The shared refresh (one scan for many segments) agrees with refreshing each on its own."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session

from segments import custom
from segments.models_custom import CustomSegment, SegmentMembershipChange
from service.models import MemberStats
from service.vocabulary import default_vocabulary
from tests.segments.test_custom_segments import T0, add_member, dynamic, members_of


@pytest.fixture
def tag() -> str:
    return "t" + uuid.uuid4().hex[:10]


RULES = [
    "net_spend > {n}",
    "purchase_count >= {k}",
    "days_since_last_purchase <= {d}",
    "net_spend <= {n} or purchase_count >= {k}",
    "not (days_since_last_purchase > {d}) and net_spend >= {n}",
    "purchase_count = 0",
    "last_purchase_at within last {d} days",
]

member_st = st.tuples(
    st.sampled_from([None, "0", "50", "300", "800", "2500"]),  # net spend (None: no stats)
    st.integers(1, 12),  # purchase count
    st.integers(0, 400),  # days since the last purchase
)


def _set_stats(session: Session, member_id: int, spend: str, count: int, days: int) -> None:
    values = {
        "purchase_count": count,
        "purchase_amount": Decimal(spend),
        "net_spend": Decimal(spend),
        "first_purchase_at": T0 - timedelta(days=days + 30),
        "last_purchase_at": T0 - timedelta(days=days, hours=1),
    }
    row = session.get(MemberStats, member_id)
    if row is None:
        session.add(MemberStats(member_id=member_id, **values))
    else:
        for k, v in values.items():
            setattr(row, k, v)
    session.flush()


def _changes(session: Session, segment_id: int) -> list[tuple[int, str]]:
    rows = session.execute(
        select(SegmentMembershipChange.member_id, SegmentMembershipChange.kind)
        .where(SegmentMembershipChange.segment_id == segment_id)
        .order_by(SegmentMembershipChange.member_id, SegmentMembershipChange.id)
    )
    return [(r[0], r[1]) for r in rows]


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    before=st.lists(member_st, min_size=1, max_size=8),
    after=st.lists(member_st, min_size=8, max_size=8),
    n=st.sampled_from([0, 100, 500, 2000]),
    k=st.integers(1, 6),
    d=st.sampled_from([0, 7, 30, 90, 365]),
)
def test_shared_refresh_agrees_with_one_by_one(
    session: Session,
    before: list[tuple[str | None, int, int]],
    after: list[tuple[str | None, int, int]],
    n: int,
    k: int,
    d: int,
) -> None:
    tag = "h" + uuid.uuid4().hex[:10]
    members = [add_member(session, tag) for _ in before]
    for m, (spend, count, days) in zip(members, before, strict=True):
        if spend is not None:
            _set_stats(session, m, spend, count, days)
    rules = [r.format(n=n, k=k, d=d) for r in RULES]
    shared = [dynamic(session, tag, r) for r in rules]
    alone = [dynamic(session, tag, r) for r in rules]
    vocab = default_vocabulary()
    for step, at in enumerate((T0, T0 + timedelta(days=1))):
        if step:
            for m, (spend, count, days) in zip(members, after, strict=False):
                if spend is not None:
                    _set_stats(session, m, spend, count, days)
        results, later = custom.refresh_many(session, shared, at, vocab)
        assert later == []
        for a in alone:
            custom.refresh_segment(session, a, at, vocab)
        by_id = {r.segment_id: r for r in results}
        for s, a, rule in zip(shared, alone, rules, strict=True):
            assert members_of(session, s) == members_of(session, a), rule
            assert _changes(session, s) == _changes(session, a), rule
            assert by_id[s].members == len(members_of(session, s))


def test_segment_rules_follow_the_shared_pass_and_reruns_are_no_ops(
    session: Session, tag: str
) -> None:
    rich = add_member(session, tag, "900")
    add_member(session, tag, "100")
    big = dynamic(session, tag, "net_spend > 500")
    big_name = session.scalar(select(CustomSegment.name).where(CustomSegment.id == big))
    # Reads another segment's membership: refreshed after the shared pass wrote it.
    outside = dynamic(session, tag, f'segment not in ("{big_name}")')
    vocab = default_vocabulary()

    results, later = custom.refresh_many(session, [big, outside], T0, vocab)
    assert later == [outside] and [r.segment_id for r in results] == [big]

    done = {r.segment_id: r for r in custom.refresh_all(session, T0, vocab)}
    assert done[big].replayed and (done[big].entered, done[big].members) == (1, 1)
    assert members_of(session, big) == {rich}
    assert rich not in members_of(session, outside) and len(members_of(session, outside)) == 1
    assert _changes(session, big) == [(rich, "entered")]

    # Again for the same instant: nothing written; for an older one: skipped.
    again, _ = custom.refresh_many(session, [big], T0, vocab)
    assert again[0].replayed and _changes(session, big) == [(rich, "entered")]
    older, _ = custom.refresh_many(session, [big], T0 - timedelta(days=1), vocab)
    assert older[0].skipped == "a later refresh exists"

    # An archived segment is left alone by the shared pass.
    custom.archive_segment(session, big, at=T0 + timedelta(hours=1), actor="test")
    results, _ = custom.refresh_many(session, [big], T0 + timedelta(days=1), vocab)
    assert results == [] and members_of(session, big) == set()
