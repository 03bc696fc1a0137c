"""The vocabulary: which fields a rule may mention, their types, and the operators each allows.

The language core knows no tables. Fields are registered from outside (the service
registers members and their statistics, segments register RFM and lifecycle, ...),
each with how to read it in SQL (`sql`) and from a Python facts mapping (`py`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import Date, DateTime, Text, bindparam, func, literal
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.elements import BindParameter, ColumnElement
from sqlalchemy.sql.expression import FromClause

from rules.errors import VocabularyError


class Scope(enum.StrEnum):
    """Member fields describe a member; event fields describe the purchase being processed."""

    MEMBER = "member"
    EVENT = "event"


class FieldType(enum.StrEnum):
    INTEGER = "integer"
    DECIMAL = "decimal"
    MONEY = "money"
    STRING = "string"
    ENUM = "enum"
    BOOLEAN = "boolean"
    DATE = "date"
    DATETIME = "datetime"
    STRING_LIST = "string_list"
    # The set of segments a member belongs to; `in` / `not_in` test membership.
    SEGMENTS = "segments"


class ValueKind(enum.StrEnum):
    """The shape of an operator's `value`."""

    NONE = "none"
    SCALAR = "scalar"
    PAIR = "pair"
    LIST = "list"
    ELEMENT = "element"
    DAYS = "days"


class Operator(enum.StrEnum):
    EQ = "eq"
    NE = "ne"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    BETWEEN = "between"
    IN = "in"
    NOT_IN = "not_in"
    CONTAINS = "contains"
    CONTAINS_ANY = "contains_any"
    CONTAINS_ALL = "contains_all"
    STARTS_WITH = "starts_with"
    IS_SET = "is_set"
    IS_NOT_SET = "is_not_set"
    WITHIN_LAST_DAYS = "within_last_days"
    BEFORE_DAYS_AGO = "before_days_ago"
    ANNIVERSARY_WITHIN_NEXT_DAYS = "anniversary_within_next_days"


@dataclass(frozen=True, slots=True)
class OperatorInfo:
    op: Operator
    text: str
    label: str
    value: ValueKind


OPERATORS: dict[Operator, OperatorInfo] = {
    info.op: info
    for info in (
        OperatorInfo(Operator.EQ, "=", "is", ValueKind.SCALAR),
        OperatorInfo(Operator.NE, "!=", "is not", ValueKind.SCALAR),
        OperatorInfo(Operator.LT, "<", "less than", ValueKind.SCALAR),
        OperatorInfo(Operator.LE, "<=", "at most", ValueKind.SCALAR),
        OperatorInfo(Operator.GT, ">", "more than", ValueKind.SCALAR),
        OperatorInfo(Operator.GE, ">=", "at least", ValueKind.SCALAR),
        OperatorInfo(Operator.BETWEEN, "between", "between (inclusive)", ValueKind.PAIR),
        OperatorInfo(Operator.IN, "in", "is one of", ValueKind.LIST),
        OperatorInfo(Operator.NOT_IN, "not in", "is none of", ValueKind.LIST),
        OperatorInfo(Operator.CONTAINS, "contains", "contains", ValueKind.ELEMENT),
        OperatorInfo(Operator.CONTAINS_ANY, "contains any", "contains any of", ValueKind.LIST),
        OperatorInfo(Operator.CONTAINS_ALL, "contains all", "contains all of", ValueKind.LIST),
        OperatorInfo(Operator.STARTS_WITH, "starts with", "starts with", ValueKind.ELEMENT),
        OperatorInfo(Operator.IS_SET, "is set", "is set", ValueKind.NONE),
        OperatorInfo(Operator.IS_NOT_SET, "is not set", "is not set", ValueKind.NONE),
        OperatorInfo(
            Operator.WITHIN_LAST_DAYS, "within last", "within the last N days", ValueKind.DAYS
        ),
        OperatorInfo(Operator.BEFORE_DAYS_AGO, "before", "before N days ago", ValueKind.DAYS),
        OperatorInfo(
            Operator.ANNIVERSARY_WITHIN_NEXT_DAYS,
            "anniversary within next",
            "anniversary within the next N days",
            ValueKind.DAYS,
        ),
    )
}

_O = Operator
_ORDERED = {_O.EQ, _O.NE, _O.LT, _O.LE, _O.GT, _O.GE, _O.BETWEEN}
_PRESENCE = {_O.IS_SET, _O.IS_NOT_SET}
# String ordering is deliberately absent: PostgreSQL collations and Python disagree on it.
TYPE_OPERATORS: dict[FieldType, frozenset[Operator]] = {
    FieldType.INTEGER: frozenset(_ORDERED | {_O.IN, _O.NOT_IN} | _PRESENCE),
    FieldType.DECIMAL: frozenset(_ORDERED | {_O.IN, _O.NOT_IN} | _PRESENCE),
    FieldType.MONEY: frozenset(_ORDERED | {_O.IN, _O.NOT_IN} | _PRESENCE),
    FieldType.STRING: frozenset(
        {_O.EQ, _O.NE, _O.IN, _O.NOT_IN, _O.CONTAINS, _O.STARTS_WITH} | _PRESENCE
    ),
    FieldType.ENUM: frozenset({_O.EQ, _O.NE, _O.IN, _O.NOT_IN} | _PRESENCE),
    FieldType.BOOLEAN: frozenset({_O.EQ, _O.NE} | _PRESENCE),
    FieldType.DATE: frozenset(
        _ORDERED
        | _PRESENCE
        | {_O.WITHIN_LAST_DAYS, _O.BEFORE_DAYS_AGO, _O.ANNIVERSARY_WITHIN_NEXT_DAYS}
    ),
    # Equality of instants to the microsecond is never what a marketer means.
    FieldType.DATETIME: frozenset(
        (_ORDERED - {_O.EQ, _O.NE}) | _PRESENCE | {_O.WITHIN_LAST_DAYS, _O.BEFORE_DAYS_AGO}
    ),
    FieldType.STRING_LIST: frozenset({_O.CONTAINS, _O.CONTAINS_ANY, _O.CONTAINS_ALL} | _PRESENCE),
    FieldType.SEGMENTS: frozenset({_O.IN, _O.NOT_IN}),
}

KEYWORDS = frozenset(
    {
        "and", "or", "not", "in", "is", "set", "between", "contains", "any", "all",
        "starts", "with", "within", "last", "days", "before", "ago", "anniversary",
        "next", "true", "false",
    }
)  # fmt: skip
FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}(\.[a-z][a-z0-9_]{0,63}){0,3}$")


class LeapDay(enum.StrEnum):
    """When a 29 February anniversary falls in a year without one."""

    FEB28 = "feb28"
    MAR1 = "mar1"


class SqlContext:
    """What a field's `sql` callable may use: the bound evaluation instant, named joins, and
    "today" in a member's time zone.

    One context per compiled statement, so the instant is one bound parameter.
    """

    def __init__(self, now: datetime) -> None:
        self.now_value = now
        self.now: BindParameter[datetime] = bindparam(
            "now", now, type_=DateTime(timezone=True), unique=True
        )
        self.joins: set[str] = set()
        # (table, on clause) pairs the statement must LEFT JOIN, e.g. today per time zone.
        self.outer_joins: list[tuple[FromClause, ColumnElement[bool]]] = []
        self._local_dates: dict[str, ColumnElement[Any]] = {}

    def need(self, *joins: str) -> None:
        self.joins.update(joins)

    def local_date(self, zone: ColumnElement[Any] | None, key: str = "") -> ColumnElement[Any]:
        """Today's date at the evaluation instant in `zone` (an IANA name; UTC when None).

        Converting a time zone per row costs more than the rest of a condition, and a
        member table holds only a handful of zones. So today's date in every IANA zone
        is computed once, in Python with the same zoneinfo the Python compiler uses,
        bound as two arrays and hash-joined by zone name; an unknown zone falls back to
        UTC exactly as in Python. `key` names the zone's source so leaves share the join.
        """
        utc_today = literal(self.now_value.astimezone(UTC).date(), Date)
        if zone is None:
            return utc_today
        if key not in self._local_dates:
            from rules.calendar import dates_by_zone  # calendar builds on this module

            names, dates = dates_by_zone(self.now_value)
            table = (
                func.unnest(
                    bindparam(None, list(names), type_=ARRAY(Text()), unique=True),
                    bindparam(None, list(dates), type_=ARRAY(Date()), unique=True),
                )
                .table_valued("zone", "today")
                .render_derived()
            )
            self.outer_joins.append((table, table.c.zone == zone))
            self._local_dates[key] = func.coalesce(table.c.today, utc_today)
        return self._local_dates[key]


SqlGetter = Callable[[SqlContext], ColumnElement[Any]]
MembershipSql = Callable[[SqlContext, list[str]], ColumnElement[bool]]
# Reads a field from one member's (or event's) facts at the evaluation instant.
PyGetter = Callable[[Mapping[str, Any], datetime], Any]
# Compiles one condition on a field itself (e.g. rewriting "days since X >= 90" into
# "X <= now - 90 days" so no per-row arithmetic is needed); None falls back to the default.
# It follows the missing-value rule: NULL or false when the value is missing, except
# `is_not_set`, which must then be true. It asks for the joins it uses (`ctx.need`);
# the field's own `joins` are only for `sql`.
SqlLeaf = Callable[[SqlContext, Operator, Any], "ColumnElement[bool] | None"]


class SqlSource(Protocol):
    """How a scope's rows are selected in SQL: the FROM clause with the joins fields asked for."""

    def id_column(self) -> ColumnElement[Any]: ...

    def from_clause(self, joins: Collection[str]) -> FromClause: ...

    def where(self) -> ColumnElement[bool] | None: ...


@dataclass(frozen=True)
class Field:
    """A name a rule may use, with its type, scope and how both compilers read it."""

    name: str
    type: FieldType
    scope: Scope = Scope.MEMBER
    description: str = ""
    group: str = ""
    values: tuple[str, ...] = ()
    ops: frozenset[Operator] | None = None
    sql: SqlGetter | None = None
    joins: tuple[str, ...] = ()
    # For SEGMENTS fields: a two-valued test "member belongs to any of these keys"
    # (e.g. EXISTS over a membership table); without it, `sql` must give an array.
    sql_membership: MembershipSql | None = None
    sql_leaf: SqlLeaf | None = None
    py: PyGetter | None = None
    key: str | None = None
    # False when neither compiler can ever see a missing value (lets SQL skip coalesce).
    nullable: bool = True
    # For DATE fields: the field holding the member's IANA time zone, which defines "today".
    timezone_field: str | None = None
    leap_day: LeapDay = LeapDay.FEB28
    # For INTEGER fields: the values a rule may compare with (inclusive).
    bounds: tuple[int, int] | None = None
    example: Any = None
    allowed: frozenset[Operator] = field(init=False)

    def __post_init__(self) -> None:
        if not FIELD_NAME.match(self.name) or self.name in KEYWORDS:
            raise VocabularyError(
                f"field name {self.name!r} must be lowercase dotted identifiers "
                "and not a keyword of the text form"
            )
        permitted = TYPE_OPERATORS[self.type]
        chosen = permitted if self.ops is None else frozenset(self.ops)
        if not chosen <= permitted:
            bad = ", ".join(sorted(o.value for o in chosen - permitted))
            raise VocabularyError(f"field {self.name!r}: type {self.type.value} cannot use {bad}")
        if self.type is FieldType.ENUM and not self.values:
            raise VocabularyError(f"enum field {self.name!r} needs its values")
        if self.type is not FieldType.ENUM and self.values:
            raise VocabularyError(f"only enum fields have values ({self.name!r})")
        if self.bounds is not None and self.type is not FieldType.INTEGER:
            raise VocabularyError(f"only integer fields have bounds ({self.name!r})")
        if self.type is FieldType.SEGMENTS and self.nullable:
            # Membership is a set; "not a member of anything" is the empty set, never missing.
            object.__setattr__(self, "nullable", False)
        object.__setattr__(self, "allowed", chosen)

    @property
    def fact_key(self) -> str:
        return self.key or self.name

    def describe(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "type": self.type.value,
            "scope": self.scope.value,
            "group": self.group,
            "description": self.description,
            "nullable": self.nullable,
            "operators": [
                {
                    "op": o.value,
                    "text": OPERATORS[o].text,
                    "label": OPERATORS[o].label,
                    "value": OPERATORS[o].value.value,
                }
                for o in Operator
                if o in self.allowed
            ],
        }
        if self.values:
            data["values"] = list(self.values)
        if self.bounds is not None:
            data["minimum"], data["maximum"] = self.bounds
        if self.example is not None:
            data["example"] = self.example
        return data


class Vocabulary:
    """A registry of fields, filled by whoever owns the data behind them."""

    def __init__(self, fields: Iterable[Field] = ()) -> None:
        self._fields: dict[str, Field] = {}
        self._sources: dict[Scope, SqlSource] = {}
        self.register(*fields)

    def register(self, *fields: Field, replace: bool = False) -> None:
        """Add fields; re-registering a name is an error unless `replace` is set."""
        for f in fields:
            if f.name in self._fields and not replace:
                raise VocabularyError(f"field {f.name!r} is already registered")
            if f.timezone_field is not None and f.type is not FieldType.DATE:
                raise VocabularyError(f"{f.name!r}: only date fields have a time zone field")
            self._fields[f.name] = f

    def set_source(self, scope: Scope, source: SqlSource) -> None:
        self._sources[scope] = source

    def source(self, scope: Scope) -> SqlSource | None:
        return self._sources.get(scope)

    def get(self, name: str) -> Field | None:
        return self._fields.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._fields

    def fields(self, scope: Scope | None = None) -> list[Field]:
        return [f for f in self._fields.values() if scope is None or f.scope is scope]

    def names(self, scope: Scope | None = None) -> list[str]:
        return sorted(f.name for f in self.fields(scope))

    def export(self) -> dict[str, Any]:
        """Everything a UI needs to offer fields, operators and values."""
        return {
            "fields": [f.describe() for f in sorted(self._fields.values(), key=lambda f: f.name)],
            "operators": [
                {"op": i.op.value, "text": i.text, "label": i.label, "value": i.value.value}
                for i in OPERATORS.values()
            ],
            "scopes": {
                Scope.MEMBER.value: "segment and audience rules: member fields only",
                Scope.EVENT.value: "event-triggered rules: member and event fields",
            },
        }
