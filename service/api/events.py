"""Purchase and refund events from tills and web shops: `/v1/events`."""

from __future__ import annotations

from typing import Any

from flask import Response, current_app
from flask.views import MethodView
from flask_smorest import Blueprint

from service.api.schemas import (
    EventResponseSchema,
    IdempotencyHeaderSchema,
    PurchaseSchema,
    RefundSchema,
)
from service.auth import current_principal, require
from service.db import unit_of_work
from service.errors import ValidationFailed
from service.events import EventResult, record_purchase, record_refund
from service.models import Role

blp = Blueprint(
    "events",
    __name__,
    url_prefix="/v1/events",
    description=(
        "Purchases and refunds. Retries are safe: the same `Idempotency-Key` header or the "
        "same `transaction_id` returns the original response and changes nothing."
    ),
)

# Schema instances, not classes: webargs instantiates a class on every request, which
# deep-copies every declared field (about a fifth of the CPU of a purchase). Loading
# is stateless, so one instance per schema serves all requests and threads.
_IDEMPOTENCY_HEADER = IdempotencyHeaderSchema()
_PURCHASE = PurchaseSchema()
_REFUND = RefundSchema()


def _check_currency(data: dict[str, Any]) -> None:
    expected = current_app.config["PATRON"].currency
    if data["currency"] != expected:
        raise ValidationFailed(
            f"this deployment records amounts in {expected}",
            errors={"currency": [f"must be {expected}"]},
        )


def _respond(result: EventResult) -> Response:
    # The stored body is returned verbatim so a replay is byte-for-byte the first answer.
    resp = Response(result.body, status=result.status, mimetype="application/json")
    if result.replayed:
        resp.headers["Idempotent-Replayed"] = "true"
    return resp


@blp.route("/purchases")
class Purchases(MethodView):
    @require(Role.POS)
    @blp.arguments(_IDEMPOTENCY_HEADER, location="headers")
    @blp.arguments(_PURCHASE)
    @blp.response(201, EventResponseSchema)
    def post(self, headers: dict[str, Any], data: dict[str, Any]) -> Response:
        """Record a purchase and update the member's statistics."""
        _check_currency(data)
        with unit_of_work() as session:
            result = record_purchase(
                session,
                data,
                idempotency_key=headers.get("idempotency_key"),
                scope_store_id=current_principal().store_id,
            )
        return _respond(result)


@blp.route("/refunds")
class Refunds(MethodView):
    @require(Role.POS)
    @blp.arguments(_IDEMPOTENCY_HEADER, location="headers")
    @blp.arguments(_REFUND)
    @blp.response(201, EventResponseSchema)
    def post(self, headers: dict[str, Any], data: dict[str, Any]) -> Response:
        """Record a refund of an earlier purchase (never more than was paid)."""
        _check_currency(data)
        with unit_of_work() as session:
            result = record_refund(
                session,
                data,
                idempotency_key=headers.get("idempotency_key"),
                scope_store_id=current_principal().store_id,
            )
        return _respond(result)
