"""Calendar arithmetic shared by both compilers: local "today", anniversaries, age.

Each rule is written twice, once for Python and once as SQL, side by side, so
the two can be read against each other; the property tests check they agree.
"""

from __future__ import annotations

import calendar as _cal
import functools
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from sqlalchemy import (
    BigInteger,
    Date,
    DateTime,
    Integer,
    and_,
    case,
    cast,
    extract,
    func,
    literal,
    not_,
    or_,
)
from sqlalchemy.sql.elements import ColumnElement

from rules.vocabulary import LeapDay, Operator, SqlContext, SqlLeaf


def utc_instant(now: datetime) -> datetime:
    """The evaluation instant in UTC; a naive datetime is refused (its zone is a guess)."""
    if now.tzinfo is UTC:
        return now  # the usual case (datetime.now(UTC)): nothing to convert
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("the evaluation instant must be timezone-aware")
    return now.astimezone(UTC)


@functools.cache
def known_zones() -> frozenset[str]:
    """The IANA zone names this process knows (read once; the list is a directory scan)."""
    return frozenset(available_timezones())


@functools.lru_cache(maxsize=1024)
def zone(name: str | None) -> tzinfo:
    """The IANA zone `name`; UTC when unset or unknown.

    Unknown names are rejected when a member is written, so the fallback only shields
    the hot path from bad imports. Only listed names count (not e.g. "posix/..."
    paths zoneinfo would also open), because the SQL compiler joins on that list.
    """
    if not name or name not in known_zones():
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


@functools.lru_cache(maxsize=16)
def dates_by_zone(now: datetime) -> tuple[tuple[str, ...], tuple[date, ...]]:
    """Every IANA zone name with its calendar date at `now` (for the SQL compiler)."""
    names = tuple(sorted(known_zones()))
    return names, tuple(local_today(name, now) for name in names)


# One evaluation instant serves many members in few zones: remembering the answer per
# (zone, instant) makes "today" a dictionary lookup on the hot path.
@functools.lru_cache(maxsize=4096)
def local_today(zone_name: str | None, now: datetime) -> date:
    """The calendar date at instant `now` in the member's time zone."""
    return now.astimezone(zone(zone_name)).date()


def anniversary_in(year: int, day: date, leap_day: LeapDay = LeapDay.FEB28) -> date:
    """The anniversary of `day` in `year`; 29 February moves to 28 Feb or 1 Mar in common years."""
    if day.month == 2 and day.day == 29 and not _cal.isleap(year):
        return date(year, 2, 28) if leap_day is LeapDay.FEB28 else date(year, 3, 1)
    return date(year, day.month, day.day)


def days_to_anniversary(day: date, today: date, leap_day: LeapDay = LeapDay.FEB28) -> int:
    """Days from `today` to the next anniversary of `day` (0 when it is today)."""
    this_year = anniversary_in(today.year, day, leap_day)
    if this_year < today:
        this_year = anniversary_in(today.year + 1, day, leap_day)
    return (this_year - today).days


def age_on(birth: date, today: date, leap_day: LeapDay = LeapDay.FEB28) -> int:
    """Completed years; a 29 February birthday counts on the day its anniversary is kept."""
    years = today.year - birth.year
    if today < anniversary_in(today.year, birth, leap_day):
        years -= 1
    return years


# --- the same in SQL -------------------------------------------------------------------
#
# An anniversary is "the date plus k years": PostgreSQL's date + interval keeps the day
# and clamps 29 February to 28 February in common years, which is the FEB28 policy.
# Age and birthday conditions are rewritten as comparisons with such dates so each row
# costs a couple of date additions, not a chain of extract/make_date calls.


def _int(expr: Any) -> ColumnElement[int]:
    return cast(expr, Integer)


def _part(field: str, day: Any) -> ColumnElement[int]:
    """A whole-number field of a date. date_part returns double precision, exact for these;
    EXTRACT returns numeric since PostgreSQL 14, about twice the cost per row, which shows
    in a segment refresh over every member."""
    return _int(func.date_part(field, day))


def sql_add_years(
    day: ColumnElement[Any], years: Any, leap_day: LeapDay = LeapDay.FEB28
) -> ColumnElement[Any]:
    """The anniversary of `day` `years` later (a date), following the leap-day policy."""
    clamped = cast(day + func.make_interval(years), Date)
    if leap_day is LeapDay.FEB28:
        return clamped
    # 1 March policy: count from 28 February and add the day back (29 Feb in leap years).
    from_eve = cast(cast(day - 1 + func.make_interval(years), Date) + 1, Date)
    is_leap_day = and_(_part("month", day) == 2, _part("day", day) == 29)
    return case((is_leap_day, from_eve), else_=clamped)


def sql_anniversary_within(
    day: ColumnElement[Any], today: ColumnElement[Any], n: int, leap_day: LeapDay = LeapDay.FEB28
) -> ColumnElement[bool]:
    """The next anniversary of `day` (on or after `today`) is at most `n` days away."""
    years = _part("year", today) - _part("year", day)
    this_year = sql_add_years(day, years, leap_day)
    next_year = sql_add_years(day, years + 1, leap_day)
    last = today + literal(n, Integer)
    # Next year's anniversary is always after today; this year's only counts if not past.
    return or_(and_(this_year >= today, this_year <= last), next_year <= last)


def sql_age(
    birth: ColumnElement[Any], today: ColumnElement[Any], leap_day: LeapDay = LeapDay.FEB28
) -> ColumnElement[int]:
    """Completed years at `today` (as an expression; conditions use `age_leaf`)."""
    years = _part("year", today) - _part("year", birth)
    return years - case((sql_add_years(birth, years, leap_day) > today, 1), else_=0)


def age_leaf(
    birth: ColumnElement[Any],
    today: Callable[[SqlContext], ColumnElement[Any]],
    leap_day: LeapDay = LeapDay.FEB28,
) -> SqlLeaf:
    """Conditions on age as comparisons of birthday + N years with today.

    age >= N exactly when the N-th anniversary has been reached, so no age is computed.
    """

    def reached(ctx: SqlContext, n: int) -> ColumnElement[bool]:
        return sql_add_years(birth, literal(n, Integer), leap_day) <= today(ctx)

    def leaf(ctx: SqlContext, op: Operator, v: Any) -> ColumnElement[bool] | None:
        def exactly(n: int) -> ColumnElement[bool]:
            return and_(reached(ctx, n), not_(reached(ctx, n + 1)))

        return _integer_leaf(op, v, birth, lambda n: reached(ctx, n), exactly)

    return leaf


def days_since_leaf(column: ColumnElement[Any], joins: tuple[str, ...] = ()) -> SqlLeaf:
    """Conditions on whole days since an instant, as comparisons of the instant itself.

    floor((now - t) / 1 day) >= N exactly when t <= now - N days; the thresholds are
    computed in Python like the Python compiler does, and an index on t stays usable.
    """

    def leaf(ctx: SqlContext, op: Operator, v: Any) -> ColumnElement[bool] | None:
        ctx.need(*joins)

        def at_least(n: int) -> ColumnElement[bool]:
            return column <= literal(ctx.now_value - timedelta(days=n), DateTime(timezone=True))

        def exactly(n: int) -> ColumnElement[bool]:
            edge = literal(ctx.now_value - timedelta(days=n + 1), DateTime(timezone=True))
            return and_(at_least(n), column > edge)

        return _integer_leaf(op, v, column, at_least, exactly)

    return leaf


def _integer_leaf(
    op: Operator,
    v: Any,
    column: ColumnElement[Any],
    at_least: Callable[[int], ColumnElement[bool]],
    exactly: Callable[[int], ColumnElement[bool]],
) -> ColumnElement[bool] | None:
    """Every integer operator from "value >= n" and "value == n" on a monotone quantity."""
    match op:
        case Operator.GE:
            return at_least(v)
        case Operator.GT:
            return at_least(v + 1)
        case Operator.LE:
            return not_(at_least(v + 1))
        case Operator.LT:
            return not_(at_least(v))
        case Operator.EQ:
            return exactly(v)
        case Operator.NE:
            return not_(exactly(v))
        case Operator.BETWEEN:
            return and_(at_least(v[0]), not_(at_least(v[1] + 1)))
        case Operator.IN:
            return or_(*(exactly(n) for n in v))
        case Operator.NOT_IN:
            return not_(or_(*(exactly(n) for n in v)))
        case Operator.IS_SET:
            return column.is_not(None)
        case Operator.IS_NOT_SET:
            return column.is_(None)
    return None


def sql_days_since(ctx: SqlContext, column: ColumnElement[Any]) -> ColumnElement[Any]:
    """Whole days since `column` (the expression; conditions use `days_since_leaf`)."""
    # extract(epoch) is exact numeric (PostgreSQL 14+), so the floor matches Python's.
    elapsed = extract("epoch", ctx.now) - extract("epoch", column)
    return cast(func.floor(elapsed / 86400), BigInteger)
