"""What a campaign is: the definition a marketer saves, checked field by field.

The marshmallow schema checks shapes and ranges; `check_references` checks what the
definition names against the database (rules, segments, coupon templates, message
templates, tiers, calendar names) so a campaign can never be saved pointing at
something that does not exist. Both report errors keyed by the field's path.
"""

from __future__ import annotations

import re
from datetime import datetime, time
from decimal import Decimal
from typing import Any

from marshmallow import (
    EXCLUDE,
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    validate,
    validates_schema,
)

from campaigns.channels.config import CHANNELS

KINDS = ("coupon", "tier_upgrade", "win_back", "birthday", "custom")
TRIGGERS = ("purchase", "signup", "tier_change", "segment_entry", "schedule", "calendar")
# Triggers evaluated inside a request for one member; the others run set-based.
EVENT_TRIGGERS = frozenset({"purchase", "signup", "tier_change"})
BATCH_TRIGGERS = frozenset({"schedule", "calendar", "segment_entry"})
CAP_PERIODS = ("evaluation", "day", "week", "month", "year", "lifetime")
EXCLUSIVITY_PERIODS = ("day", "week", "month", "year")
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,99}$")


def _local_time(value: str) -> time:
    try:
        return time.fromisoformat(value)
    except ValueError:
        raise ValidationError("must be a local time HH:MM") from None


class _Strict(Schema):
    class Meta:
        unknown = RAISE


class TriggerSchema(_Strict):
    type = fields.String(required=True, validate=validate.OneOf(TRIGGERS))
    # schedule: daily at a local time (PATRON_TIMEZONE), or a cron expression
    daily_at = fields.String(validate=_local_time)
    cron = fields.String(validate=validate.Length(min=9, max=100))
    # calendar: holiday / solar-term names (campaigns/calendar_dates.py), at a local time
    dates = fields.List(fields.String(validate=validate.Length(min=1, max=100)))
    at = fields.String(validate=_local_time)
    # segment_entry: the custom segment whose entrants are targeted
    segment = fields.String(validate=validate.Length(min=1, max=100))
    # tier_change: only upgrades to this tier (any upgrade when absent)
    to = fields.String(validate=validate.Length(min=1, max=32))

    @validates_schema
    def _shape(self, data: dict[str, Any], **_: Any) -> None:
        kind = data.get("type")
        errors: dict[str, list[str]] = {}
        if kind == "schedule":
            if ("daily_at" in data) == ("cron" in data):
                errors["daily_at"] = ["a schedule needs exactly one of daily_at or cron"]
            elif "cron" in data:
                from croniter import croniter

                if not croniter.is_valid(data["cron"]):
                    errors["cron"] = [f"not a valid cron expression: {data['cron']!r}"]
        if kind == "calendar" and not data.get("dates"):
            errors["dates"] = ["a calendar trigger needs at least one holiday or solar term"]
        if kind == "segment_entry" and not data.get("segment"):
            errors["segment"] = ["a segment_entry trigger names the segment"]
        allowed = {
            "schedule": {"daily_at", "cron"},
            "calendar": {"dates", "at"},
            "segment_entry": {"segment"},
            "tier_change": {"to"},
        }.get(kind or "", set())
        for key in set(data) - allowed - {"type"}:
            errors[key] = [f"not used by a {kind} trigger"]
        if errors:
            raise ValidationError(errors)


class AudienceSchema(_Strict):
    segments = fields.List(fields.String(validate=validate.Length(min=1, max=100)))
    stores = fields.List(fields.String(validate=validate.Length(min=1, max=32)))
    regions = fields.List(fields.String(validate=validate.Length(min=1, max=32)))


class CouponActionSchema(_Strict):
    template = fields.String(required=True, validate=validate.Length(min=1, max=64))


class TierActionSchema(_Strict):
    to = fields.String(required=True, validate=validate.Length(min=1, max=32))


class MessageActionSchema(_Strict):
    template = fields.String(required=True, validate=validate.Length(min=1, max=100))
    channel = fields.String(validate=validate.OneOf(CHANNELS), allow_none=True)
    kind = fields.String(
        load_default="marketing", validate=validate.OneOf(("marketing", "transactional"))
    )


class ActionsSchema(_Strict):
    coupon = fields.Nested(CouponActionSchema)
    tier = fields.Nested(TierActionSchema)
    message = fields.Nested(MessageActionSchema)

    @validates_schema
    def _some(self, data: dict[str, Any], **_: Any) -> None:
        if not data:
            raise ValidationError("a campaign needs at least one action: coupon, tier or message")


class BudgetSchema(_Strict):
    coupons = fields.Integer(validate=validate.Range(min=1, max=100_000_000), allow_none=True)
    value = fields.Decimal(
        places=2, as_string=True, validate=validate.Range(min=0), allow_none=True
    )


class CapSchema(_Strict):
    per = fields.String(required=True, validate=validate.OneOf(CAP_PERIODS))


class DefinitionSchema(_Strict):
    """A campaign definition as saved (POST creates version 1, PUT adds a version)."""

    name = fields.String(required=True, validate=validate.Regexp(NAME))
    kind = fields.String(required=True, validate=validate.OneOf(KINDS))
    description = fields.String(load_default="", validate=validate.Length(max=2000))
    trigger = fields.Nested(TriggerSchema, required=True)
    audience = fields.Nested(AudienceSchema, load_default=dict)
    # The rule language (JSON or text); member scope, or event scope for purchase triggers.
    condition = fields.Raw(allow_none=True, load_default=None)
    actions = fields.Nested(ActionsSchema, required=True)
    valid_from = fields.AwareDateTime(allow_none=True, load_default=None)
    valid_until = fields.AwareDateTime(allow_none=True, load_default=None)
    priority = fields.Integer(load_default=0, validate=validate.Range(min=0, max=1_000_000))
    exclusivity_group = fields.String(
        allow_none=True, load_default=None, validate=validate.Regexp(NAME)
    )
    exclusivity_period = fields.String(
        load_default="day", validate=validate.OneOf(EXCLUSIVITY_PERIODS)
    )
    cap = fields.Nested(CapSchema, load_default=lambda: {"per": "evaluation"})
    budget = fields.Nested(BudgetSchema, load_default=dict)
    holdout_percent = fields.Decimal(
        places=2, as_string=True, load_default=Decimal(0), validate=validate.Range(min=0, max=50)
    )
    # Reactivation window for the report's uplift and win-back success (days after decision).
    measure_days = fields.Integer(load_default=30, validate=validate.Range(min=1, max=365))

    @validates_schema
    def _consistent(self, data: dict[str, Any], **_: Any) -> None:
        start, end = data.get("valid_from"), data.get("valid_until")
        if start and end and end <= start:
            raise ValidationError({"valid_until": ["must be after valid_from"]})

    @post_load
    def _plain(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        return to_json(data)


def to_json(data: Any) -> Any:
    """The definition as stored in JSONB: decimals and times as strings."""
    if isinstance(data, dict):
        return {k: to_json(v) for k, v in data.items()}
    if isinstance(data, list):
        return [to_json(v) for v in data]
    if isinstance(data, Decimal):
        return str(data)
    if isinstance(data, datetime):
        return data.isoformat()
    return data


class DefinitionOutSchema(Schema):
    """The stored definition, returned as saved."""

    class Meta:
        unknown = EXCLUDE

    name = fields.String()
    kind = fields.String()
    description = fields.String()
    trigger = fields.Dict()
    audience = fields.Dict()
    condition = fields.Raw(allow_none=True)
    actions = fields.Dict()
    valid_from = fields.String(allow_none=True)
    valid_until = fields.String(allow_none=True)
    priority = fields.Integer()
    exclusivity_group = fields.String(allow_none=True)
    exclusivity_period = fields.String()
    cap = fields.Dict()
    budget = fields.Dict()
    holdout_percent = fields.String()
    measure_days = fields.Integer()


def load_definition(raw: Any) -> dict[str, Any]:
    """Validate a definition from any input path (API, CLI, demo); raises ValidationError."""
    result: dict[str, Any] = DefinitionSchema().load(raw)
    return result
