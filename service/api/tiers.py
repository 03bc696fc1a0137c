"""Tier ladder (`/v1/tiers`) and the calendar names campaigns trigger on (`/v1/calendar`)."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from campaigns import calendar_dates
from campaigns import tiers as tier_service
from service.api.schemas import BaseSchema, Money
from service.auth import current_principal, require
from service.db import unit_of_work
from service.errors import ValidationFailed
from service.models import Role

blp = Blueprint(
    "tiers",
    __name__,
    url_prefix="/v1",
    description=(
        "Loyalty tiers: the ladder and its qualification rule (spend OR purchases over the "
        "rolling 12 months; upgrades at once, downgrades one step at the yearly review). "
        "Also the calendar names (public holidays, 24 solar terms) campaigns can trigger on."
    ),
)

READERS = (Role.MARKETER, Role.APPROVER, Role.ANALYST, Role.POS)
CALENDAR_READERS = (Role.MARKETER, Role.APPROVER, Role.ANALYST)


class TierInputSchema(BaseSchema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=32))
    min_spend_12m = Money(
        allow_zero=True,
        allow_none=True,
        load_default=None,
        metadata={"description": "Spend over the rolling 12 months that qualifies (CNY)."},
    )
    min_purchases_12m = fields.Integer(
        allow_none=True,
        load_default=None,
        validate=validate.Range(min=1, max=1_000_000),
        metadata={"description": "Purchases over the rolling 12 months that qualify."},
    )


class LadderInputSchema(BaseSchema):
    tiers = fields.List(
        fields.Nested(TierInputSchema),
        required=True,
        metadata={"description": "The whole ladder, lowest tier first."},
    )
    renames = fields.Dict(
        keys=fields.String(validate=validate.Length(min=1, max=32)),
        values=fields.String(validate=validate.Length(min=1, max=32)),
        load_default=dict,
        metadata={"description": "Current tier name → its name in the new ladder."},
    )
    base_version = fields.Integer(
        validate=validate.Range(min=1),
        metadata={"description": "The version this edit started from (409 if no longer)."},
    )


class TierSchema(Schema):
    name = fields.String()
    rank = fields.Integer(metadata={"description": "1 is the lowest tier."})
    min_spend_12m = fields.Decimal(as_string=True, allow_none=True)
    min_purchases_12m = fields.Integer(allow_none=True)


class LadderSchema(Schema):
    version = fields.Integer()
    updated_at = fields.DateTime()
    updated_by = fields.String()
    rule = fields.String()
    tiers = fields.List(fields.Nested(TierSchema))


class CalendarArgs(BaseSchema):
    country = fields.String(
        load_default=calendar_dates.DEFAULT_COUNTRY,
        validate=validate.Regexp(r"^[A-Za-z]{2}$", error="must be an ISO 3166 code such as CN"),
    )


class CalendarNameSchema(Schema):
    name = fields.String(metadata={"description": "Canonical name to store in a campaign."})
    kind = fields.String(metadata={"description": "holiday or solar_term"})
    name_en = fields.String()
    name_zh = fields.String(allow_none=True)
    pinyin = fields.String()
    aliases = fields.List(fields.String())


class CalendarNameListSchema(Schema):
    country = fields.String()
    items = fields.List(fields.Nested(CalendarNameSchema))


class CalendarDatesArgs(CalendarArgs):
    name = fields.String(required=True, validate=validate.Length(min=1, max=100))
    year = fields.Integer(
        required=True,
        validate=validate.Range(min=calendar_dates.MIN_YEAR, max=calendar_dates.MAX_YEAR),
    )


class CalendarDatesSchema(Schema):
    name = fields.String()
    kind = fields.String()
    country = fields.String()
    year = fields.Integer()
    dates = fields.List(fields.Date())


def _country(country: str) -> str:
    try:
        return calendar_dates.check_country(country)
    except ValueError as exc:
        raise ValidationFailed(str(exc), errors={"country": [str(exc)]}) from None


@blp.route("/tiers")
class Tiers(MethodView):
    @require(*READERS)
    @blp.response(200, LadderSchema)
    def get(self) -> dict[str, Any]:
        """The tier ladder, lowest first, with its version and the qualification rule."""
        with unit_of_work() as session:
            return tier_service.ladder_dict(tier_service.ladder(session))

    @require()
    @blp.arguments(
        LadderInputSchema,
        example={
            "tiers": [
                {"name": "silver", "min_spend_12m": "2000.00", "min_purchases_12m": 4},
                {"name": "gold", "min_spend_12m": "8000.00", "min_purchases_12m": 12},
                {"name": "diamond", "min_spend_12m": "30000.00", "min_purchases_12m": 36},
            ]
        },
    )
    @blp.response(200, LadderSchema)
    @blp.alt_response(422, description="Invalid ladder: `errors.tiers.<index>.<field>`")
    @blp.alt_response(409, description="Members hold a dropped tier, or base_version is stale")
    def put(self, data: dict[str, Any]) -> dict[str, Any]:
        """Replace the whole ladder atomically (admin; audited). Members keep their tiers."""
        with unit_of_work() as session:
            found = tier_service.replace_ladder(
                session,
                data["tiers"],
                actor=current_principal().actor,
                renames=data["renames"],
                base_version=data.get("base_version"),
            )
            return tier_service.ladder_dict(found)


@blp.route("/calendar/names")
class CalendarNames(MethodView):
    @require(*CALENDAR_READERS)
    @blp.arguments(CalendarArgs, location="query")
    @blp.response(200, CalendarNameListSchema)
    @blp.doc(tags=["calendar"])
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """Every name a calendar-triggered campaign can use: public holidays, 24 solar terms."""
        country = _country(args["country"])
        return {"country": country, "items": calendar_dates.calendar_names(country)}


@blp.route("/calendar/dates")
class CalendarDates(MethodView):
    @require(*CALENDAR_READERS)
    @blp.arguments(CalendarDatesArgs, location="query")
    @blp.response(200, CalendarDatesSchema)
    @blp.doc(tags=["calendar"])
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """The dates of one holiday or solar term in a year (solar terms: China Standard Time)."""
        country = _country(args["country"])
        try:
            canonical = calendar_dates.validate_name(args["name"], country)
        except ValueError as exc:
            raise ValidationFailed(str(exc), errors={"name": [str(exc)]}) from None
        dates = calendar_dates.dates_for(canonical, args["year"], country)
        return {
            "name": canonical,
            "kind": calendar_dates.kind_of(canonical, country),
            "country": country,
            "year": args["year"],
            "dates": dates,
        }
