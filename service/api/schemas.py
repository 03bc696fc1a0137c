"""Request and response schemas (marshmallow) shared by the blueprints."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from service.models import GENDERS, Role

EXTERNAL_ID = validate.Regexp(
    r"^[A-Za-z0-9][A-Za-z0-9._:@\-]{0,63}$",
    error="must be 1-64 letters, digits or . _ : @ - (starting with a letter or digit)",
)
STORE_CODE = validate.Regexp(
    r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$",
    error="must be 1-64 characters: letters, digits and . _ - ",
)
CURRENCY = validate.Regexp(r"^[A-Z]{3}$", error="must be an ISO 4217 code such as CNY")
PHONE = validate.Regexp(
    r"^\+?[0-9][0-9 \-]{4,30}$", error="must be a phone number like +8613812345678"
)
LOCALE = validate.Regexp(
    r"^[a-z]{2,3}(-[A-Z][a-z]{3})?(-[A-Z]{2})?$", error="must be a locale like zh-CN or en"
)
MAX_MONEY = Decimal("1000000000")

_ZONES: set[str] | None = None


def _zones() -> set[str]:
    global _ZONES
    if _ZONES is None:
        _ZONES = available_timezones()
    return _ZONES


class BaseSchema(Schema):
    """Unknown fields are errors: a typo in a field name must not be silently ignored."""

    class Meta:
        unknown = RAISE
        ordered = True


class Money(fields.Decimal):
    """An amount sent and returned as a decimal string with at most 2 places."""

    def __init__(self, *, allow_zero: bool = False, **kwargs: Any) -> None:
        super().__init__(as_string=True, allow_nan=False, **kwargs)
        self.allow_zero = allow_zero

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Decimal:
        if isinstance(value, float):
            raise ValidationError('send money as a decimal string such as "128.50", not a float')
        amount: Decimal = super()._deserialize(value, attr, data, **kwargs)
        exponent = amount.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -2:
            raise ValidationError("at most 2 decimal places")
        if amount < 0 or (amount == 0 and not self.allow_zero):
            raise ValidationError("must be 0 or more" if self.allow_zero else "must be more than 0")
        if amount >= MAX_MONEY:
            raise ValidationError("is implausibly large")
        return amount


class AwareDateTime(fields.AwareDateTime):
    """An ISO 8601 timestamp that must carry its offset (a till's local clock is ambiguous)."""

    default_error_messages = {  # noqa: RUF012 - marshmallow merges class dicts
        "invalid_awareness": "must include a time-zone offset, e.g. 2026-11-01T10:00:00+08:00",
        "invalid": "must be an ISO 8601 timestamp with offset, e.g. 2026-11-01T10:00:00+08:00",
    }


def validate_timezone(value: str) -> None:
    if value not in _zones():
        raise ValidationError("must be an IANA time zone such as Asia/Shanghai")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError("must be an IANA time zone such as Asia/Shanghai") from None


def validate_birth_date(value: date) -> None:
    if value < date(1900, 1, 1) or value > datetime.now(UTC).date():
        raise ValidationError("must be between 1900-01-01 and today")


class ConsentSchema(BaseSchema):
    email = fields.Boolean()
    sms = fields.Boolean()
    push = fields.Boolean()
    wechat = fields.Boolean()


class MemberFieldsSchema(BaseSchema):
    """Member fields a client may set; all optional so PATCH can send a subset."""

    name = fields.String(allow_none=True, validate=validate.Length(max=200))
    gender = fields.String(allow_none=True, validate=validate.OneOf(GENDERS))
    birth_date = fields.Date(allow_none=True, validate=validate_birth_date)
    phone = fields.String(allow_none=True, validate=PHONE)
    email = fields.Email(allow_none=True, validate=validate.Length(max=254))
    timezone = fields.String(validate=validate_timezone)
    locale = fields.String(validate=LOCALE)
    home_store = fields.String(allow_none=True, validate=STORE_CODE)
    consent = fields.Nested(ConsentSchema)
    tags = fields.List(
        fields.String(validate=validate.Length(min=1, max=64)), validate=validate.Length(max=50)
    )
    attributes = fields.Dict(keys=fields.String(validate=validate.Length(min=1, max=64)))

    @validates_schema
    def _bounded_attributes(self, data: dict[str, Any], **kwargs: Any) -> None:
        attrs = data.get("attributes")
        if attrs is None:
            return
        if len(attrs) > 50:
            raise ValidationError("at most 50 custom attributes", "attributes")
        for key, value in attrs.items():
            if not (value is None or isinstance(value, str | int | float | bool)):
                raise ValidationError(
                    f"attribute {key!r} must be a string, number, boolean or null", "attributes"
                )
        if len(json.dumps(attrs)) > 4096:
            raise ValidationError("custom attributes must fit in 4096 bytes of JSON", "attributes")


class MemberCreateSchema(MemberFieldsSchema):
    external_id = fields.String(required=True, validate=EXTERNAL_ID)


class MemberSchema(Schema):
    external_id = fields.String()
    name = fields.String(allow_none=True)
    gender = fields.String(allow_none=True)
    birth_date = fields.Date(allow_none=True)
    phone = fields.String(allow_none=True)
    email = fields.String(allow_none=True)
    timezone = fields.String()
    locale = fields.String()
    home_store = fields.String(allow_none=True)
    consent = fields.Dict(keys=fields.String(), values=fields.Boolean())
    tier = fields.String(allow_none=True)
    tags = fields.List(fields.String())
    attributes = fields.Dict()
    status = fields.String()
    created_at = fields.DateTime()
    updated_at = fields.DateTime()
    erased_at = fields.DateTime(allow_none=True)


class MemberListArgs(BaseSchema):
    store = fields.String(validate=STORE_CODE)
    region = fields.String(validate=validate.Length(min=1, max=64))
    tier = fields.String(validate=validate.Length(min=1, max=32))
    tag = fields.String(validate=validate.Length(min=1, max=64))
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))
    cursor = fields.String(validate=validate.Length(max=200))


class MemberPageSchema(Schema):
    items = fields.List(fields.Nested(MemberSchema))
    next_cursor = fields.String(allow_none=True)


class StatsSchema(Schema):
    first_purchase_at = fields.DateTime(allow_none=True)
    last_purchase_at = fields.DateTime(allow_none=True)
    purchase_count = fields.Integer()
    purchase_amount = fields.Decimal(as_string=True)
    refund_count = fields.Integer()
    refund_amount = fields.Decimal(as_string=True)
    net_spend = fields.Decimal(as_string=True)


class ScoreWindowsSchema(Schema):
    purchases_30d = fields.Integer()
    purchases_90d = fields.Integer()
    purchases_365d = fields.Integer()
    purchases_lifetime = fields.Integer()
    spend_30d = fields.Decimal(as_string=True)
    spend_90d = fields.Decimal(as_string=True)
    spend_365d = fields.Decimal(as_string=True)
    spend_lifetime = fields.Decimal(as_string=True)


class RfmScoresSchema(Schema):
    r = fields.Integer(allow_none=True)
    f = fields.Integer(allow_none=True)
    m = fields.Integer(allow_none=True)
    segment = fields.String(allow_none=True)
    segment_label = fields.String(allow_none=True)
    explanation = fields.List(fields.String())


class StageChangeSchema(Schema):
    changed_on = fields.Date()
    from_stage = fields.String(allow_none=True)
    to_stage = fields.String()


class LifecycleSchema(Schema):
    stage = fields.String(allow_none=True)
    since = fields.Date(allow_none=True)
    history = fields.List(fields.Nested(StageChangeSchema))


class ChurnSchema(Schema):
    p_alive = fields.Decimal(as_string=True, allow_none=True)
    expected_purchases_90d = fields.Decimal(as_string=True, allow_none=True)
    expected_value = fields.Decimal(as_string=True, allow_none=True)


class MemberScoresSchema(Schema):
    """Segmentation of the member as of the last refresh (windows are always current)."""

    as_of = fields.Date(allow_none=True)
    windows = fields.Nested(ScoreWindowsSchema)
    median_interpurchase_days = fields.Decimal(as_string=True, allow_none=True)
    purchase_days = fields.Integer()
    rfm = fields.Nested(RfmScoresSchema)
    lifecycle = fields.Nested(LifecycleSchema)
    churn = fields.Nested(ChurnSchema)


class TierChangeSchema(Schema):
    from_tier = fields.String(allow_none=True)
    to_tier = fields.String(allow_none=True)
    direction = fields.String(metadata={"description": "up or down"})
    reason = fields.String(metadata={"description": "purchase, review, campaign or manual"})
    transaction_id = fields.Integer(allow_none=True)
    campaign_id = fields.Integer(allow_none=True)
    changed_at = fields.DateTime()


class NextTierSchema(Schema):
    name = fields.String()
    min_spend_12m = fields.Decimal(as_string=True, allow_none=True)
    min_purchases_12m = fields.Integer(allow_none=True)
    spend_needed = fields.Decimal(
        as_string=True,
        allow_none=True,
        metadata={"description": "More spend over the rolling 12 months that would qualify."},
    )
    purchases_needed = fields.Integer(
        allow_none=True,
        metadata={"description": "Or this many more purchases (either one is enough)."},
    )


class TierProfileSchema(Schema):
    """The member's tier (campaigns/tiers.py): since, yearly review date, next tier, history."""

    current = fields.String(allow_none=True)
    rank = fields.Integer(allow_none=True)
    since = fields.DateTime(allow_none=True)
    review_on = fields.Date(allow_none=True)
    spend_12m = fields.Decimal(as_string=True)
    purchases_12m = fields.Integer()
    qualifies_for = fields.String(allow_none=True)
    next = fields.Nested(NextTierSchema, allow_none=True)
    history = fields.List(fields.Nested(TierChangeSchema))


class ProfileCouponSchema(Schema):
    code = fields.String()
    template = fields.String()
    name = fields.String()
    kind = fields.String()
    value = fields.String()
    face_value = fields.String()
    status = fields.String(metadata={"description": "issued, redeemed, void or expired"})
    valid_from = fields.String()
    valid_until = fields.String()
    issued_at = fields.String()
    redeemed_at = fields.String(allow_none=True)
    campaign_id = fields.Integer(allow_none=True)


class ProfileMessageSchema(Schema):
    id = fields.Integer()
    campaign_id = fields.Integer(allow_none=True)
    template = fields.String()
    channel = fields.String(allow_none=True)
    kind = fields.String()
    status = fields.String()
    reason = fields.String(allow_none=True)
    not_before = fields.DateTime()
    sent_at = fields.DateTime(allow_none=True)
    created_at = fields.DateTime()


class ProfileSchema(Schema):
    member = fields.Nested(MemberSchema)
    stats = fields.Nested(StatsSchema)
    scores = fields.Nested(MemberScoresSchema)
    tier = fields.Nested(TierProfileSchema)
    coupons = fields.List(
        fields.Nested(ProfileCouponSchema),
        metadata={"description": "The member's latest 50 coupons, newest first."},
    )
    messages = fields.List(
        fields.Nested(ProfileMessageSchema),
        metadata={"description": "The member's latest 20 messages with delivery status."},
    )
    decisions = fields.List(
        fields.Dict(),
        metadata={
            "description": "The latest 10 campaign decisions (GET .../decisions has them all)."
        },
    )


class ErasureSchema(BaseSchema):
    reason = fields.String(validate=validate.Length(max=500))


class StoreCreateSchema(BaseSchema):
    code = fields.String(required=True, validate=STORE_CODE)
    name = fields.String(required=True, validate=validate.Length(min=1, max=200))
    region = fields.String(required=True, validate=STORE_CODE)


class StoreSchema(Schema):
    code = fields.String()
    name = fields.String()
    region = fields.String()
    created_at = fields.DateTime()


class StoreListArgs(BaseSchema):
    region = fields.String(validate=STORE_CODE)


class StoreListSchema(Schema):
    items = fields.List(fields.Nested(StoreSchema))


class LineItemSchema(BaseSchema):
    sku = fields.String(required=True, validate=validate.Length(min=1, max=64))
    category = fields.String(validate=validate.Length(min=1, max=64))
    quantity = fields.Integer(load_default=1, validate=validate.Range(min=1, max=100_000))
    amount = Money(required=True, allow_zero=True)


class EventSchema(BaseSchema):
    member_id = fields.String(required=True, validate=EXTERNAL_ID)
    transaction_id = fields.String(required=True, validate=EXTERNAL_ID)
    amount = Money(required=True)
    currency = fields.String(required=True, validate=CURRENCY)
    store = fields.String(required=True, validate=STORE_CODE)
    channel = fields.String(required=True, validate=validate.OneOf(["pos", "ecom"]))
    occurred_at = AwareDateTime(required=True)
    items = fields.List(fields.Nested(LineItemSchema), validate=validate.Length(max=500))

    @validates_schema
    def _not_in_future(self, data: dict[str, Any], **kwargs: Any) -> None:
        occurred = data.get("occurred_at")
        # A day of slack for till clocks; later than that is a data error.
        if occurred is not None and occurred > datetime.now(UTC) + timedelta(days=1):
            raise ValidationError("must not be in the future", "occurred_at")


class PurchaseSchema(EventSchema):
    # A fully discounted sale (gift, voucher) is still a visit that counts.
    amount = Money(required=True, allow_zero=True)


class RefundSchema(EventSchema):
    original_transaction_id = fields.String(required=True, validate=EXTERNAL_ID)


class IdempotencyHeaderSchema(Schema):
    class Meta:
        unknown = "exclude"

    idempotency_key = fields.String(
        data_key="Idempotency-Key", validate=validate.Length(min=1, max=200)
    )


class EventResponseSchema(Schema):
    class Meta:
        unknown = "include"

    transaction_id = fields.String()
    kind = fields.String()
    member_id = fields.String()
    amount = fields.String()
    currency = fields.String()
    occurred_at = fields.String()
    original_transaction_id = fields.String()
    refundable_remaining = fields.String()
    member = fields.Dict()
    rewards = fields.Dict()


ROLES = [r.value for r in Role]
