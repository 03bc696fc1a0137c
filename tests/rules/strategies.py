"""Hypothesis strategies: random valid rules from the vocabulary, random members and instants.

Values are drawn from small pools that overlap with the member data, so rules
actually match some members and the boundaries (equal, one off, missing) get hit.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

from rules import Field, FieldType, Operator, Scope, Vocabulary, to_json
from rules.ast import All, AnyOf, Leaf, Node, Not
from rules.vocabulary import OPERATORS, ValueKind

ZONES = (
    "Pacific/Kiritimati",  # UTC+14
    "Pacific/Pago_Pago",  # UTC-11
    "Asia/Shanghai",
    "America/Los_Angeles",
    "Asia/Kathmandu",  # +05:45
    "America/St_Johns",  # -03:30 / -02:30
    "UTC",
)
LOCALES = ("zh-CN", "en", "en-US", "fr-FR")
TIERS = ("gold", "silver", "bronze", "Gold", "金卡")
TAGS = (
    "vip",
    "staff",
    "'; DROP TABLE members; --",
    'quote"s',
    "back\\slash",
    "a%b",
    "_",
    "ü",
    "😀",
    "",
)
BIRTH_YEARS = (1960, 1984, 1999, 2000, 2001, 2004, 2023, 2024, 2025)
SUBSTRINGS = ("", "a", "zh", "Asia/", "en-", "Pacific", "%", "_", "'", "金")

# Instants around the awkward places: leap day, year end, DST changes, plus anything.
NOW_POOL = (
    datetime(2024, 2, 28, 10, 30, tzinfo=UTC),
    datetime(2024, 2, 28, 23, 30, tzinfo=UTC),
    datetime(2024, 2, 29, 12, 0, tzinfo=UTC),
    datetime(2025, 2, 28, 10, 0, tzinfo=UTC),
    datetime(2025, 2, 28, 13, 0, tzinfo=UTC),
    datetime(2025, 3, 1, 0, 0, tzinfo=UTC),
    datetime(2025, 12, 31, 9, 59, 59, 999_999, tzinfo=UTC),
    datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC),
    datetime(2026, 1, 1, 0, 0, tzinfo=UTC),
    datetime(2026, 3, 8, 10, 0, tzinfo=UTC),
)


def instants() -> st.SearchStrategy[datetime]:
    return st.one_of(
        st.sampled_from(NOW_POOL),
        st.datetimes(
            min_value=datetime(2020, 1, 1),
            max_value=datetime(2030, 12, 31),
            timezones=st.just(UTC),
        ),
    )


def _special_dates() -> st.SearchStrategy[date]:
    years = st.sampled_from(BIRTH_YEARS)
    days = st.sampled_from(((2, 28), (2, 29), (3, 1), (12, 31), (1, 1), (6, 15)))

    def make(y: int, md: tuple[int, int]) -> date:
        m, d = md
        if m == 2 and d == 29 and not (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)):
            d = 28
        return date(y, m, d)

    return st.builds(make, years, days)


def dates() -> st.SearchStrategy[date]:
    return st.one_of(
        _special_dates(), st.dates(min_value=date(1920, 1, 1), max_value=date(2030, 12, 31))
    )


def datetimes_near() -> st.SearchStrategy[datetime]:
    """Instants spread over a few years around the NOW pool, to the microsecond."""
    base = st.sampled_from(NOW_POOL)
    offset = st.one_of(
        st.integers(-400, 400).map(lambda d: timedelta(days=d)),
        st.integers(-400 * 86_400 * 10**6, 400 * 86_400 * 10**6).map(
            lambda us: timedelta(microseconds=us)
        ),
    )
    return st.builds(lambda b, o: b + o, base, offset)


def money() -> st.SearchStrategy[Decimal]:
    return st.one_of(
        st.sampled_from(
            [Decimal(x) for x in ("0", "0.01", "-0.01", "499.99", "500", "500.01", "-20")]
        ),
        st.decimals(min_value=Decimal("-1000000"), max_value=Decimal("1000000"), places=2),
    )


def unicode_text() -> st.SearchStrategy[str]:
    # PostgreSQL text cannot hold NUL; surrogates are not text at all.
    return st.text(
        alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
        max_size=12,
    )


# --- values for a field ---------------------------------------------------------------


def scalar_for(f: Field, stores: tuple[str, ...], regions: tuple[str, ...]) -> Any:
    name, t = f.name, f.type
    if t is FieldType.ENUM:
        return st.sampled_from(f.values)
    if t is FieldType.BOOLEAN:
        return st.booleans()
    if t is FieldType.MONEY or t is FieldType.DECIMAL:
        return money()
    if t is FieldType.DATE:
        return dates()
    if t is FieldType.DATETIME:
        return datetimes_near()
    if t is FieldType.INTEGER:
        if name == "age":
            # Ages the special birth years reach around the NOW pool, and one either side.
            near = sorted({n.year - y + k for n in NOW_POOL for y in BIRTH_YEARS for k in (-1, 0)})
            near = [n for n in near if 0 <= n <= 150]
            return st.one_of(st.sampled_from(near), st.integers(0, 110))
        if name == "days_since_last_purchase":
            return st.integers(-3, 500)
        if f.bounds is not None:
            # Values outside a field's bounds are rejected when a rule is saved.
            return st.integers(max(f.bounds[0], -1), min(f.bounds[1], 12))
        return st.integers(-1, 12)
    pools = {
        "timezone": ZONES,
        "locale": LOCALES,
        "tier": TIERS,
        "home_store": stores,
        "region": regions,
    }
    pool = pools.get(name, TAGS)
    return st.one_of(st.sampled_from(pool), unicode_text())


def element_for(f: Field) -> st.SearchStrategy[str]:
    if f.type is FieldType.STRING_LIST:
        return st.one_of(st.sampled_from(TAGS), unicode_text())
    return st.one_of(st.sampled_from(SUBSTRINGS), unicode_text())


def _pairs(vocab: Vocabulary, scope: Scope) -> list[tuple[Field, Operator]]:
    """Every (field, operator) the scope allows; calendar ones repeated so they come up often."""
    pairs: list[tuple[Field, Operator]] = []
    for f in sorted(vocab.fields(), key=lambda x: x.name):
        if scope is Scope.MEMBER and f.scope is not Scope.MEMBER:
            continue
        for op in sorted(f.allowed, key=lambda o: o.value):
            calendar = OPERATORS[op].value is ValueKind.DAYS or f.name == "age"
            pairs += [(f, op)] * (4 if calendar else 1)
    return pairs


@st.composite
def leaves(
    draw: st.DrawFn,
    vocab: Vocabulary,
    scope: Scope,
    stores: tuple[str, ...] = ("S-A", "S-B"),
    regions: tuple[str, ...] = ("East", "North"),
) -> Leaf:
    f, op = draw(st.sampled_from(_pairs(vocab, scope)))
    kind = OPERATORS[op].value
    value: Any = None
    if kind is ValueKind.SCALAR:
        value = draw(scalar_for(f, stores, regions))
    elif kind is ValueKind.PAIR:
        a, b = draw(scalar_for(f, stores, regions)), draw(scalar_for(f, stores, regions))
        value = (min(a, b), max(a, b))
    elif kind is ValueKind.LIST:
        item = (
            element_for(f)
            if f.type in (FieldType.STRING_LIST, FieldType.SEGMENTS)
            else scalar_for(f, stores, regions)
        )
        value = tuple(draw(st.lists(item, min_size=1, max_size=4)))
    elif kind is ValueKind.ELEMENT:
        value = draw(element_for(f))
    elif kind is ValueKind.DAYS:
        top = 366 if op is Operator.ANNIVERSARY_WITHIN_NEXT_DAYS else 500
        value = draw(st.one_of(st.sampled_from((0, 1, 7, 30, 90, 365)), st.integers(0, top)))
    return Leaf(f.name, op, value)


@st.composite
def trees(draw: st.DrawFn, vocab: Vocabulary, scope: Scope, depth: int = 4, **kw: Any) -> Node:
    """A rule tree at most `depth` levels deep."""
    if depth <= 1 or draw(st.integers(0, 2)) == 0:
        return draw(leaves(vocab, scope, **kw))
    kind = draw(st.sampled_from(("all", "any", "not")))
    if kind == "not":
        return Not(draw(trees(vocab, scope, depth - 1, **kw)))
    kids = tuple(draw(st.lists(trees(vocab, scope, depth - 1, **kw), min_size=1, max_size=4)))
    return All(kids) if kind == "all" else AnyOf(kids)


def tree_json(node: Node) -> dict[str, Any]:
    return to_json(node)


# --- members ----------------------------------------------------------------------------


@st.composite
def members(draw: st.DrawFn, stores: tuple[str, ...]) -> dict[str, Any]:
    """A member row plus an optional member_stats row (None: never bought anything)."""
    optional = lambda s: st.one_of(st.none(), s)  # noqa: E731
    member = {
        "gender": draw(optional(st.sampled_from(("female", "male", "other")))),
        "birth_date": draw(optional(dates())),
        "timezone": draw(st.sampled_from(ZONES)),
        "locale": draw(st.one_of(st.sampled_from(LOCALES), unicode_text())),
        "home_store": draw(optional(st.sampled_from(stores))),
        "tags": draw(st.lists(st.one_of(st.sampled_from(TAGS), unicode_text()), max_size=3)),
        "tier": draw(optional(st.one_of(st.sampled_from(TIERS), unicode_text()))),
        "consent_email": draw(st.booleans()),
        "consent_sms": draw(st.booleans()),
        "consent_push": draw(st.booleans()),
        "consent_wechat": draw(st.booleans()),
        "created_at": draw(datetimes_near()),
    }
    stats = None
    if draw(st.booleans()):
        stats = {
            "purchase_count": draw(st.integers(0, 12)),
            "refund_count": draw(st.integers(0, 3)),
            "purchase_amount": draw(money()),
            "refund_amount": draw(money()),
            "net_spend": draw(money()),
            "first_purchase_at": draw(optional(datetimes_near())),
            "last_purchase_at": draw(optional(datetimes_near())),
        }
    return {"member": member, "stats": stats}


# --- the calendar corner: leap days, year ends and far-apart zones ----------------------
#
# Few values, chosen so that exact boundaries are hit all the time: birthdays on the
# awkward days of a few years, instants next to them, purchases whole days before them,
# and thresholds equal to the ages and day counts those produce (and one either side).

CALENDAR_FIELDS = ("age", "birth_date", "days_since_last_purchase", "last_purchase_at")
CALENDAR_NOWS = (
    datetime(2025, 2, 28, 10, 0, tzinfo=UTC),
    datetime(2024, 2, 28, 12, 0, tzinfo=UTC),
    datetime(2024, 2, 29, 12, 0, tzinfo=UTC),
    datetime(2025, 3, 1, 0, 30, tzinfo=UTC),
    datetime(2025, 12, 31, 20, 0, tzinfo=UTC),
    datetime(2026, 1, 1, 6, 0, tzinfo=UTC),
)
CALENDAR_YEARS = (2000, 2003, 2004)
CALENDAR_DAYS = ((2, 28), (2, 29), (3, 1), (12, 31), (1, 1))
DAY_COUNTS = (0, 1, 29, 30, 31, 365, 366)


def _calendar_birthdays() -> list[date]:
    out = []
    for y in CALENDAR_YEARS:
        for m, d in CALENDAR_DAYS:
            if (m, d) != (2, 29) or y % 4 == 0:
                out.append(date(y, m, d))
    return out


def special_instants() -> st.SearchStrategy[datetime]:
    """The calendar instants exactly, or shifted by whole hours across every zone's midnight."""
    exact = st.sampled_from(CALENDAR_NOWS)
    shifted = st.builds(lambda n, h: n + timedelta(hours=h), exact, st.integers(-26, 26))
    return st.one_of(exact, shifted)


def _purchase_instants() -> st.SearchStrategy[datetime]:
    nudge = st.sampled_from(
        (timedelta(0), timedelta(microseconds=1), -timedelta(microseconds=1), timedelta(hours=5))
    )
    return st.builds(
        lambda n, k, e: n - timedelta(days=k) + e,
        st.sampled_from(CALENDAR_NOWS),
        st.sampled_from(DAY_COUNTS),
        nudge,
    )


@st.composite
def calendar_members(draw: st.DrawFn) -> dict[str, Any]:
    member = {
        "birth_date": draw(st.one_of(st.sampled_from(_calendar_birthdays()), st.none())),
        "timezone": draw(st.sampled_from(ZONES)),
    }
    last = draw(st.one_of(st.none(), _purchase_instants()))
    return {"member": member, "stats": {"last_purchase_at": last, "first_purchase_at": last}}


def _calendar_values(name: str) -> st.SearchStrategy[Any]:
    if name == "age":
        ages = sorted(
            {n.year - y + k for n in CALENDAR_NOWS for y in CALENDAR_YEARS for k in (-1, 0, 1)}
        )
        return st.sampled_from([a for a in ages if a >= 0])
    if name == "days_since_last_purchase":
        return st.sampled_from(sorted({k + e for k in DAY_COUNTS for e in (-1, 0, 1)}))
    if name == "birth_date":
        return st.sampled_from(_calendar_birthdays())
    return _purchase_instants()


@st.composite
def calendar_leaves(draw: st.DrawFn, vocab: Vocabulary) -> Leaf:
    name = draw(st.sampled_from(CALENDAR_FIELDS))
    f = vocab.get(name)
    assert f is not None
    op = draw(st.sampled_from(sorted(f.allowed, key=lambda o: o.value)))
    kind = OPERATORS[op].value
    values = _calendar_values(name)
    value: Any = None
    if kind is ValueKind.DAYS:
        value = draw(st.sampled_from((0, 1, 2, 29, 30, 31, 364, 365, 366)))
    elif kind is ValueKind.SCALAR:
        value = draw(values)
    elif kind is ValueKind.PAIR:
        a, b = draw(values), draw(values)
        value = (min(a, b), max(a, b))
    elif kind is ValueKind.LIST:
        value = tuple(draw(st.lists(values, min_size=1, max_size=3)))
    return Leaf(name, op, value)
