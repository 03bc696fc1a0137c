"""Scores: RFM summary and movement, lifecycle early warning, the score refresh and its status."""

from __future__ import annotations

from datetime import date
from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from segments import lifecycle, rfm
from segments.config import ScoringConfig
from segments.jobs import enqueue_refresh, job_status
from segments.refresh import iter_step_names
from segments.refresh import today as refresh_today
from service.api.schemas import STORE_CODE, BaseSchema
from service.audit import record as audit
from service.auth import current_principal, require
from service.db import unit_of_work
from service.errors import NotFound, ValidationFailed
from service.models import Role

blp = Blueprint(
    "scores",
    __name__,
    url_prefix="/v1",
    description="Scores: RFM, lifecycle and churn, refreshed daily",
)

READERS = (Role.MARKETER, Role.APPROVER, Role.ANALYST)
REFRESHERS = (Role.MARKETER,)
MONTH = validate.Regexp(r"^\d{4}-(0[1-9]|1[0-2])$", error="must be a month YYYY-MM")


class SummaryArgs(BaseSchema):
    store = fields.String(validate=STORE_CODE)
    region = fields.String(validate=STORE_CODE)


class GridCellSchema(Schema):
    r = fields.Integer()
    f = fields.Integer()
    members = fields.Integer()
    average_m = fields.Decimal(as_string=True, allow_none=True)


class SegmentCountSchema(Schema):
    segment = fields.String()
    label = fields.String()
    members = fields.Integer()


class StageCountSchema(Schema):
    stage = fields.String()
    members = fields.Integer()


class RfmSummarySchema(Schema):
    as_of = fields.Date(allow_none=True)
    store = fields.String(allow_none=True)
    region = fields.String(allow_none=True)
    cut_points = fields.Dict(allow_none=True, metadata={"description": "r (days), f, m"})
    grid = fields.List(fields.Nested(GridCellSchema), metadata={"description": "R 5..1 × F 1..5"})
    segments = fields.List(fields.Nested(SegmentCountSchema))
    stages = fields.List(fields.Nested(StageCountSchema))


class MovementArgs(BaseSchema):
    from_ = fields.String(required=True, data_key="from", validate=MONTH)
    to = fields.String(required=True, validate=MONTH)


class MovementCellSchema(Schema):
    to_segment = fields.String()
    members = fields.Integer()


class MovementRowSchema(Schema):
    from_segment = fields.String()
    counts = fields.List(fields.Nested(MovementCellSchema))


class MovementSchema(Schema):
    from_ = fields.String(data_key="from")
    to = fields.String()
    segments = fields.List(fields.String())
    matrix = fields.List(fields.Nested(MovementRowSchema))
    total = fields.Integer()


class EarlyWarningArgs(BaseSchema):
    cursor = fields.String(validate=validate.Length(max=200))
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    days = fields.Integer(validate=validate.Range(min=1, max=90))


class EarlyWarningItemSchema(Schema):
    member_id = fields.String()
    home_store = fields.String(allow_none=True)
    became_at_risk_on = fields.Date()
    previous_stage = fields.String(allow_none=True)
    last_purchase_at = fields.DateTime(allow_none=True)
    days_since_last_purchase = fields.Integer(allow_none=True)
    median_interpurchase_days = fields.Decimal(as_string=True, allow_none=True)
    p_alive = fields.Decimal(as_string=True, allow_none=True)
    rfm_segment = fields.String(allow_none=True)


class EarlyWarningPageSchema(Schema):
    items = fields.List(fields.Nested(EarlyWarningItemSchema))
    next_cursor = fields.String(allow_none=True)


class RefreshRequestSchema(BaseSchema):
    as_of = fields.Date(metadata={"description": "Default: today in PATRON_TIMEZONE"})
    steps = fields.List(
        fields.String(validate=validate.OneOf(list(iter_step_names()))),
        validate=validate.Length(min=1),
    )


class RefreshStepStatusSchema(Schema):
    step = fields.String()
    job_id = fields.String()
    status = fields.String()


class RefreshJobSchema(Schema):
    job_id = fields.String()
    status = fields.String()
    as_of = fields.String(allow_none=True)
    steps = fields.List(fields.Nested(RefreshStepStatusSchema))
    error = fields.String(allow_none=True)


def _scope() -> int | None:
    return current_principal().store_id


def _month(value: str) -> date:
    return date.fromisoformat(value + "-01")


@blp.route("/rfm/summary")
class RfmSummary(MethodView):
    @require(*READERS)
    @blp.arguments(SummaryArgs, location="query")
    @blp.response(200, RfmSummarySchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """R × F grid with counts and average M, members per RFM segment and lifecycle stage."""
        with unit_of_work() as session:
            return rfm.summary(session, **args, scope_store_id=_scope())


@blp.route("/rfm/movement")
class RfmMovement(MethodView):
    @require(*READERS)
    @blp.arguments(MovementArgs, location="query")
    @blp.response(200, MovementSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """Where the members of each segment of one monthly snapshot are in another."""
        with unit_of_work() as session:
            return rfm.movement(session, _month(args["from_"]), _month(args["to"]))


@blp.route("/lifecycle/early-warning")
class EarlyWarning(MethodView):
    @require(*READERS)
    @blp.arguments(EarlyWarningArgs, location="query")
    @blp.response(200, EarlyWarningPageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """Members who just became at risk (the churn early-warning list), by cursor."""
        with unit_of_work() as session:
            items, next_cursor = lifecycle.early_warning(
                session, ScoringConfig.from_env(), **args, scope_store_id=_scope()
            )
        return {"items": items, "next_cursor": next_cursor}


@blp.route("/scores/refresh")
class ScoresRefresh(MethodView):
    @require(*REFRESHERS)
    @blp.arguments(RefreshRequestSchema)
    @blp.response(202, RefreshJobSchema)
    def post(self, data: dict[str, Any]) -> dict[str, Any]:
        """Refresh windows and scores now (a background job); poll its status."""
        as_of = data.get("as_of")
        today = refresh_today(ScoringConfig.from_env())
        if as_of is not None and (as_of - today).days > 1:
            # Windows count from their as-of date on: a date ahead of today would empty them.
            raise ValidationFailed(
                "as_of may not be after tomorrow", errors={"as_of": [f"at most {today} + 1 day"]}
            )
        with unit_of_work() as session:
            audit(
                session,
                current_principal().actor,
                "scores.refresh_requested",
                "score_run",
                as_of.isoformat() if as_of else "today",
                {"steps": data.get("steps")},
            )
        # Enqueued after the audit row is committed.
        job = enqueue_refresh(as_of, data.get("steps"))
        return {
            "job_id": job.id,
            "status": "queued",
            "as_of": as_of.isoformat() if as_of else None,
            "steps": [],
            "error": None,
        }


@blp.route("/scores/refresh/<string:job_id>")
class ScoresRefreshStatus(MethodView):
    @require(*READERS)
    @blp.response(200, RefreshJobSchema)
    def get(self, job_id: str) -> dict[str, Any]:
        """Status of a refresh job and of each of its steps."""
        status = job_status(job_id)
        if status is None:
            raise NotFound(f"no refresh job {job_id!r}")
        return status
