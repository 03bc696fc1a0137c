"""The documented meaning of each operator, checked in both compilers against PostgreSQL."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from rules import (
    LeapDay,
    Rule,
    RuleCompileError,
    Scope,
    SqlContext,
    Vocabulary,
    compile_py,
    compile_sql,
    count_query,
    member_query,
    parse_rule,
)
from service.models import Member
from service.vocabulary import load_member_facts, register
from tests.rules.conftest import AddMembers

NOW = datetime(2025, 2, 28, 10, 0, tzinfo=UTC)


def both(
    session: Session, vocab: Vocabulary, text: str, member_id: int, now: datetime = NOW
) -> bool:
    """Evaluate in SQL and in Python; they must agree, and the answer is returned."""
    rule = parse_rule(text, vocab)
    in_sql = session.scalar(
        select(Member.id).where(
            Member.id == member_id, Member.id.in_(member_query(rule, vocab, now))
        )
    )
    facts = load_member_facts(session, [member_id])[member_id]
    in_python = compile_py(rule, vocab)(facts, now=now)
    assert (in_sql is not None) == in_python, f"{text}: sql={in_sql is not None} py={in_python}"
    return in_python


BLANK: dict[str, Any] = {}  # no tier, no birth date, no store, no stats, no tags


@pytest.mark.parametrize(
    "text",
    [
        'tier = "gold"',
        'tier != "gold"',
        'tier in ("gold")',
        'tier not in ("gold")',
        'tier contains "g"',
        'tier starts with ""',
        "age > 0",
        "age <= 0",
        "age between 0 and 150",
        "birth_date < 2100-01-01",
        "birth_date within last 36500 days",
        "birth_date before 0 days ago",
        "birth_date anniversary within next 366 days",
        "days_since_last_purchase >= 0",
        "last_purchase_at within last 36500 days",
        'tags contains "x"',
        'tags contains any ("x")',
        "tier is set",
        "tags is set",
        'region = "East"',
        'home_store != "S-A"',
    ],
)
def test_a_condition_on_a_missing_value_is_false(
    session: Session, vocab: Vocabulary, member_factory: AddMembers, text: str
) -> None:
    member = member_factory(**BLANK)
    assert both(session, vocab, text, member) is False
    # `not` is plain negation of that false: the member is included.
    assert both(session, vocab, f"not ({text})", member) is True


@pytest.mark.parametrize("text", ["tier is not set", "tags is not set", "birth_date is not set"])
def test_is_not_set_holds_for_missing_values(
    session: Session, vocab: Vocabulary, member_factory: AddMembers, text: str
) -> None:
    assert both(session, vocab, text, member_factory(**BLANK)) is True
    assert both(session, vocab, f"not {text}", member_factory(**BLANK)) is False


def test_not_equal_versus_not_equal(
    session: Session, vocab: Vocabulary, member_factory: AddMembers
) -> None:
    no_tier = member_factory()
    silver = member_factory(tier="silver")
    assert both(session, vocab, 'tier != "gold"', silver) is True
    assert both(session, vocab, 'tier != "gold"', no_tier) is False
    assert both(session, vocab, 'not tier = "gold"', no_tier) is True


def test_members_without_statistics_have_zero_counts(
    session: Session, vocab: Vocabulary, member_factory: AddMembers
) -> None:
    member = member_factory()
    assert both(session, vocab, "purchase_count = 0 and net_spend = 0", member)
    assert both(session, vocab, "days_since_last_purchase is not set", member)


def test_money_compares_exactly(
    session: Session, vocab: Vocabulary, member_factory: AddMembers
) -> None:
    member = member_factory(stats={"net_spend": Decimal("500.01")})
    assert both(session, vocab, "net_spend > 500", member)
    assert not both(session, vocab, "net_spend > 500.01", member)
    assert both(session, vocab, "net_spend >= 500.01", member)
    assert both(session, vocab, "net_spend in (500.010, 1)", member)
    tenth = member_factory(stats={"net_spend": Decimal("0.10")})
    assert both(session, vocab, "net_spend = 0.1", tenth)


def test_strings_match_literally_and_case_sensitively(
    session: Session, vocab: Vocabulary, member_factory: AddMembers
) -> None:
    member = member_factory(tier="Gold_100%")
    assert both(session, vocab, 'tier contains "_100%"', member)
    assert not both(session, vocab, 'tier contains "gold"', member)
    assert not both(session, vocab, 'tier starts with "G%"', member)
    assert both(session, vocab, 'tier starts with "Gold_"', member)
    other = member_factory(tier="GoldX100Y")
    assert not both(session, vocab, 'tier contains "_100%"', other)


def test_list_fields(session: Session, vocab: Vocabulary, member_factory: AddMembers) -> None:
    member = member_factory(tags=["vip", "金"])
    assert both(session, vocab, 'tags contains "金"', member)
    assert both(session, vocab, 'tags contains any ("x", "vip")', member)
    assert not both(session, vocab, 'tags contains all ("x", "vip")', member)
    assert both(session, vocab, 'tags contains all ("金", "vip")', member)
    assert both(session, vocab, "tags is set", member)
    assert both(session, vocab, "tags is not set", member_factory(tags=[]))


def test_region_comes_from_the_home_store(
    session: Session, vocab: Vocabulary, member_factory: AddMembers
) -> None:
    member = member_factory(home_store="S-B")
    assert both(session, vocab, 'region = "North" and home_store = "S-B"', member)
    assert not both(session, vocab, 'region in ("East")', member)


def test_datetime_windows_are_inclusive_of_both_ends(
    session: Session, vocab: Vocabulary, member_factory: AddMembers
) -> None:
    edge = member_factory(stats={"last_purchase_at": NOW - timedelta(days=30)})
    just_before = member_factory(
        stats={"last_purchase_at": NOW - timedelta(days=30, microseconds=1)}
    )
    future = member_factory(stats={"last_purchase_at": NOW + timedelta(seconds=1)})
    assert both(session, vocab, "last_purchase_at within last 30 days", edge)
    assert not both(session, vocab, "last_purchase_at within last 30 days", just_before)
    assert not both(session, vocab, "last_purchase_at within last 30 days", future)
    assert both(session, vocab, "last_purchase_at before 30 days ago", just_before)
    assert not both(session, vocab, "last_purchase_at before 30 days ago", edge)


def test_days_since_last_purchase_counts_whole_days(
    session: Session, vocab: Vocabulary, member_factory: AddMembers
) -> None:
    almost = member_factory(
        stats={"last_purchase_at": NOW - timedelta(days=90) + timedelta(seconds=1)}
    )
    exactly = member_factory(stats={"last_purchase_at": NOW - timedelta(days=90)})
    assert both(session, vocab, "days_since_last_purchase = 89", almost)
    assert both(session, vocab, "days_since_last_purchase = 90", exactly)
    ahead = member_factory(stats={"last_purchase_at": NOW + timedelta(hours=1)})
    assert both(session, vocab, "days_since_last_purchase = -1", ahead)


@pytest.mark.parametrize(
    ("now", "zone", "expected"),
    [
        # 2025-02-28 10:00 UTC is already 1 March in Kiritimati (UTC+14): birthday passed.
        (datetime(2025, 2, 28, 10, 0, tzinfo=UTC), "Pacific/Kiritimati", False),
        (datetime(2025, 2, 28, 10, 0, tzinfo=UTC), "Asia/Shanghai", True),
        # ... and still 27 February in Pago Pago (UTC-11): one day to go.
        (datetime(2025, 2, 28, 10, 0, tzinfo=UTC), "Pacific/Pago_Pago", False),
        (datetime(2024, 2, 29, 12, 0, tzinfo=UTC), "UTC", True),
    ],
)
def test_leap_day_birthday_is_kept_on_28_february(
    session: Session,
    vocab: Vocabulary,
    member_factory: AddMembers,
    now: datetime,
    zone: str,
    expected: bool,
) -> None:
    member = member_factory(birth_date=date(2000, 2, 29), timezone=zone)
    assert (
        both(session, vocab, "birth_date anniversary within next 0 days", member, now) is expected
    )


def test_birthday_window_crosses_the_year_end(
    session: Session, vocab: Vocabulary, member_factory: AddMembers
) -> None:
    now = datetime(2025, 12, 31, 20, 0, tzinfo=UTC)  # already 1 Jan 2026 in Shanghai
    new_year = member_factory(birth_date=date(1990, 1, 1), timezone="America/Los_Angeles")
    assert both(session, vocab, "birth_date anniversary within next 1 days", new_year, now)
    assert not both(session, vocab, "birth_date anniversary within next 0 days", new_year, now)
    shanghai = member_factory(birth_date=date(1990, 1, 1), timezone="Asia/Shanghai")
    assert both(session, vocab, "birth_date anniversary within next 0 days", shanghai, now)
    eve = member_factory(birth_date=date(1990, 12, 31), timezone="Asia/Shanghai")
    assert both(session, vocab, "birth_date anniversary within next 364 days", eve, now)
    assert not both(session, vocab, "birth_date anniversary within next 363 days", eve, now)


def test_age_in_the_members_time_zone(
    session: Session, vocab: Vocabulary, member_factory: AddMembers
) -> None:
    now = datetime(2025, 2, 28, 10, 0, tzinfo=UTC)
    leapling = member_factory(birth_date=date(2000, 2, 29), timezone="Asia/Shanghai")
    assert both(session, vocab, "age = 25", leapling, now)  # birthday kept on 28 Feb
    west = member_factory(birth_date=date(2000, 2, 29), timezone="Pacific/Pago_Pago")
    assert both(session, vocab, "age = 24", west, now)  # still 27 Feb there


def test_leap_day_policy_can_move_to_1_march(session: Session, member_factory: AddMembers) -> None:
    vocab = Vocabulary()
    register(vocab)
    birth = vocab.get("birth_date")
    assert birth is not None
    vocab.register(dataclasses.replace(birth, leap_day=LeapDay.MAR1), replace=True)
    member = member_factory(birth_date=date(2000, 2, 29), timezone="UTC")
    now = datetime(2025, 2, 28, 10, 0, tzinfo=UTC)
    assert both(session, vocab, "birth_date anniversary within next 1 days", member, now)
    assert not both(session, vocab, "birth_date anniversary within next 0 days", member, now)


def test_date_windows_use_the_local_date(
    session: Session, vocab: Vocabulary, member_factory: AddMembers
) -> None:
    now = datetime(2025, 2, 28, 20, 0, tzinfo=UTC)  # 1 March in Shanghai
    member = member_factory(birth_date=date(2025, 2, 28), timezone="Asia/Shanghai")
    assert both(session, vocab, "birth_date within last 1 days", member, now)
    assert not both(session, vocab, "birth_date within last 0 days", member, now)
    assert both(session, vocab, "birth_date before 0 days ago", member, now)


def test_event_rules_read_the_event(vocab: Vocabulary) -> None:
    rule = parse_rule(
        'event.amount >= 200 and event.channel = "ecom" and event.item_categories contains "shoes"'
        " and purchase_count >= 1",
        vocab,
        Scope.EVENT,
    )
    check = compile_py(rule, vocab).at(NOW)
    member = {"purchase_count": 2}
    event = {
        "amount": Decimal("200.00"),
        "channel": "ecom",
        "items": [{"sku": "A", "category": "bags"}, {"sku": "B", "category": "shoes"}],
    }
    assert check(member, event)
    assert not check(member, {**event, "amount": Decimal("199.99")})
    assert not check(member, {**event, "items": []})
    assert not check(member)  # no event: event conditions are on missing values
    with pytest.raises(RuleCompileError, match="event field"):
        compile_sql(Rule(rule.root, Scope.MEMBER), vocab, NOW)
    with pytest.raises(RuleCompileError, match="only member rules"):
        compile_sql(rule, vocab, NOW)


def test_the_evaluation_instant_must_be_aware(vocab: Vocabulary) -> None:
    rule = parse_rule("age > 1", vocab)
    with pytest.raises(ValueError, match="timezone-aware"):
        compile_py(rule, vocab).at(datetime(2025, 1, 1))


def test_sql_uses_bound_parameters_only(vocab: Vocabulary) -> None:
    rule = parse_rule('tier = "x\'; DROP TABLE members; --" and age between 20 and 30', vocab)
    sql = str(member_query(rule, vocab, NOW))
    assert "DROP" not in sql and "20" not in sql
    compiled = compile_sql(rule, vocab, NOW, SqlContext(NOW))
    assert compiled.joins == frozenset()


def test_count_query(session: Session, vocab: Vocabulary, member_factory: AddMembers) -> None:
    tag = "count-" + datetime.now(UTC).strftime("%f")
    for _ in range(3):
        member_factory(tags=[tag])
    rule = parse_rule(f'tags contains "{tag}"', vocab)
    assert session.scalar(count_query(rule, vocab, NOW)) == 3


def test_erased_members_are_never_selected(
    session: Session, vocab: Vocabulary, member_factory: AddMembers
) -> None:
    member = member_factory(tier="erased-one", status="erased")
    rule = parse_rule('tier = "erased-one"', vocab)
    assert list(session.scalars(member_query(rule, vocab, NOW).where(Member.id == member))) == []


@pytest.mark.parametrize("zone", ["Not/A_Zone", "posix/Asia/Shanghai", "asia/shanghai", ""])
def test_unknown_time_zones_count_as_utc(
    session: Session, vocab: Vocabulary, member_factory: AddMembers, zone: str
) -> None:
    now = datetime(2025, 2, 28, 20, 0, tzinfo=UTC)  # 1 March in Shanghai, 28 Feb in UTC
    member = member_factory(birth_date=date(2000, 3, 1), timezone=zone)
    assert not both(session, vocab, "birth_date anniversary within next 0 days", member, now)
    assert both(session, vocab, "birth_date anniversary within next 1 days", member, now)
