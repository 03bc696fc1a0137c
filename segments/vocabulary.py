"""Rule fields of segmentation: rolling windows, RFM, lifecycle, churn scores, age band.

`register(vocab)` is listed in `service.vocabulary.CONTRIBUTORS`; `FACT_JOINS` tells
`service.vocabulary.load_member_facts` how to read the same values for the Python
compiler, so both compilers see one definition.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

from sqlalchemy import case, func
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.expression import FromClause

from rules import Field, FieldType, LeapDay, Scope, SqlContext, Vocabulary
from rules.calendar import age_on, local_today, sql_age
from rules.vocabulary import SqlSource
from segments.models import MemberPrediction, MemberScore, RfmSegment, Stage
from service.models import Member, MemberStats

_members = Member.__table__
_stats = MemberStats.__table__
_scores = MemberScore.__table__
_predictions = MemberPrediction.__table__

STATS = "stats"  # the foundation's name for the member_stats join
SCORES = "scores"
PREDICTIONS = "predictions"  # member_predictions, the churn fields

# Completed years -> band; the upper bound is inclusive, the last band is open.
AGE_BANDS: tuple[tuple[str, int | None], ...] = (
    ("under_18", 17),
    ("18_24", 24),
    ("25_34", 34),
    ("35_44", 44),
    ("45_54", 54),
    ("55_64", 64),
    ("65_plus", None),
)


def age_band(age: int | None) -> str | None:
    """The band of an age in completed years (None without a birth date)."""
    if age is None:
        return None
    for name, upper in AGE_BANDS:
        if upper is None or age <= upper:
            return name
    return None  # pragma: no cover - the last band is open


class FactJoin(NamedTuple):
    """A table LEFT JOINed to members for the facts, with labelled columns and zeros."""

    table: FromClause
    onclause: ColumnElement[bool]
    columns: tuple[ColumnElement[Any], ...]
    # The rule vocabulary's SQL join of the same table: fields joining it read these facts.
    sql_join: str
    # False for a table replaced whole by a swap (see segments.predict.swap_predictions):
    # no server-side prepared statement may read it, so the purchase path reads it apart.
    preparable: bool = True


FACT_JOINS = (
    FactJoin(
        _scores,
        _scores.c.member_id == _members.c.id,
        (
            _scores.c.r.label("rfm_r"),
            _scores.c.f.label("rfm_f"),
            _scores.c.m.label("rfm_m"),
            _scores.c.rfm_segment.label("rfm_segment"),
            _scores.c.lifecycle_stage.label("lifecycle_stage"),
        ),
        SCORES,
    ),
    # Joined to members, not to member_scores: churn may run before a new member's first
    # lifecycle row exists (the steps run side by side).
    FactJoin(
        _predictions,
        _predictions.c.member_id == _members.c.id,
        (
            _predictions.c.p_alive.label("churn_p_alive"),
            _predictions.c.expected_purchases_90d.label("churn_expected_purchases_90d"),
            _predictions.c.expected_value.label("churn_expected_value"),
        ),
        PREDICTIONS,
        preparable=False,
    ),
)
# The window columns live on member_stats: read by the foundation's facts query.
WINDOW_FACTS: tuple[str, ...] = (
    "purchases_30d",
    "purchases_90d",
    "purchases_365d",
    "spend_30d",
    "spend_90d",
    "spend_365d",
    "median_interpurchase_days",
)
WINDOW_ZEROS: dict[str, Any] = {
    "purchases_30d": 0,
    "purchases_90d": 0,
    "purchases_365d": 0,
    "spend_30d": Decimal(0),
    "spend_90d": Decimal(0),
    "spend_365d": Decimal(0),
}


class ScoredMemberSource:
    """The foundation's member source, plus LEFT JOINs of member_scores / member_predictions
    when a rule needs them."""

    def __init__(self, base: SqlSource) -> None:
        self.base = base

    def id_column(self) -> ColumnElement[Any]:
        return self.base.id_column()

    def from_clause(self, joins: Collection[str]) -> FromClause:
        source = self.base.from_clause(joins)
        if SCORES in joins:
            source = source.outerjoin(_scores, _scores.c.member_id == _members.c.id)
        if PREDICTIONS in joins:
            source = source.outerjoin(_predictions, _predictions.c.member_id == _members.c.id)
        return source

    def where(self) -> ColumnElement[bool] | None:
        return self.base.where()


def _col(column: ColumnElement[Any]) -> Callable[[SqlContext], ColumnElement[Any]]:
    return lambda ctx: column


def _zero(column: ColumnElement[Any]) -> Callable[[SqlContext], ColumnElement[Any]]:
    return lambda ctx: func.coalesce(column, 0)


def _age_band_sql(ctx: SqlContext) -> ColumnElement[Any]:
    today = ctx.local_date(func.coalesce(_members.c.timezone, "UTC"), "timezone")
    age = sql_age(_members.c.birth_date, today)
    whens = [(age <= upper, name) for name, upper in AGE_BANDS if upper is not None]
    return case((_members.c.birth_date.is_(None), None), *whens, else_=AGE_BANDS[-1][0])


def _age_band_py(facts: Mapping[str, Any], now: datetime) -> str | None:
    birth = facts.get("birth_date")
    if birth is None:
        return None
    return age_band(age_on(birth, local_today(facts.get("timezone"), now)))


def fields() -> list[Field]:
    """The segmentation fields."""
    s, sc, pr = _stats.c, _scores.c, _predictions.c
    out: list[Field] = []
    for n in (30, 90, 365):
        out.append(
            Field(
                f"purchases_{n}d",
                FieldType.INTEGER,
                sql=_zero(s[f"purchases_{n}d"]),
                joins=(STATS,),
                nullable=False,
                group="statistics",
                example=f"purchases_{n}d >= 2",
                description=f"Purchases in the last {n} days (local days, today included).",
            )
        )
        out.append(
            Field(
                f"spend_{n}d",
                FieldType.MONEY,
                sql=_zero(s[f"spend_{n}d"]),
                joins=(STATS,),
                nullable=False,
                group="statistics",
                example=f"spend_{n}d > 1000",
                description=f"Spend on the purchases of the last {n} days, net of their refunds.",
            )
        )
    out.append(
        Field(
            "median_interpurchase_days",
            FieldType.DECIMAL,
            sql=_col(s.median_interpurchase_days),
            joins=(STATS,),
            group="statistics",
            example="median_interpurchase_days <= 30",
            description="Median days between consecutive purchase days; missing with fewer "
            "than two purchase days (updated by the daily refresh).",
        )
    )
    for dim, label in (("r", "recency"), ("f", "frequency"), ("m", "monetary")):
        out.append(
            Field(
                f"rfm.{dim}",
                FieldType.INTEGER,
                key=f"rfm_{dim}",
                sql=_col(sc[dim]),
                joins=(SCORES,),
                bounds=(1, 5),
                group="rfm",
                example=f"rfm.{dim} >= 4",
                description=f"RFM {label} score 1-5 (5 best); missing when the member did not "
                "buy in the look-back window.",
            )
        )
    out += [
        Field(
            "rfm.segment",
            FieldType.ENUM,
            key="rfm_segment",
            values=tuple(s.value for s in RfmSegment),
            sql=_col(sc.rfm_segment),
            joins=(SCORES,),
            group="rfm",
            example='rfm.segment in ("champions", "loyal")',
            description="Named RFM segment from the configured (R, FM) grid.",
        ),
        Field(
            "lifecycle.stage",
            FieldType.ENUM,
            key="lifecycle_stage",
            values=tuple(s.value for s in Stage),
            sql=_col(sc.lifecycle_stage),
            joins=(SCORES,),
            group="lifecycle",
            example='lifecycle.stage = "at_risk"',
            description="Lifecycle stage as of the last refresh.",
        ),
        Field(
            "churn.p_alive",
            FieldType.DECIMAL,
            key="churn_p_alive",
            sql=_col(pr.p_alive),
            joins=(PREDICTIONS,),
            group="churn",
            example="churn.p_alive < 0.3",
            description="BG/NBD probability that the member is still active (0-1).",
        ),
        Field(
            "churn.expected_purchases_90d",
            FieldType.DECIMAL,
            key="churn_expected_purchases_90d",
            sql=_col(pr.expected_purchases_90d),
            joins=(PREDICTIONS,),
            group="churn",
            example="churn.expected_purchases_90d >= 1",
            description="BG/NBD expected purchase days in the next 90 days.",
        ),
        Field(
            "churn.expected_value",
            FieldType.MONEY,
            key="churn_expected_value",
            sql=_col(pr.expected_value),
            joins=(PREDICTIONS,),
            group="churn",
            example="churn.expected_value > 500",
            description="Expected spend in the next 90 days: expected purchases x the "
            "Gamma-Gamma expected spend per purchase.",
        ),
        Field(
            "age_band",
            FieldType.ENUM,
            values=tuple(name for name, _ in AGE_BANDS),
            sql=_age_band_sql,
            py=_age_band_py,
            group="profile",
            example='age_band in ("25_34", "35_44")',
            description="Age band from completed years today in the member's time zone.",
        ),
    ]
    return out


def register(vocab: Vocabulary) -> None:
    """Register the segmentation fields and add the score joins to the member source."""
    vocab.register(*fields())
    from segments.config import ScoringConfig

    apply_leap_day_policy(vocab, ScoringConfig.from_env().leap_day)
    base = vocab.source(Scope.MEMBER)
    if base is not None and not isinstance(base, ScoredMemberSource):
        vocab.set_source(Scope.MEMBER, ScoredMemberSource(base))


def apply_leap_day_policy(vocab: Vocabulary, policy: str) -> None:
    """Keep 29 February birthdays on 28 Feb or 1 Mar in common years (the birth_date field)."""
    field = vocab.get("birth_date")
    if field is not None and field.leap_day.value != policy:
        vocab.register(dataclasses.replace(field, leap_day=LeapDay(policy)), replace=True)
