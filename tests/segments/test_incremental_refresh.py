"""The incremental shared refresh gives the memberships and history a full one gives.

These tests commit: the incremental refresh tells changed member rows from unchanged ones
by the transaction that wrote them, which inside one test transaction would be the same
for every row (all "changed", the full comparison). Every row they create is tagged and
deleted at the end.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from rules import member_query, parse_rule
from segments import custom
from segments.models_custom import SegmentMembershipChange, SegmentRefresh
from service.models import MemberStats
from service.vocabulary import default_vocabulary
from tests.segments.test_custom_segments import T0, dynamic, members_of

# Rules whose outcome moves with the date, rules that do not, and one reading the stores
# table (compared in full every time).
RULES = [
    "days_since_last_purchase <= {d}",
    "last_purchase_at within last {d} days and net_spend > {n}",
    "net_spend > {n}",
    "purchase_count >= {k} or consent.sms = true",
    'region = "EAST-{tag}" or days_since_last_purchase > {d}',
]

member_st = st.tuples(
    st.sampled_from([None, "0", "50", "300", "800", "2500"]),  # net spend (None: no stats)
    st.integers(1, 12),  # purchase count
    st.integers(0, 120),  # days since the last purchase, before T0
    st.booleans(),  # sms consent
)
# What happens to a member between the two refreshes.
change_st = st.sampled_from(["none", "none", "none", "stats", "consent", "erase", "untag"])


def _delete(engine: Engine, tag: str) -> None:
    with Session(engine) as s, s.begin():
        segments = list(
            s.scalars(text("SELECT id FROM segments WHERE name LIKE :p"), {"p": f"{tag}-%"})
        )
        for table in (
            "segment_memberships",
            "segment_membership_changes",
            "segment_refreshes",
            "segment_versions",
        ):
            s.execute(text(f"DELETE FROM {table} WHERE segment_id = ANY(:ids)"), {"ids": segments})
        s.execute(text("DELETE FROM segments WHERE id = ANY(:ids)"), {"ids": segments})
        members = list(
            s.scalars(text("SELECT id FROM members WHERE external_id LIKE :p"), {"p": f"{tag}-%"})
        )
        s.execute(text("DELETE FROM member_stats WHERE member_id = ANY(:ids)"), {"ids": members})
        s.execute(text("DELETE FROM members WHERE id = ANY(:ids)"), {"ids": members})
        s.execute(text("DELETE FROM stores WHERE code LIKE :p"), {"p": f"{tag}-%"})
        s.execute(text("DELETE FROM regions WHERE code = :c"), {"c": f"EAST-{tag}"})


@pytest.fixture
def scratch(engine: Engine) -> Iterator[Callable[[], tuple[Callable[..., Any], str]]]:
    """A new tag per call (one per hypothesis example), and a committing runner."""
    tags: list[str] = []

    def run(fn: Callable[[Session], Any]) -> Any:
        with Session(engine) as s, s.begin():
            return fn(s)

    def new() -> tuple[Callable[..., Any], str]:
        tags.append("inc" + uuid.uuid4().hex[:10])
        return run, tags[-1]

    yield new
    for tag in tags:
        _delete(engine, tag)


def _stats(s: Session, member_id: int, spend: str, count: int, days: int) -> None:
    values = {
        "purchase_count": count,
        "purchase_amount": Decimal(spend),
        "net_spend": Decimal(spend),
        "first_purchase_at": T0 - timedelta(days=days + 30),
        "last_purchase_at": T0 - timedelta(days=days, hours=1),
    }
    row = s.get(MemberStats, member_id)
    if row is None:
        s.add(MemberStats(member_id=member_id, **values))
    else:
        for k, v in values.items():
            setattr(row, k, v)


def _expected(s: Session, segment_id: int, rule: str, tag: str, at: Any) -> set[int]:
    vocab = default_vocabulary()
    parsed = parse_rule(f'tags contains "{tag}" and ({rule})', vocab)
    return set(s.scalars(member_query(parsed, vocab, at)))


def _history(s: Session, segment_id: int) -> list[tuple[int, str]]:
    rows = s.execute(
        select(SegmentMembershipChange.member_id, SegmentMembershipChange.kind)
        .where(SegmentMembershipChange.segment_id == segment_id)
        .order_by(SegmentMembershipChange.id)
    )
    return [(r[0], r[1]) for r in rows]


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    members=st.lists(member_st, min_size=2, max_size=10),
    changes=st.lists(st.tuples(change_st, member_st), min_size=10, max_size=10),
    new_members=st.lists(member_st, max_size=2),
    n=st.sampled_from([0, 100, 500]),
    k=st.integers(1, 6),
    d=st.sampled_from([0, 3, 7, 30]),
    days=st.integers(1, 40),
)
def test_incremental_refresh_equals_a_full_one(
    scratch: Callable[[], tuple[Callable[..., Any], str]],
    members: list[tuple[str | None, int, int, bool]],
    changes: list[tuple[str, tuple[str | None, int, int, bool]]],
    new_members: list[tuple[str | None, int, int, bool]],
    n: int,
    k: int,
    d: int,
    days: int,
) -> None:
    run, tag = scratch()
    vocab = default_vocabulary()
    rules = [r.format(n=n, k=k, d=d, tag=tag) for r in RULES]

    def add(s: Session, spend: str | None, count: int, ago: int, sms: bool) -> int:
        member_id = int(
            s.scalar(
                text(
                    "INSERT INTO members (external_id, tags, consent_sms, home_store_id)"
                    " VALUES (:e, ARRAY[:t], :sms, (SELECT id FROM stores WHERE code = :store))"
                    " RETURNING id"
                ),
                {"e": f"{tag}-{uuid.uuid4().hex[:8]}", "t": tag, "sms": sms, "store": f"{tag}-S"},
            )
        )
        if spend is not None:
            _stats(s, member_id, spend, count, ago)
        return member_id

    def setup(s: Session) -> tuple[list[int], list[int]]:
        s.execute(
            text("INSERT INTO regions (code, name) VALUES (:c, 'East')"), {"c": f"EAST-{tag}"}
        )
        s.execute(
            text(
                "INSERT INTO stores (code, name, region_id)"
                " SELECT :s, 'Shop', id FROM regions WHERE code = :c"
            ),
            {"s": f"{tag}-S", "c": f"EAST-{tag}"},
        )
        # Beside the drawn members, unchanged ones on both sides of each date threshold,
        # so that the date alone moves some of them in or out.
        fixed = [("800", 3, ago, False) for ago in (0, d, d + 1, 20, 45)]
        ids = [add(s, *m) for m in members + fixed]
        segments = [dynamic(s, tag, r, name=f"{tag}-{i}") for i, r in enumerate(rules)]
        return ids, segments

    ids, segments = run(setup)
    t1 = T0 + timedelta(days=days)
    run(lambda s: custom.refresh_many(s, segments, T0, vocab))
    before = run(lambda s: {sid: members_of(s, sid) for sid in segments})

    def change(s: Session) -> None:
        for member_id, (what, (spend, count, ago, _sms)) in zip(ids, changes, strict=False):
            if what == "stats" and spend is not None:
                _stats(s, member_id, spend, count, max(ago - days, 0))
            elif what == "consent":
                s.execute(
                    text("UPDATE members SET consent_sms = NOT consent_sms WHERE id = :m"),
                    {"m": member_id},
                )
            elif what == "erase":
                s.execute(
                    text("UPDATE members SET status = 'erased' WHERE id = :m"), {"m": member_id}
                )
            elif what == "untag":
                s.execute(text("UPDATE members SET tags = '{}' WHERE id = :m"), {"m": member_id})
        for m in new_members:
            add(s, *m)

    run(change)
    results = run(lambda s: custom.refresh_many(s, segments, t1, vocab)[0])

    def check(s: Session) -> None:
        modes = dict(
            s.execute(
                select(SegmentRefresh.segment_id, SegmentRefresh.mode).where(
                    SegmentRefresh.segment_id.in_(segments), SegmentRefresh.as_of == t1
                )
            ).all()
        )
        # The rules on member rows only are compared incrementally; the region rule in full.
        assert [modes[sid] for sid in segments] == ["incremental"] * 4 + ["full"]
        by_id = {r.segment_id: r for r in results}
        for sid, rule in zip(segments, rules, strict=True):
            now = members_of(s, sid)
            assert now == _expected(s, sid, rule, tag, t1), rule
            entered = sorted(m for m, kind in _history(s, sid) if kind == "entered")
            left = sorted(m for m, kind in _history(s, sid) if kind == "left")
            # Entries over both refreshes: the first one's, then who came after it.
            assert entered == sorted([*before[sid], *(now - before[sid])]), rule
            assert left == sorted(before[sid] - now), rule
            assert (by_id[sid].members, by_id[sid].entered, by_id[sid].left) == (
                len(now),
                len(now - before[sid]),
                len(before[sid] - now),
            ), rule

    run(check)
