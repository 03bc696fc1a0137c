"""Custom segments over HTTP: definitions (versioned), preview, members, history, refresh jobs."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from typing import Any

from flask import current_app, request
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import fields, validate
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job

from segments import custom
from segments.models_custom import ChangeKind, SegmentKind
from service.api.schemas import AwareDateTime, BaseSchema
from service.audit import record as audit
from service.auth import current_principal, require
from service.db import unit_of_work
from service.errors import NotFound, ValidationFailed
from service.models import Role
from service.redis_client import get_redis
from service.vocabulary import default_vocabulary

blp = Blueprint(
    "segments",
    __name__,
    url_prefix="/v1/segments",
    description=(
        "Custom segments. A dynamic segment is a member rule refreshed on a schedule or on "
        "demand; a static segment is an uploaded list of external ids. Every refresh records "
        "who entered and who left, naming the segment version. See docs/segments.md."
    ),
)

READERS = (Role.MARKETER, Role.APPROVER, Role.ANALYST)
WRITERS = (Role.MARKETER,)
RULE_FIELD = {
    "description": "A member rule: a JSON condition tree, or the same rule in text form.",
    "oneOf": [{"type": "object"}, {"type": "string"}],
    "example": "net_spend > 2000 and days_since_last_purchase <= 90",
}
# Functions whose jobs GET /v1/segments/jobs/{id} may show.
JOB_FUNCTIONS = frozenset(
    {
        f"{custom.refresh_segment_job.__module__}.{custom.refresh_segment_job.__qualname__}",
        f"{custom.refresh_all_job.__module__}.{custom.refresh_all_job.__qualname__}",
    }
)


class SegmentCreateSchema(BaseSchema):
    name = fields.String(
        required=True,
        validate=validate.Length(min=1, max=100),
        metadata={"description": "Lowercase letters, digits and . _ -; never renamed."},
    )
    kind = fields.String(
        load_default=SegmentKind.DYNAMIC.value,
        validate=validate.OneOf([k.value for k in SegmentKind]),
    )
    rule = fields.Raw(metadata=RULE_FIELD)
    description = fields.String(load_default="", validate=validate.Length(max=2000))


class SegmentEditSchema(BaseSchema):
    rule = fields.Raw(metadata=RULE_FIELD)
    description = fields.String(validate=validate.Length(max=2000))
    base_version = fields.Integer(
        validate=validate.Range(min=1),
        metadata={"description": "The version the edit started from (409 if no longer latest)."},
    )


class SegmentSchema(BaseSchema):
    id = fields.Integer()
    name = fields.String()
    kind = fields.String()
    status = fields.String()
    version = fields.Integer()
    description = fields.String()
    rule = fields.Dict(allow_none=True)
    text = fields.String(allow_none=True)
    hash = fields.String(allow_none=True)
    fields_ = fields.List(fields.String(), data_key="fields", attribute="fields")
    members = fields.Integer()
    created_at = fields.DateTime()
    created_by = fields.String()
    archived_at = fields.DateTime(allow_none=True)


class SegmentVersionSchema(BaseSchema):
    version = fields.Integer()
    description = fields.String()
    rule = fields.Dict(allow_none=True)
    text = fields.String(allow_none=True)
    hash = fields.String(allow_none=True)
    fields_ = fields.List(fields.String(), data_key="fields", attribute="fields")
    created_at = fields.DateTime()
    created_by = fields.String()


class SegmentVersionListSchema(BaseSchema):
    items = fields.List(fields.Nested(SegmentVersionSchema))


class SegmentPageArgs(BaseSchema):
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    cursor = fields.String(validate=validate.Length(max=200))


class SegmentListArgs(SegmentPageArgs):
    include_archived = fields.Boolean(load_default=False)


class SegmentPageSchema(BaseSchema):
    items = fields.List(fields.Nested(SegmentSchema))
    next_cursor = fields.String(allow_none=True)


class SegmentPreviewInputSchema(BaseSchema):
    rule = fields.Raw(required=True, metadata=RULE_FIELD)
    sample = fields.Integer(load_default=10, validate=validate.Range(min=0, max=50))
    at = AwareDateTime(metadata={"description": "Evaluation instant (default: now)."})


class SegmentPreviewSchema(BaseSchema):
    count = fields.Integer()
    evaluated_at = fields.DateTime()
    text = fields.String()
    hash = fields.String()
    sample = fields.List(
        fields.Dict(),
        metadata={"description": "Members (external id) with the rule's explanation for each."},
    )


class SegmentMemberSchema(BaseSchema):
    member_id = fields.String(metadata={"description": "External id."})
    entered_at = fields.DateTime()
    version = fields.Integer(metadata={"description": "The segment version that added them."})


class SegmentMemberPageSchema(BaseSchema):
    items = fields.List(fields.Nested(SegmentMemberSchema))
    next_cursor = fields.String(allow_none=True)


class SegmentChangeArgs(SegmentPageArgs):
    since = AwareDateTime(required=True)
    kind = fields.String(validate=validate.OneOf([k.value for k in ChangeKind]))


class SegmentChangeSchema(BaseSchema):
    member_id = fields.String()
    kind = fields.String()
    at = fields.DateTime()
    version = fields.Integer()
    refresh_id = fields.Integer(allow_none=True)


class SegmentChangePageSchema(BaseSchema):
    items = fields.List(fields.Nested(SegmentChangeSchema))
    next_cursor = fields.String(allow_none=True)


class SegmentUploadArgs(BaseSchema):
    mode = fields.String(
        load_default="add",
        validate=validate.OneOf(["add", "replace"]),
        metadata={"description": "add to the current members, or replace them"},
    )


class SegmentUploadResultSchema(BaseSchema):
    received = fields.Integer()
    unique = fields.Integer()
    matched = fields.Integer()
    not_found_count = fields.Integer()
    not_found = fields.List(fields.String(), metadata={"description": "The first 1,000."})
    entered = fields.Integer()
    left = fields.Integer()
    members = fields.Integer()


class SegmentRefreshInputSchema(BaseSchema):
    as_of = AwareDateTime(
        metadata={"description": "Evaluation instant (default: now); one refresh per instant."}
    )


class SegmentJobAcceptedSchema(BaseSchema):
    job_ids = fields.List(fields.String())
    as_of = fields.DateTime()


class SegmentJobStatusSchema(BaseSchema):
    id = fields.String()
    status = fields.String()
    description = fields.String(allow_none=True)
    enqueued_at = fields.DateTime(allow_none=True)
    ended_at = fields.DateTime(allow_none=True)
    result = fields.Raw(allow_none=True)
    error = fields.String(allow_none=True)


def _now() -> datetime:
    return datetime.now(UTC)


def _queue() -> Queue:
    return Queue(current_app.config["PATRON"].queue_name, connection=get_redis())


@blp.route("")
class Segments(MethodView):
    @require(*READERS)
    @blp.arguments(SegmentListArgs, location="query")
    @blp.response(200, SegmentPageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """Segments in id order (current version of each), paginated by cursor."""
        with unit_of_work() as session:
            items, cursor = custom.list_segments(
                session,
                cursor=args.get("cursor"),
                limit=args["limit"],
                include_archived=args["include_archived"],
            )
        return {"items": items, "next_cursor": cursor}

    @require(*WRITERS)
    @blp.arguments(
        SegmentCreateSchema,
        examples={
            "dynamic": {
                "value": {
                    "name": "big-spenders",
                    "rule": "net_spend > 2000 and days_since_last_purchase <= 90",
                    "description": "High value, recently active",
                }
            },
            "static": {"value": {"name": "fair-visitors-2026", "kind": "static"}},
        },
    )
    @blp.response(201, SegmentSchema)
    @blp.alt_response(422, description="Invalid rule: `errors` keyed by JSON pointer")
    def post(self, data: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """Create a segment (version 1); a dynamic one fills at its first refresh."""
        with unit_of_work() as session:
            saved = custom.create_segment(
                session,
                default_vocabulary(),
                data["name"],
                kind=SegmentKind(data["kind"]),
                rule=data.get("rule"),
                description=data["description"],
                actor=current_principal().actor,
            )
        return saved, 201


@blp.route("/<int:segment_id>")
class SegmentById(MethodView):
    @require(*READERS)
    @blp.response(200, SegmentSchema)
    def get(self, segment_id: int) -> dict[str, Any]:
        """A segment with its current definition and member count."""
        with unit_of_work() as session:
            return custom.get_segment(session, segment_id)

    @require(*WRITERS)
    @blp.arguments(SegmentEditSchema, example={"rule": "net_spend > 3000", "base_version": 1})
    @blp.response(201, SegmentSchema)
    @blp.alt_response(200, schema=SegmentSchema, description="Same content: nothing changed")
    def put(self, data: dict[str, Any], segment_id: int) -> tuple[dict[str, Any], int]:
        """Save an edit as the next version; members follow at the next refresh."""
        with unit_of_work() as session:
            saved, created = custom.update_segment(
                session,
                default_vocabulary(),
                segment_id,
                rule=data.get("rule"),
                description=data.get("description"),
                base_version=data.get("base_version"),
                actor=current_principal().actor,
            )
        return saved, 201 if created else 200

    @require(*WRITERS)
    @blp.response(200, SegmentSchema)
    def delete(self, segment_id: int) -> dict[str, Any]:
        """Archive a segment: its members are recorded as having left; history is kept."""
        with unit_of_work() as session:
            return custom.archive_segment(
                session, segment_id, at=_now(), actor=current_principal().actor
            )


@blp.route("/<int:segment_id>/versions")
class SegmentVersions(MethodView):
    @require(*READERS)
    @blp.response(200, SegmentVersionListSchema)
    def get(self, segment_id: int) -> dict[str, Any]:
        """Every version of a segment, oldest first."""
        with unit_of_work() as session:
            return {"items": custom.list_versions(session, segment_id)}


@blp.route("/preview")
class SegmentPreview(MethodView):
    @require(*READERS)
    @blp.arguments(
        SegmentPreviewInputSchema, example={"rule": "net_spend > 2000 and consent.sms = true"}
    )
    @blp.response(200, SegmentPreviewSchema)
    @blp.alt_response(422, description="Invalid rule: `errors` keyed by JSON pointer")
    def post(self, data: dict[str, Any]) -> dict[str, Any]:
        """Count and sample the members a rule selects, with why, without saving anything."""
        with unit_of_work() as session:
            return custom.preview(
                session,
                default_vocabulary(),
                data["rule"],
                at=data.get("at") or _now(),
                sample=data["sample"],
            )


def _uploaded_ids() -> list[Any]:
    """The request body as a list of ids: a JSON array, or text/csv (one id per row)."""
    if request.mimetype == "application/json":
        body = request.get_json(silent=True)
        if isinstance(body, dict) and set(body) == {"external_ids"}:
            body = body["external_ids"]
        if not isinstance(body, list):
            raise ValidationFailed(
                "Send a JSON array of external ids (or text/csv); nothing was written.",
                errors={"body": ["must be a JSON array of strings"]},
            )
        return body
    if request.mimetype in ("text/csv", "text/plain"):
        try:
            rows = list(csv.reader(io.StringIO(request.get_data(as_text=False).decode("utf-8"))))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ValidationFailed(
                "The CSV body does not parse; nothing was written.",
                errors={"body": [str(exc)[:200]]},
            ) from None
        rows = [r for r in rows if r and any(c.strip() for c in r)]
        if any(len(r) != 1 for r in rows):
            raise ValidationFailed(
                "The CSV must have one column (the external id); nothing was written.",
                errors={"body": ["one column per row"]},
            )
        ids = [r[0].strip() for r in rows]
        if ids and ids[0].lower() in ("external_id", "member_id", "id"):
            ids = ids[1:]
        return ids
    raise ValidationFailed(
        "Send application/json or text/csv.", errors={"body": ["unsupported content type"]}
    )


@blp.route("/<int:segment_id>/members")
class SegmentMembers(MethodView):
    @require(*READERS)
    @blp.arguments(SegmentPageArgs, location="query")
    @blp.response(200, SegmentMemberPageSchema)
    def get(self, args: dict[str, Any], segment_id: int) -> dict[str, Any]:
        """Current members (external id, since when, which version), paginated by cursor."""
        with unit_of_work() as session:
            items, cursor = custom.list_members(
                session, segment_id, cursor=args.get("cursor"), limit=args["limit"]
            )
        return {"items": items, "next_cursor": cursor}

    @require(*WRITERS)
    @blp.arguments(SegmentUploadArgs, location="query")
    @blp.doc(
        requestBody={
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"type": "array", "items": {"type": "string"}},
                    "example": ["M-1001", "M-1002"],
                },
                "text/csv": {"schema": {"type": "string"}, "example": "external_id\nM-1001\n"},
            },
        }
    )
    @blp.response(200, SegmentUploadResultSchema)
    @blp.alt_response(422, description="Malformed input: nothing was written")
    def post(self, args: dict[str, Any], segment_id: int) -> dict[str, Any]:
        """Upload a static segment's members by external id; unknown ids are reported."""
        ids = custom.check_external_ids(_uploaded_ids())
        with unit_of_work() as session:
            return custom.upload_members(
                session,
                segment_id,
                ids,
                replace=args["mode"] == "replace",
                at=_now(),
                actor=current_principal().actor,
            )


@blp.route("/<int:segment_id>/changes")
class SegmentChanges(MethodView):
    @require(*READERS)
    @blp.arguments(SegmentChangeArgs, location="query")
    @blp.response(200, SegmentChangePageSchema)
    def get(self, args: dict[str, Any], segment_id: int) -> dict[str, Any]:
        """Who entered or left since an instant, oldest first, paginated by cursor."""
        kind = args.get("kind")
        with unit_of_work() as session:
            items, cursor = custom.list_changes(
                session,
                segment_id,
                since=args["since"],
                kind=ChangeKind(kind) if kind else None,
                cursor=args.get("cursor"),
                limit=args["limit"],
            )
        return {"items": items, "next_cursor": cursor}


@blp.route("/<int:segment_id>/refresh")
class SegmentRefresh(MethodView):
    @require(*WRITERS)
    @blp.arguments(SegmentRefreshInputSchema, required=False)
    @blp.response(202, SegmentJobAcceptedSchema)
    def post(self, data: dict[str, Any], segment_id: int) -> tuple[dict[str, Any], int]:
        """Enqueue a refresh of one dynamic segment; poll /v1/segments/jobs/{job_id}."""
        as_of = (data or {}).get("as_of") or _now()
        with unit_of_work() as session:
            seg = custom.get_segment(session, segment_id)
            if seg["kind"] != SegmentKind.DYNAMIC or seg["status"] != "active":
                raise ValidationFailed(
                    "only active dynamic segments are refreshed",
                    errors={"segment": [f"{seg['status']} {seg['kind']} segment"]},
                )
            audit(
                session,
                current_principal().actor,
                "segment.refresh_requested",
                "segment",
                str(segment_id),
                {"as_of": as_of.isoformat()},
            )
        # After the commit: the job must find what this request saw.
        job_ids = custom.enqueue_refresh(_queue(), [segment_id], as_of)
        return {"job_ids": job_ids, "as_of": as_of}, 202


@blp.route("/refresh")
class SegmentsRefresh(MethodView):
    @require(*WRITERS)
    @blp.arguments(SegmentRefreshInputSchema, required=False)
    @blp.response(202, SegmentJobAcceptedSchema)
    def post(self, data: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """Enqueue a refresh of every active dynamic segment (one job each)."""
        as_of = (data or {}).get("as_of") or _now()
        with unit_of_work() as session:
            ids = custom.dynamic_segment_ids(session)
            audit(
                session,
                current_principal().actor,
                "segment.refresh_all_requested",
                "segment",
                "*",
                {"as_of": as_of.isoformat(), "segments": len(ids)},
            )
        job_ids = custom.enqueue_refresh(_queue(), ids, as_of)
        return {"job_ids": job_ids, "as_of": as_of}, 202


@blp.route("/jobs/<string:job_id>")
class SegmentJob(MethodView):
    @require(*READERS)
    @blp.response(200, SegmentJobStatusSchema)
    def get(self, job_id: str) -> dict[str, Any]:
        """Status of a refresh job and, when finished, its result."""
        try:
            job = Job.fetch(job_id, connection=get_redis())
        except NoSuchJobError:
            raise NotFound(f"job {job_id!r} does not exist or has expired") from None
        if job.func_name not in JOB_FUNCTIONS:
            raise NotFound(f"job {job_id!r} is not a segment job")
        status = job.get_status()
        failed = job.latest_result() if status == "failed" else None
        return {
            "id": job.id,
            "status": str(status.value if status is not None else "unknown"),
            "description": job.description,
            "enqueued_at": job.enqueued_at,
            "ended_at": job.ended_at,
            "result": json.loads(json.dumps(job.return_value(), default=str))
            if status == "finished"
            else None,
            "error": "the job failed; see the worker log" if failed is not None else None,
        }
