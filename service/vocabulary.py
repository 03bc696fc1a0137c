"""The foundation's rule vocabulary: member profile and statistics fields, purchase event fields.

The rule language (`rules/`) knows no tables; this module tells it how to read
members, member_stats, stores and regions in SQL and from a facts mapping in
Python. Segments and campaigns add their own fields (RFM, lifecycle, tier,
segment membership) with a `register(vocab)` function listed in `CONTRIBUTORS`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Select, bindparam, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.expression import FromClause

from rules import Field, FieldType, Operator, Scope, SqlContext, Vocabulary
from rules.calendar import (
    age_leaf,
    age_on,
    days_since_leaf,
    local_today,
    sql_age,
    sql_days_since,
)
from rules.compile_sql import condition
from rules.vocabulary import SqlLeaf
from segments import membership as segment_membership
from segments import vocabulary as segment_scores
from service.models import (
    CONSENT_CHANNELS,
    GENDERS,
    Member,
    MemberStats,
    MemberStatus,
    Region,
    SalesChannel,
    Store,
)

_members = Member.__table__
_stats = MemberStats.__table__
_stores = Store.__table__
_regions = Region.__table__

STATS = "stats"
STORE = "store"
REGION = "region"
DAY = timedelta(days=1)


class MemberSource:
    """Active members, left-joined to what the rule's fields need (and nothing more)."""

    def id_column(self) -> ColumnElement[Any]:
        return _members.c.id

    def from_clause(self, joins: Collection[str]) -> FromClause:
        source: FromClause = _members
        if STATS in joins:
            source = source.outerjoin(_stats, _stats.c.member_id == _members.c.id)
        if STORE in joins or REGION in joins:
            source = source.outerjoin(_stores, _stores.c.id == _members.c.home_store_id)
        if REGION in joins:
            source = source.outerjoin(_regions, _regions.c.id == _stores.c.region_id)
        return source

    def where(self) -> ColumnElement[bool]:
        # Erased members keep their aggregates but must never be targeted again.
        return _members.c.status == MemberStatus.ACTIVE.value


# --- derived fields: the same definition in SQL and in Python ---------------------------


def _local_today_sql(ctx: SqlContext) -> ColumnElement[Any]:
    return ctx.local_date(func.coalesce(_members.c.timezone, "UTC"), "timezone")


def _age_sql(ctx: SqlContext) -> ColumnElement[Any]:
    return sql_age(_members.c.birth_date, _local_today_sql(ctx))


def _age_py(facts: Mapping[str, Any], now: datetime) -> int | None:
    birth = facts.get("birth_date")
    if birth is None:
        return None
    return age_on(birth, local_today(facts.get("timezone"), now))


def _days_since_sql(ctx: SqlContext) -> ColumnElement[Any]:
    return sql_days_since(ctx, _stats.c.last_purchase_at)


def _days_since_py(facts: Mapping[str, Any], now: datetime) -> int | None:
    last = facts.get("last_purchase_at")
    if last is None:
        return None
    return (now - last) // DAY


def _through_home_store(value: ColumnElement[Any], source: FromClause) -> SqlLeaf:
    """A condition on a store attribute as "the home store is one of the stores where ...".

    Stores are a few hundred rows: PostgreSQL runs the subquery once (a hashed subplan or
    a semi-join), so a member row costs one lookup and needs no join. Members without a
    home store have no value, as in Python.
    """
    home = _members.c.home_store_id

    def leaf(ctx: SqlContext, op: Operator, v: Any) -> ColumnElement[bool] | None:
        if op is Operator.IS_SET:
            return home.is_not(None)
        if op is Operator.IS_NOT_SET:
            return home.is_(None)
        test = condition(FieldType.STRING, value, op, v)
        if test is None:
            return None
        return home.in_(select(_stores.c.id).select_from(source).where(test))

    return leaf


def _col(column: ColumnElement[Any]) -> Callable[[SqlContext], ColumnElement[Any]]:
    return lambda ctx: column


def _zero(column: ColumnElement[Any]) -> Callable[[SqlContext], ColumnElement[Any]]:
    # A member without a member_stats row has bought nothing: counts and sums are 0.
    return lambda ctx: func.coalesce(column, 0)


def member_fields() -> list[Field]:
    """Profile and statistics fields of the foundation tables."""
    m, s = _members.c, _stats.c
    fields = [
        Field(
            "gender",
            FieldType.ENUM,
            values=GENDERS,
            sql=_col(m.gender),
            group="profile",
            description="Gender as the member gave it.",
        ),
        Field(
            "birth_date",
            FieldType.DATE,
            sql=_col(m.birth_date),
            timezone_field="timezone",
            group="profile",
            example="birth_date anniversary within next 7 days",
            description="Date of birth; 'anniversary within next N days' finds birthdays, "
            "counted in the member's time zone (29 Feb is kept on 28 Feb in common years).",
        ),
        Field(
            "age",
            FieldType.INTEGER,
            sql=_age_sql,
            sql_leaf=age_leaf(_members.c.birth_date, _local_today_sql),
            py=_age_py,
            bounds=(0, 150),
            group="profile",
            example="age between 25 and 40",
            description="Completed years today in the member's time zone; missing without a "
            "birth date.",
        ),
        Field(
            "timezone",
            FieldType.STRING,
            sql=_col(m.timezone),
            nullable=False,
            group="profile",
            description="IANA time zone, e.g. Asia/Shanghai.",
        ),
        Field(
            "locale",
            FieldType.STRING,
            sql=_col(m.locale),
            nullable=False,
            group="profile",
            description="Preferred language, e.g. zh-CN.",
        ),
        Field(
            "home_store",
            FieldType.STRING,
            sql=_col(_stores.c.code),
            joins=(STORE,),
            sql_leaf=_through_home_store(_stores.c.code, _stores),
            group="profile",
            description="Code of the member's home store.",
        ),
        Field(
            "region",
            FieldType.STRING,
            sql=_col(_regions.c.code),
            joins=(STORE, REGION),
            sql_leaf=_through_home_store(
                _regions.c.code, _stores.join(_regions, _regions.c.id == _stores.c.region_id)
            ),
            group="profile",
            example='region = "East"',
            description="Region code of the member's home store.",
        ),
        Field(
            "tags",
            FieldType.STRING_LIST,
            sql=_col(m.tags),
            nullable=False,
            group="profile",
            example='tags contains "vip"',
            description="Free tags; an empty list is 'not set'.",
        ),
        Field(
            "tier",
            FieldType.STRING,
            sql=_col(m.tier),
            group="profile",
            description="Loyalty tier code.",
        ),
        Field(
            "created_at",
            FieldType.DATETIME,
            sql=_col(m.created_at),
            nullable=False,
            group="profile",
            example="created_at within last 30 days",
            description="When the member signed up.",
        ),
    ]
    fields += [
        Field(
            f"consent.{channel}",
            FieldType.BOOLEAN,
            sql=_col(m[f"consent_{channel}"]),
            nullable=False,
            group="consent",
            example=f"consent.{channel} = true",
            description=f"The member agreed to be contacted by {channel}.",
        )
        for channel in CONSENT_CHANNELS
    ]
    fields += [
        Field(
            "purchase_count",
            FieldType.INTEGER,
            sql=_zero(s.purchase_count),
            nullable=False,
            description="Lifetime number of purchases.",
            joins=(STATS,),
            group="statistics",
        ),
        Field(
            "refund_count",
            FieldType.INTEGER,
            sql=_zero(s.refund_count),
            nullable=False,
            description="Lifetime number of refunds.",
            joins=(STATS,),
            group="statistics",
        ),
        Field(
            "purchase_amount",
            FieldType.MONEY,
            sql=_zero(s.purchase_amount),
            nullable=False,
            description="Lifetime gross purchases.",
            joins=(STATS,),
            group="statistics",
        ),
        Field(
            "refund_amount",
            FieldType.MONEY,
            sql=_zero(s.refund_amount),
            nullable=False,
            description="Lifetime refunds.",
            joins=(STATS,),
            group="statistics",
        ),
        Field(
            "net_spend",
            FieldType.MONEY,
            sql=_zero(s.net_spend),
            nullable=False,
            example="net_spend > 500",
            description="Lifetime spend net of refunds.",
            joins=(STATS,),
            group="statistics",
        ),
        Field(
            "first_purchase_at",
            FieldType.DATETIME,
            sql=_col(s.first_purchase_at),
            description="First purchase; missing if none.",
            joins=(STATS,),
            group="statistics",
        ),
        Field(
            "last_purchase_at",
            FieldType.DATETIME,
            sql=_col(s.last_purchase_at),
            example="last_purchase_at before 90 days ago",
            description="Latest purchase; missing if none.",
            joins=(STATS,),
            group="statistics",
        ),
        Field(
            "days_since_last_purchase",
            FieldType.INTEGER,
            sql=_days_since_sql,
            sql_leaf=days_since_leaf(_stats.c.last_purchase_at, (STATS,)),
            py=_days_since_py,
            bounds=(-36_500, 36_500),
            example="days_since_last_purchase >= 90",
            description="Whole days (24 h) since the latest purchase; missing if none.",
            joins=(STATS,),
            group="statistics",
        ),
    ]
    return fields


def _items(attribute: str) -> Callable[[Mapping[str, Any], datetime], list[str] | None]:
    def read(facts: Mapping[str, Any], now: datetime) -> list[str] | None:
        items = facts.get("items")
        if not items:
            return None
        return [str(i[attribute]) for i in items if i.get(attribute) is not None]

    return read


def event_fields() -> list[Field]:
    """Fields of the purchase being processed (event-triggered rules only; Python only)."""
    return [
        Field(
            "event.amount",
            FieldType.MONEY,
            key="amount",
            example="event.amount >= 200",
            description="Amount of this purchase.",
            scope=Scope.EVENT,
            group="event",
        ),
        Field(
            "event.store",
            FieldType.STRING,
            key="store",
            description="Store code of this purchase.",
            scope=Scope.EVENT,
            group="event",
        ),
        Field(
            "event.region",
            FieldType.STRING,
            key="region",
            description="Region code of this purchase's store.",
            scope=Scope.EVENT,
            group="event",
        ),
        Field(
            "event.channel",
            FieldType.ENUM,
            key="channel",
            values=tuple(c.value for c in SalesChannel),
            example='event.channel = "ecom"',
            description="pos (a till) or ecom (the web shop).",
            scope=Scope.EVENT,
            group="event",
        ),
        Field(
            "event.occurred_at",
            FieldType.DATETIME,
            key="occurred_at",
            description="When the purchase happened.",
            scope=Scope.EVENT,
            group="event",
        ),
        Field(
            "event.item_categories",
            FieldType.STRING_LIST,
            py=_items("category"),
            example='event.item_categories contains "shoes"',
            description="Categories of the line items.",
            scope=Scope.EVENT,
            group="event",
        ),
        Field(
            "event.item_skus",
            FieldType.STRING_LIST,
            py=_items("sku"),
            description="SKUs of the line items.",
            scope=Scope.EVENT,
            group="event",
        ),
    ]


def register(vocab: Vocabulary) -> None:
    """Register the foundation's fields and the member SQL source."""
    vocab.register(*member_fields(), *event_fields())
    vocab.set_source(Scope.MEMBER, MemberSource())


# Later packages append their `register(vocab)` here (segments: RFM, lifecycle, membership).
CONTRIBUTORS: tuple[Callable[[Vocabulary], None], ...] = (
    register,
    segment_membership.register,
    segment_scores.register,
)


@functools.cache
def default_vocabulary() -> Vocabulary:
    """The vocabulary of this deployment, built once on first use (no work at import)."""
    vocab = Vocabulary()
    for contribute in CONTRIBUTORS:
        contribute(vocab)
    return vocab


# --- facts for the Python predicate ----------------------------------------------------

_BASE_FACT_COLUMNS = (
    _members.c.id,
    _members.c.external_id,
    _members.c.gender,
    _members.c.birth_date,
    _members.c.timezone,
    _members.c.locale,
    _stores.c.code.label("home_store"),
    _regions.c.code.label("region"),
    _members.c.tags,
    _members.c.tier,
    _members.c.created_at,
    *(_members.c[f"consent_{ch}"] for ch in CONSENT_CHANNELS),
    _stats.c.purchase_count,
    _stats.c.refund_count,
    _stats.c.purchase_amount,
    _stats.c.refund_amount,
    _stats.c.net_spend,
    _stats.c.first_purchase_at,
    _stats.c.last_purchase_at,
    segment_membership.segment_names(_members.c.id).label(segment_membership.FACTS_KEY),
    *(_stats.c[name] for name in segment_scores.WINDOW_FACTS),
)
_ZERO_IF_NO_STATS: dict[str, Any] = {
    "purchase_count": 0,
    "refund_count": 0,
    "purchase_amount": Decimal(0),
    "refund_amount": Decimal(0),
    "net_spend": Decimal(0),
    **segment_scores.WINDOW_ZEROS,
}


def _facts(row: Mapping[Any, Any]) -> dict[str, Any]:
    facts = {k: v for k, v in row.items() if not k.startswith("consent_")}
    for ch in CONSENT_CHANNELS:
        facts[f"consent.{ch}"] = row[f"consent_{ch}"]
    for key, zero in _ZERO_IF_NO_STATS.items():
        if facts[key] is None:
            facts[key] = zero
    return facts


def load_member_facts(session: Session, member_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """Everything the member fields read, for many members in one query, keyed by member id.

    Derived fields (age, days since last purchase) are computed by their Python getters
    at evaluation time, so the same facts serve any evaluation instant.
    """
    ids = list(member_ids)
    if not ids:
        return {}
    stmt = _facts_statement()
    return {row["id"]: _facts(row) for row in session.execute(stmt, {"ids": ids}).mappings()}


@functools.cache
def _facts_statement() -> Any:
    # Built once: the purchase path loads one member's facts per sale, and building the
    # statement (not running it) was a visible share of its Python time.
    ids: Any = bindparam("ids", expanding=True)
    return _facts_select(segment_scores.FACT_JOINS).where(_members.c.id.in_(ids))


def _facts_select(joins: Iterable[segment_scores.FactJoin]) -> Select[Any]:
    joins = tuple(joins)
    source = (
        _members.outerjoin(_stats, _stats.c.member_id == _members.c.id)
        .outerjoin(_stores, _stores.c.id == _members.c.home_store_id)
        .outerjoin(_regions, _regions.c.id == _stores.c.region_id)
    )
    for join in joins:
        source = source.outerjoin(join.table, join.onclause)
    columns = (*_BASE_FACT_COLUMNS, *(column for join in joins for column in join.columns))
    return select(*columns).select_from(source)


def preparable_facts_select() -> Select[Any]:
    """The facts query without the tables no prepared statement may read (see
    `segments.vocabulary.FactJoin.preparable`); add the member filter. Its rows go through
    `facts_of_row`; `unpreparable_facts` reads the rest when a rule needs it."""
    return _facts_select(j for j in segment_scores.FACT_JOINS if j.preparable)


def facts_of_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A facts mapping from a row of the facts query (consents renamed, zeros filled)."""
    return _facts(row)


def reads_unpreparable_facts(vocab: Vocabulary, field_names: Iterable[str]) -> bool:
    """Do these rule fields read facts that `preparable_facts_select` leaves out?"""
    apart = [j for j in segment_scores.FACT_JOINS if not j.preparable]
    keys = {column.key for j in apart for column in j.columns}
    names = {j.sql_join for j in apart}
    for name in field_names:
        found = vocab.get(name)
        if found is None or found.fact_key in keys or names.intersection(found.joins):
            return True
    return False


@functools.cache
def _unpreparable_statement() -> Any:
    apart = [j for j in segment_scores.FACT_JOINS if not j.preparable]
    source: FromClause = _members
    for join in apart:
        source = source.outerjoin(join.table, join.onclause)
    columns = [column for join in apart for column in join.columns]
    return select(*columns).select_from(source).where(_members.c.id == bindparam("member_id"))


def unpreparable_facts(session: Session, member_id: int) -> dict[str, Any]:
    """The facts `preparable_facts_select` leaves out, for one member, as plain SQL."""
    if all(j.preparable for j in segment_scores.FACT_JOINS):
        return {}
    row = session.execute(_unpreparable_statement(), {"member_id": member_id}).mappings().first()
    return dict(row) if row is not None else {}


def member_id_for(session: Session, external_id: str) -> tuple[int, int | None] | None:
    """(id, home_store_id) of the active member with this external id, or None."""
    row = session.execute(
        select(_members.c.id, _members.c.home_store_id).where(
            _members.c.external_id == external_id,
            _members.c.status == MemberStatus.ACTIVE.value,
        )
    ).first()
    return (int(row[0]), row[1]) if row is not None else None


def event_facts(event: Mapping[str, Any], region: str | None = None) -> dict[str, Any]:
    """Facts of a purchase in the shape of the events API (amount, store, channel, items...)."""
    amount = event.get("amount")
    return {
        "amount": Decimal(str(amount)) if amount is not None else None,
        "store": event.get("store"),
        "region": region,
        "channel": event.get("channel"),
        "occurred_at": event.get("occurred_at"),
        "items": list(event.get("items") or []),
    }


def store_region(session: Session, store_code: str) -> str | None:
    """The region code of a store (for event facts)."""
    return session.scalar(
        select(_regions.c.code)
        .select_from(_stores.join(_regions, _regions.c.id == _stores.c.region_id))
        .where(_stores.c.code == store_code)
    )
