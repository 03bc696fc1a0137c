"""Compile a validated rule to a SQLAlchemy boolean expression (bound parameters only).

Missing values follow the same rule as in Python: a condition on a NULL is false,
`is not set` is true, `not` flips true and false. Conditions under a `not` are
wrapped in `coalesce(..., false)` so SQL's unknown never reaches the NOT; the
others stay plain comparisons, because a WHERE rejects NULL exactly as it rejects
false (AND / OR are monotone), and plain comparisons keep indexes usable and let
PostgreSQL turn the member_stats / region outer joins into inner joins.
`SqlPredicate.expr` is the fully two-valued form for use outside a WHERE.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Numeric,
    Select,
    Text,
    and_,
    bindparam,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.expression import FromClause
from sqlalchemy.types import TypeEngine

from rules import calendar
from rules.ast import All, Leaf, Node, Not, Rule
from rules.errors import RuleCompileError
from rules.vocabulary import Field, FieldType, Operator, Scope, SqlContext, Vocabulary

_SQL_TYPES: dict[FieldType, TypeEngine[Any]] = {
    FieldType.INTEGER: BigInteger(),
    FieldType.DECIMAL: Numeric(),
    FieldType.MONEY: Numeric(),
    FieldType.STRING: Text(),
    FieldType.ENUM: Text(),
    FieldType.BOOLEAN: Boolean(),
    FieldType.DATE: Date(),
    FieldType.DATETIME: DateTime(timezone=True),
    FieldType.STRING_LIST: Text(),
    FieldType.SEGMENTS: Text(),
}
_TEXT_ARRAY = ARRAY(Text())


@dataclass(frozen=True)
class SqlPredicate:
    """The rule as SQL, plus what its FROM clause must include.

    `where` is for a WHERE clause, where NULL rejects a row like false does; it keeps
    plain comparisons wherever that gives the same answer (so PostgreSQL can push
    them into scans and turn outer joins into inner ones). `expr` is the two-valued
    form for anywhere else (select lists, NOT by the caller, CASE).
    """

    where: ColumnElement[bool]
    joins: frozenset[str]
    context: SqlContext

    @property
    def expr(self) -> ColumnElement[bool]:
        return func.coalesce(self.where, false())

    def select_from(self, source: FromClause) -> FromClause:
        """`source` (the scope's FROM clause) joined to the tables the rule's context added."""
        for table, onclause in self.context.outer_joins:
            source = source.outerjoin(table, onclause)
        return source


def _value(t: FieldType, value: Any) -> ColumnElement[Any]:
    return literal(value, _SQL_TYPES[t])


def _array(values: Any) -> ColumnElement[Any]:
    return bindparam(None, list(values), type_=_TEXT_ARRAY, unique=True)


def _in_list(t: FieldType, values: Any) -> Any:
    return bindparam(None, list(values), type_=_SQL_TYPES[t], expanding=True, unique=True)


def condition(
    t: FieldType, col: ColumnElement[Any], op: Operator, v: Any
) -> ColumnElement[bool] | None:
    """`col op v` for a column of type `t`, the way the compiler writes it (NULL stays NULL).

    None for the operators that need the evaluation instant (the day operators). Public
    so a field's `sql_leaf` can apply a condition to another column, e.g. a lookup table.
    """
    match op:
        case Operator.EQ:
            return col == _value(t, v)
        case Operator.NE:
            return col != _value(t, v)
        case Operator.LT:
            return col < _value(t, v)
        case Operator.LE:
            return col <= _value(t, v)
        case Operator.GT:
            return col > _value(t, v)
        case Operator.GE:
            return col >= _value(t, v)
        case Operator.BETWEEN:
            return and_(col >= _value(t, v[0]), col <= _value(t, v[1]))
        case Operator.IN:
            return col.in_(_in_list(t, v))
        case Operator.NOT_IN:
            return col.not_in(_in_list(t, v))
        case Operator.CONTAINS if t is FieldType.STRING_LIST:
            return col.op("@>", return_type=Boolean)(_array([v]))
        case Operator.CONTAINS:
            # strpos, not LIKE: the value is matched literally, % and _ included.
            return func.strpos(col, literal(v, Text())) > 0
        case Operator.CONTAINS_ANY:
            return col.op("&&", return_type=Boolean)(_array(v))
        case Operator.CONTAINS_ALL:
            return col.op("@>", return_type=Boolean)(_array(v))
        case Operator.STARTS_WITH:
            return func.starts_with(col, literal(v, Text()), type_=Boolean)
        case Operator.IS_SET:
            return col.is_not(None)
        case Operator.IS_NOT_SET:
            return col.is_(None)
    return None


class _Compiler:
    def __init__(self, vocab: Vocabulary, ctx: SqlContext) -> None:
        self.vocab = vocab
        self.ctx = ctx

    def field(self, name: str) -> Field:
        f = self.vocab.get(name)
        if f is None:
            raise RuleCompileError(f"field {name!r} is not in the vocabulary")
        if f.scope is not Scope.MEMBER:
            raise RuleCompileError(
                f"{name!r} is an event field; rules with event fields are evaluated in Python "
                "against the event, not in SQL over members"
            )
        if f.sql is None:
            raise RuleCompileError(f"field {name!r} has no SQL form")
        return f

    def column(self, f: Field) -> ColumnElement[Any]:
        self.ctx.need(*f.joins)
        return f.sql(self.ctx)  # type: ignore[misc]

    def today(self, f: Field) -> ColumnElement[Any]:
        if f.timezone_field is None:
            return self.ctx.local_date(None)
        tz = self.column(self.field(f.timezone_field))
        return self.ctx.local_date(func.coalesce(tz, "UTC"), f.timezone_field)

    def node(self, node: Node, negated: bool = False) -> ColumnElement[bool]:
        if isinstance(node, Leaf):
            return self.leaf(node, negated)
        if isinstance(node, Not):
            return not_(self.node(node.child, not negated))
        parts = [self.node(c, negated) for c in node.children]
        return and_(*parts) if isinstance(node, All) else or_(*parts)

    def leaf(self, leaf: Leaf, negated: bool) -> ColumnElement[bool]:
        f = self.field(leaf.field)
        op, v = leaf.op, leaf.value
        if f.sql_leaf is not None:
            own = f.sql_leaf(self.ctx, op, v)
            if own is not None:
                return self.two_valued(f, own, negated)
        col = self.column(f)
        lists = f.type in (FieldType.STRING_LIST, FieldType.SEGMENTS)
        if op in (Operator.IS_SET, Operator.IS_NOT_SET):
            filled = func.coalesce(func.cardinality(col), 0) > 0 if lists else col.is_not(None)
            return filled if op is Operator.IS_SET else not_(filled)
        if f.type is FieldType.SEGMENTS:
            hit: ColumnElement[bool]
            if f.sql_membership is not None:
                # The hook (typically EXISTS over a membership table) is two-valued already;
                # no coalesce, so the planner can still turn it into a semi-join.
                hit = type_coerce(f.sql_membership(self.ctx, list(v)), Boolean)
            else:
                hit = func.coalesce(col.op("&&", return_type=Boolean)(_array(v)), false())
            return hit if op is Operator.IN else not_(hit)
        return self.two_valued(f, self.compare(f, col, op, v), negated)

    def two_valued(self, f: Field, expr: ColumnElement[bool], negated: bool) -> ColumnElement[bool]:
        # Under a NOT, a missing value must already be false, or NOT NULL would stay NULL
        # and drop the member. Elsewhere NULL rejects the row exactly as false does (AND and
        # OR are monotone), so the plain comparison stays sargable.
        return func.coalesce(expr, false()) if f.nullable and negated else expr

    def compare(
        self, f: Field, col: ColumnElement[Any], op: Operator, v: Any
    ) -> ColumnElement[bool]:
        found = condition(f.type, col, op, v)
        return found if found is not None else self.time(f, col, op, v)

    def time(self, f: Field, col: ColumnElement[Any], op: Operator, n: int) -> ColumnElement[bool]:
        if f.type is FieldType.DATETIME:
            # The threshold is computed here, exactly as the Python compiler computes it.
            edge = literal(self.ctx.now_value - timedelta(days=n), DateTime(timezone=True))
            if op is Operator.WITHIN_LAST_DAYS:
                return and_(col >= edge, col <= self.ctx.now)
            return col < edge
        today = self.today(f)
        days = literal(n, BigInteger())
        if op is Operator.WITHIN_LAST_DAYS:
            return and_(col >= today - days, col <= today)
        if op is Operator.BEFORE_DAYS_AGO:
            return col < today - days
        return calendar.sql_anniversary_within(col, today, n, f.leap_day)


def compile_sql(
    rule: Rule, vocab: Vocabulary, now: datetime, ctx: SqlContext | None = None
) -> SqlPredicate:
    """The rule as a WHERE-able expression over the member source, evaluated at `now`."""
    if rule.scope is not Scope.MEMBER:
        raise RuleCompileError("only member rules compile to SQL")
    context = ctx or SqlContext(calendar.utc_instant(now))
    where = _Compiler(vocab, context).node(rule.root)
    return SqlPredicate(where, frozenset(context.joins), context)


def _from_source(rule: Rule, vocab: Vocabulary, now: datetime, *columns: Any) -> Select[Any]:
    source = vocab.source(Scope.MEMBER)
    if source is None:
        raise RuleCompileError("the vocabulary has no SQL source for members")
    compiled = compile_sql(rule, vocab, now)
    joined = compiled.select_from(source.from_clause(compiled.joins))
    stmt = select(*columns or (source.id_column(),)).select_from(joined)
    scope_filter = source.where()
    if scope_filter is not None:
        stmt = stmt.where(scope_filter)
    return stmt.where(compiled.where)


def member_query(rule: Rule, vocab: Vocabulary, now: datetime) -> Select[Any]:
    """SELECT the ids of the members matching `rule` at `now` (for segments and audiences)."""
    return _from_source(rule, vocab, now)


def count_query(rule: Rule, vocab: Vocabulary, now: datetime) -> Select[Any]:
    """SELECT count(*) of the members matching `rule` at `now`."""
    return _from_source(rule, vocab, now, func.count())
