"""Call-centre tasks (`/v1/tasks`): follow-ups for staff, created by the call_centre channel."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import fields, validate

from campaigns.channels import tasks
from service.api.schemas import BaseSchema
from service.auth import current_principal, require
from service.db import unit_of_work
from service.errors import ValidationFailed
from service.models import Role

blp = Blueprint(
    "tasks",
    __name__,
    url_prefix="/v1/tasks",
    description=(
        "The call-centre task list: open tasks are claimed by one agent, then closed with "
        "an outcome (reached, no_answer, declined, wrong_number)."
    ),
)

AGENTS = (Role.MARKETER,)


class TaskListArgs(BaseSchema):
    status = fields.String(validate=validate.OneOf(["open", "claimed", "closed"]))
    mine = fields.Boolean(
        load_default=False, metadata={"description": "Only tasks claimed by this key."}
    )
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))
    cursor = fields.String(validate=validate.Regexp(r"^\d{1,19}$"))


class TaskSchema(BaseSchema):
    id = fields.Integer()
    message_id = fields.Integer()
    member_id = fields.String(metadata={"description": "External id."})
    member_name = fields.String(allow_none=True)
    phone = fields.String(allow_none=True)
    campaign_id = fields.Integer(allow_none=True)
    subject = fields.String()
    script = fields.String(metadata={"description": "The rendered call script."})
    status = fields.String()
    claimed_by = fields.String(allow_none=True)
    claimed_at = fields.DateTime(allow_none=True)
    closed_at = fields.DateTime(allow_none=True)
    outcome = fields.String(allow_none=True)
    note = fields.String(allow_none=True)
    created_at = fields.DateTime()


class TaskPageSchema(BaseSchema):
    items = fields.List(fields.Nested(TaskSchema))
    next_cursor = fields.String(allow_none=True)


class TaskCloseSchema(BaseSchema):
    outcome = fields.String(required=True, validate=validate.OneOf(tasks.OUTCOMES))
    note = fields.String(validate=validate.Length(max=2000))


def _admin() -> bool:
    return current_principal().role == Role.ADMIN


@blp.route("")
class Tasks(MethodView):
    @require(*AGENTS, Role.ANALYST)
    @blp.arguments(TaskListArgs, location="query")
    @blp.response(200, TaskPageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """Tasks oldest first, by status; `mine=true` for this agent's claimed tasks."""
        try:
            cursor = int(args["cursor"]) if args.get("cursor") else None
        except ValueError:
            raise ValidationFailed("bad cursor", errors={"cursor": ["invalid cursor"]}) from None
        with unit_of_work() as session:
            items, next_id = tasks.list_tasks(
                session,
                status=args.get("status"),
                claimed_by=current_principal().actor if args["mine"] else None,
                limit=args["limit"],
                cursor=cursor,
            )
        return {"items": items, "next_cursor": str(next_id) if next_id else None}


@blp.route("/<int:task_id>")
class TaskById(MethodView):
    @require(*AGENTS, Role.ANALYST)
    @blp.response(200, TaskSchema)
    def get(self, task_id: int) -> dict[str, Any]:
        """One task."""
        with unit_of_work() as session:
            return tasks.get_task(session, task_id)


@blp.route("/<int:task_id>/claim")
class TaskClaim(MethodView):
    @require(*AGENTS)
    @blp.response(200, TaskSchema)
    @blp.alt_response(409, description="Claimed by another agent, or closed")
    def post(self, task_id: int) -> dict[str, Any]:
        """Claim an open task (repeating one's own claim is harmless)."""
        with unit_of_work() as session:
            return tasks.claim_task(session, task_id, actor=current_principal().actor)


@blp.route("/<int:task_id>/close")
class TaskClose(MethodView):
    @require(*AGENTS)
    @blp.arguments(TaskCloseSchema, example={"outcome": "reached", "note": "will visit Friday"})
    @blp.response(200, TaskSchema)
    @blp.alt_response(409, description="Not claimed by this agent, or closed otherwise")
    def post(self, data: dict[str, Any], task_id: int) -> dict[str, Any]:
        """Close a task claimed by this agent with its outcome (same close again: no-op)."""
        with unit_of_work() as session:
            return tasks.close_task(
                session,
                task_id,
                actor=current_principal().actor,
                outcome=data["outcome"],
                note=data.get("note"),
                admin=_admin(),
            )


@blp.route("/<int:task_id>/release")
class TaskRelease(MethodView):
    @require(*AGENTS)
    @blp.response(200, TaskSchema)
    def post(self, task_id: int) -> dict[str, Any]:
        """Give a claimed task back to the open queue."""
        with unit_of_work() as session:
            return tasks.release_task(
                session, task_id, actor=current_principal().actor, admin=_admin()
            )
