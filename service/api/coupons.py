"""Coupons over HTTP: templates, bulk codes, validate / redeem / roll back at the till."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any

from flask import Response, current_app, stream_with_context
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import Schema, ValidationError, fields, validate
from rq import Queue

from campaigns import coupons
from campaigns.models_coupons import CouponKind
from segments.config import ScoringConfig
from service.api.schemas import (
    CURRENCY,
    EXTERNAL_ID,
    STORE_CODE,
    AwareDateTime,
    BaseSchema,
    Money,
    validate_timezone,
)
from service.audit import record as audit
from service.auth import current_principal, require
from service.db import get_db, unit_of_work
from service.errors import ValidationFailed
from service.models import Role
from service.redis_client import get_redis

blp = Blueprint(
    "coupons",
    __name__,
    url_prefix="/v1/coupons",
    description=(
        "Coupon templates, bulk bearer codes, and the till's validate / redeem / roll back. "
        "Redemption needs an `Idempotency-Key`: a retry returns the first answer and never "
        "consumes twice. See docs/api.md#coupons."
    ),
)

READERS = (Role.MARKETER, Role.APPROVER, Role.ANALYST, Role.POS)
WRITERS = (Role.MARKETER,)
TILL = (Role.POS,)
TEMPLATE_CODE = validate.Regexp(
    r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$",
    error="must be 1-64 letters, digits or . _ - (starting with a letter or digit)",
)


class Percent(fields.Decimal):
    """A percentage as a decimal string, more than 0 and at most 100, 2 places."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(as_string=True, allow_nan=False, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Decimal:
        if isinstance(value, float):
            raise ValidationError('send a decimal string such as "15" or "12.5", not a float')
        pct: Decimal = super()._deserialize(value, attr, data, **kwargs)
        exponent = pct.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -2:
            raise ValidationError("at most 2 decimal places")
        if not Decimal(0) < pct <= Decimal(100):
            raise ValidationError("must be more than 0 and at most 100")
        return pct


class HourMinute(fields.Field):
    """Local time of day as "HH:MM"."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> time:
        if not isinstance(value, str) or len(value) != 5 or value[2] != ":":
            raise ValidationError('must be a time of day "HH:MM", e.g. "17:30"')
        try:
            return time(int(value[:2]), int(value[3:]))
        except ValueError:
            raise ValidationError('must be a time of day "HH:MM", e.g. "17:30"') from None

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return value


class TemplateCreateSchema(BaseSchema):
    code = fields.String(
        required=True,
        validate=TEMPLATE_CODE,
        metadata={"description": "Marketer-chosen name, unique, never changed (e.g. BDAY-50)."},
    )
    name = fields.String(required=True, validate=validate.Length(min=1, max=200))
    description = fields.String(load_default="", validate=validate.Length(max=2000))
    kind = fields.String(required=True, validate=validate.OneOf([k.value for k in CouponKind]))
    percent_off = Percent(metadata={"description": 'kind percent: e.g. "15" for 15% off'})
    amount_off = Money(metadata={"description": "kind amount: the amount taken off"})
    free_item_sku = fields.String(
        validate=validate.Length(min=1, max=64), metadata={"description": "kind free_item"}
    )
    face_value = Money(
        metadata={
            "description": "What one coupon is worth against a campaign budget and the most "
            "it can discount: the cap for percent (required), the item's value for free_item "
            "(required); equals amount_off for amount (may be left out)."
        }
    )
    currency = fields.String(validate=CURRENCY)
    min_spend = Money(allow_zero=True, load_default=Decimal("0"))
    valid_days = fields.Integer(
        validate=validate.Range(min=1, max=3660),
        metadata={"description": "Local calendar days from the day of issue (inclusive)."},
    )
    valid_from = AwareDateTime()
    valid_until = AwareDateTime(metadata={"description": "Exclusive end of a fixed window."})
    timezone = fields.String(
        validate=validate_timezone,
        metadata={"description": "Zone of local days and hours (default PATRON_TIMEZONE)."},
    )
    weekdays = fields.List(
        fields.Integer(validate=validate.Range(min=1, max=7)),
        validate=validate.Length(min=1, max=7),
        metadata={"description": "ISO weekdays on which it is valid: 1 = Monday … 7 = Sunday."},
    )
    hours_from = HourMinute(metadata={"description": "Local HH:MM, inclusive."})
    hours_until = HourMinute(
        metadata={"description": "Local HH:MM, exclusive; before hours_from = overnight."}
    )
    stores = fields.List(
        fields.String(validate=STORE_CODE),
        validate=validate.Length(min=1, max=1000),
        metadata={"description": "Store codes where it is valid (with regions: either)."},
    )
    regions = fields.List(
        fields.String(validate=STORE_CODE),
        validate=validate.Length(min=1, max=100),
        metadata={"description": "Region codes where it is valid; both absent = everywhere."},
    )


class TemplateSchema(Schema):
    code = fields.String()
    name = fields.String()
    description = fields.String()
    kind = fields.String()
    value = fields.String()
    percent_off = fields.String(allow_none=True)
    amount_off = fields.String(allow_none=True)
    free_item_sku = fields.String(allow_none=True)
    face_value = fields.String()
    currency = fields.String()
    min_spend = fields.String()
    valid_days = fields.Integer(allow_none=True)
    valid_from = fields.String(allow_none=True)
    valid_until = fields.String(allow_none=True)
    timezone = fields.String()
    weekdays = fields.List(fields.Integer(), allow_none=True)
    hours_from = fields.String(allow_none=True)
    hours_until = fields.String(allow_none=True)
    stores = fields.List(fields.String(), allow_none=True)
    regions = fields.List(fields.String(), allow_none=True)
    archived = fields.Boolean()
    created_at = fields.String()
    created_by = fields.String()


class TemplateListArgs(BaseSchema):
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    cursor = fields.String(validate=validate.Length(max=200))
    include_archived = fields.Boolean(load_default=False)


class TemplatePageSchema(Schema):
    items = fields.List(fields.Nested(TemplateSchema))
    next_cursor = fields.String(allow_none=True)


class OptionalKeySchema(Schema):
    class Meta:
        unknown = "exclude"

    idempotency_key = fields.String(
        data_key="Idempotency-Key", validate=validate.Length(min=1, max=200)
    )


class RequiredKeySchema(Schema):
    class Meta:
        unknown = "exclude"

    idempotency_key = fields.String(
        data_key="Idempotency-Key", required=True, validate=validate.Length(min=1, max=200)
    )


class BatchCreateSchema(BaseSchema):
    count = fields.Integer(required=True, validate=validate.Range(min=1, max=10_000_000))
    label = fields.String(load_default="", validate=validate.Length(max=200))


class BatchSchema(Schema):
    id = fields.Integer()
    template = fields.String()
    requested = fields.Integer()
    generated = fields.Integer()
    status = fields.String(metadata={"description": "pending until the codes exist, then done"})
    label = fields.String()
    created_at = fields.String()
    created_by = fields.String()
    finished_at = fields.String(allow_none=True)
    job_id = fields.String(allow_none=True)


class TillSchema(BaseSchema):
    code = fields.String(
        required=True,
        validate=validate.Length(min=1, max=64),
        metadata={"description": "As typed or scanned: case, spaces and dashes do not matter."},
    )
    member_id = fields.String(
        validate=EXTERNAL_ID,
        metadata={"description": "The member's external id; required for a member's coupon."},
    )
    store = fields.String(required=True, validate=STORE_CODE)
    order_amount = Money(required=True, allow_zero=True)
    currency = fields.String(validate=CURRENCY)


class ValidateSchema(TillSchema):
    at = AwareDateTime(metadata={"description": "The moment to check for (default: now)."})


class RedeemSchema(TillSchema):
    transaction_id = fields.String(
        validate=EXTERNAL_ID, metadata={"description": "The POS sale this coupon is used on."}
    )


class ValidationResultSchema(Schema):
    class Meta:
        unknown = "include"

    code = fields.String()
    valid = fields.Boolean()
    reason = fields.String(
        allow_none=True,
        metadata={
            "description": "mistyped, unknown, void, already_used, member_required, "
            "other_member, not_yet_valid, expired, wrong_store, wrong_weekday, wrong_hour, "
            "min_spend_not_met"
        },
    )
    detail = fields.String()
    discount = fields.String(allow_none=True)
    checked_at = fields.String()
    coupon = fields.Dict(allow_none=True)


class RedemptionSchema(Schema):
    redemption_id = fields.Integer()
    status = fields.String(metadata={"description": "redeemed or rolled_back"})
    code = fields.String()
    template = fields.String()
    name = fields.String()
    kind = fields.String()
    value = fields.String()
    coupon_status = fields.String()
    discount = fields.String()
    order_amount = fields.String()
    currency = fields.String()
    member_id = fields.String(allow_none=True)
    store = fields.String()
    transaction_id = fields.String(allow_none=True)
    redeemed_at = fields.String()
    rolled_back_at = fields.String(allow_none=True)
    rollback_reason = fields.String(allow_none=True)


class RollbackSchema(BaseSchema):
    reason = fields.String(
        load_default="refund",
        validate=validate.OneOf(["refund", "void"]),
        metadata={"description": "refund (goods returned) or void (sale cancelled)"},
    )


class CouponSchema(Schema):
    code = fields.String()
    template = fields.String()
    name = fields.String()
    kind = fields.String()
    value = fields.String()
    face_value = fields.String()
    min_spend = fields.String()
    status = fields.String(metadata={"description": "issued, redeemed or void"})
    member_id = fields.String(allow_none=True, metadata={"description": "None: bearer code"})
    campaign_id = fields.Integer(allow_none=True)
    batch_id = fields.Integer(allow_none=True)
    valid_from = fields.String()
    valid_until = fields.String()
    issued_at = fields.String()
    redeemed_at = fields.String(allow_none=True)
    voided_at = fields.String(allow_none=True)


_OPTIONAL_KEY = OptionalKeySchema()
_REQUIRED_KEY = RequiredKeySchema()
_REDEEM = RedeemSchema()
_VALIDATE = ValidateSchema()


def _now() -> datetime:
    return datetime.now(UTC)


def _currency() -> str:
    currency: str = current_app.config["PATRON"].currency
    return currency


def _check_currency(data: dict[str, Any]) -> None:
    expected = _currency()
    if data.get("currency", expected) != expected:
        raise ValidationFailed(
            f"this deployment records amounts in {expected}",
            errors={"currency": [f"must be {expected}"]},
        )


@blp.route("/templates")
class Templates(MethodView):
    @require(*READERS)
    @blp.arguments(TemplateListArgs, location="query")
    @blp.response(200, TemplatePageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """Coupon templates in creation order, paginated by cursor."""
        with unit_of_work() as session:
            items, cursor = coupons.list_templates(
                session,
                cursor=args.get("cursor"),
                limit=args["limit"],
                include_archived=args["include_archived"],
            )
        return {"items": [coupons.template_dict(t) for t in items], "next_cursor": cursor}

    @require(*WRITERS)
    @blp.arguments(
        TemplateCreateSchema,
        examples={
            "amount": {
                "value": {
                    "code": "BDAY-50",
                    "name": "Birthday 50 off",
                    "kind": "amount",
                    "amount_off": "50.00",
                    "min_spend": "200.00",
                    "valid_days": 30,
                }
            },
            "percent": {
                "value": {
                    "code": "WINBACK-15",
                    "name": "15% off, up to 100",
                    "kind": "percent",
                    "percent_off": "15",
                    "face_value": "100.00",
                    "valid_days": 14,
                    "weekdays": [1, 2, 3, 4],
                    "hours_from": "10:00",
                    "hours_until": "17:00",
                    "regions": ["East"],
                }
            },
        },
    )
    @blp.response(201, TemplateSchema)
    def post(self, data: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """Create a coupon template (immutable afterwards: create a new one to change terms)."""
        with unit_of_work() as session:
            template = coupons.create_template(
                session,
                data,
                actor=current_principal().actor,
                default_timezone=ScoringConfig.from_env().timezone,
                currency=_currency(),
            )
        return coupons.template_dict(template), 201


@blp.route("/templates/<string:code>")
class TemplateByCode(MethodView):
    @require(*READERS)
    @blp.response(200, TemplateSchema)
    def get(self, code: str) -> dict[str, Any]:
        """One coupon template."""
        with unit_of_work() as session:
            return coupons.template_dict(coupons.require_template(session, code))

    @require(*WRITERS)
    @blp.response(200, TemplateSchema)
    def delete(self, code: str) -> dict[str, Any]:
        """Archive: no more coupons are issued from it; issued ones stay usable."""
        with unit_of_work() as session:
            template = coupons.archive_template(session, code, actor=current_principal().actor)
        return coupons.template_dict(template)


@blp.route("/templates/<string:code>/batches")
class Batches(MethodView):
    @require(*WRITERS)
    @blp.arguments(_OPTIONAL_KEY, location="headers")
    @blp.arguments(BatchCreateSchema, example={"count": 5000, "label": "Flyer, March"})
    @blp.response(201, BatchSchema)
    @blp.alt_response(202, schema=BatchSchema, description="Large batch: generated by a job")
    def post(
        self, headers: dict[str, Any], data: dict[str, Any], code: str
    ) -> tuple[dict[str, Any], int]:
        """Generate bearer codes (redeemable by anyone). Up to 10,000 are generated in the
        request (201); bigger batches by a background job (202, poll the batch). The same
        Idempotency-Key returns the same batch."""
        actor = current_principal().actor
        with unit_of_work() as session:
            batch, _created = coupons.create_batch(
                session,
                code,
                data["count"],
                actor=actor,
                label=data["label"],
                idempotency_key=headers.get("idempotency_key"),
            )
            if batch["status"] == "pending" and batch["requested"] <= coupons.INLINE_BATCH_MAX:
                batch = coupons.fill_batch(session, batch["id"])
        if batch["status"] == "done":
            return {**batch, "job_id": None}, 201
        # Enqueued after the batch row committed; a repeat only re-enqueues an idempotent job.
        queue = Queue(current_app.config["PATRON"].queue_name, connection=get_redis())
        job = queue.enqueue(
            coupons.fill_batch_job, batch["id"], job_timeout=1800, meta={"kind": "coupons.batch"}
        )
        return {**batch, "job_id": job.id}, 202


@blp.route("/batches/<int:batch_id>")
class BatchById(MethodView):
    @require(Role.MARKETER, Role.ANALYST)
    @blp.response(200, BatchSchema)
    def get(self, batch_id: int) -> dict[str, Any]:
        """A batch of bearer codes and whether its codes exist yet."""
        with unit_of_work() as session:
            return {**coupons.get_batch(session, batch_id), "job_id": None}


@blp.route("/batches/<int:batch_id>/codes")
class BatchCodes(MethodView):
    @require(Role.MARKETER)
    @blp.response(200, description="text/csv, one code per line (display form)")
    def get(self, batch_id: int) -> Response:
        """Download a batch's codes as CSV (streamed). Audited: bearer codes are money."""
        actor = current_principal().actor
        with unit_of_work() as session:
            batch = coupons.get_batch(session, batch_id)
            audit(session, actor, "coupon_batch.exported", "coupon_batch", str(batch_id))
        if batch["status"] != "done":
            raise ValidationFailed(
                "the batch's codes are still being generated",
                errors={"batch": ["pending: try again when its status is done"]},
            )

        def rows() -> Iterator[str]:
            yield "code\n"
            with get_db().unit_of_work() as session:
                lines: list[str] = []
                for code in coupons.batch_codes(session, batch_id):
                    lines.append(code)
                    if len(lines) >= 5000:
                        yield "\n".join(lines) + "\n"
                        lines.clear()
                if lines:
                    yield "\n".join(lines) + "\n"

        resp = Response(stream_with_context(rows()), mimetype="text/csv")
        resp.headers["Content-Disposition"] = f'attachment; filename="coupons-{batch_id}.csv"'
        return resp


@blp.route("/validate")
class Validate(MethodView):
    @require(*TILL)
    @blp.arguments(
        _VALIDATE,
        example={
            "code": "K7QX-M4TB-9ZRD-2HWA",
            "member_id": "M0000001",
            "store": "S001",
            "order_amount": "268.00",
        },
    )
    @blp.response(200, ValidationResultSchema)
    def post(self, data: dict[str, Any]) -> dict[str, Any]:
        """Would this coupon be accepted now (or at `at`)? Changes nothing; when not, says why."""
        _check_currency(data)
        with unit_of_work() as session:
            return coupons.validate_coupon(
                session,
                code=data["code"],
                member=data.get("member_id"),
                store=data["store"],
                order_amount=data["order_amount"],
                at=data.get("at") or _now(),
                scope_store_id=current_principal().store_id,
            )


@blp.route("/redemptions")
class Redemptions(MethodView):
    @require(*TILL)
    @blp.arguments(_REQUIRED_KEY, location="headers")
    @blp.arguments(
        _REDEEM,
        example={
            "code": "K7QX-M4TB-9ZRD-2HWA",
            "member_id": "M0000001",
            "store": "S001",
            "order_amount": "268.00",
            "transaction_id": "POS-20261101-0042",
        },
    )
    @blp.response(201, RedemptionSchema)
    @blp.alt_response(422, description="Not usable: `reason` says why; nothing was consumed")
    @blp.alt_response(409, description="Idempotency-Key reused with a different request")
    def post(self, headers: dict[str, Any], data: dict[str, Any]) -> Response:
        """Redeem a coupon at the server's current time. A retry with the same key returns
        the first success byte for byte; a failure stores nothing (a retry is re-checked)."""
        _check_currency(data)
        with unit_of_work() as session:
            result = coupons.redeem(
                session,
                idempotency_key=headers["idempotency_key"],
                code=data["code"],
                member=data.get("member_id"),
                store=data["store"],
                order_amount=data["order_amount"],
                transaction_id=data.get("transaction_id"),
                at=_now(),
                currency=_currency(),
                scope_store_id=current_principal().store_id,
            )
        resp = Response(result.body, status=result.status, mimetype="application/json")
        if result.replayed:
            resp.headers["Idempotent-Replayed"] = "true"
        return resp


@blp.route("/redemptions/<int:redemption_id>")
class RedemptionById(MethodView):
    @require(*TILL, Role.MARKETER, Role.ANALYST)
    @blp.response(200, RedemptionSchema)
    def get(self, redemption_id: int) -> dict[str, Any]:
        """A redemption and whether it was rolled back."""
        with unit_of_work() as session:
            return coupons.get_redemption(
                session, redemption_id, scope_store_id=current_principal().store_id
            )


@blp.route("/redemptions/<int:redemption_id>/rollback")
class RedemptionRollback(MethodView):
    @require(*TILL)
    @blp.arguments(RollbackSchema, example={"reason": "refund"})
    @blp.response(200, RedemptionSchema)
    def post(self, data: dict[str, Any], redemption_id: int) -> dict[str, Any]:
        """Undo a redemption (refund or void of the sale): the coupon can be used again.
        Idempotent: repeating it returns the same rolled-back redemption."""
        with unit_of_work() as session:
            return coupons.rollback_redemption(
                session,
                redemption_id,
                reason=data["reason"],
                at=_now(),
                scope_store_id=current_principal().store_id,
            )


@blp.route("/<string:code>")
class CouponByCode(MethodView):
    @require(*READERS)
    @blp.response(200, CouponSchema)
    def get(self, code: str) -> dict[str, Any]:
        """One coupon: its template, owner and state."""
        with unit_of_work() as session:
            return coupons.get_coupon(session, code)


@blp.route("/<string:code>/void")
class CouponVoid(MethodView):
    @require(*WRITERS)
    @blp.response(200, CouponSchema)
    def post(self, code: str) -> dict[str, Any]:
        """Cancel an unused coupon for good (idempotent; 409 if it was redeemed)."""
        with unit_of_work() as session:
            return coupons.void_coupon(session, code, actor=current_principal().actor)
