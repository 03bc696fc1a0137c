"""Messages: the outbox as staff see it (`/v1/messages`), with filters and delivery stats."""

from __future__ import annotations

from typing import Any

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import fields, validate
from sqlalchemy import text

from campaigns import outbox
from campaigns.channels.config import CHANNELS, MessagingConfig
from campaigns.models_messaging import MessageStatus
from service.api.schemas import BaseSchema
from service.auth import current_principal, require
from service.db import unit_of_work
from service.models import Role
from service.redis_client import get_redis

blp = Blueprint(
    "messages",
    __name__,
    url_prefix="/v1/messages",
    description=(
        "Outbox messages and their delivery: queued → sending → sent / failed / deferred / "
        "suppressed / dead, with the reason of each non-delivery. See docs/api.md#messaging."
    ),
)

READERS = (Role.MARKETER, Role.APPROVER, Role.ANALYST)
WRITERS = (Role.MARKETER,)


class MessageListArgs(BaseSchema):
    member_id = fields.String(
        validate=validate.Length(min=1, max=64), metadata={"description": "External id."}
    )
    campaign_id = fields.Integer(validate=validate.Range(min=1))
    status = fields.String(validate=validate.OneOf([s.value for s in MessageStatus]))
    channel = fields.String(
        validate=validate.OneOf(CHANNELS),
        metadata={"description": "The channel used (or preferred, before sending)."},
    )
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    cursor = fields.String(validate=validate.Length(max=200))


class MessageSchema(BaseSchema):
    id = fields.Integer(metadata={"description": "Stable id; the providers' idempotency key."})
    member_id = fields.String()
    campaign_id = fields.Integer(allow_none=True)
    decision_id = fields.Integer(allow_none=True)
    coupon_id = fields.Integer(allow_none=True)
    template = fields.String()
    channel = fields.String(allow_none=True)
    preferred_channel = fields.String(allow_none=True)
    kind = fields.String()
    status = fields.String()
    reason = fields.String(allow_none=True)
    last_error = fields.String(allow_none=True)
    attempts = fields.Integer()
    overrides = fields.List(
        fields.String(),
        metadata={"description": "Contact rules a transactional message overrode."},
    )
    not_before = fields.DateTime()
    not_after = fields.DateTime(allow_none=True)
    sent_at = fields.DateTime(allow_none=True)
    created_at = fields.DateTime()
    updated_at = fields.DateTime()
    provider_id = fields.String(allow_none=True)


class MessagePageSchema(BaseSchema):
    items = fields.List(fields.Nested(MessageSchema))
    next_cursor = fields.String(allow_none=True)


class MessageStatsSchema(BaseSchema):
    by_status = fields.Dict(keys=fields.String(), values=fields.Integer())
    due = fields.Integer(metadata={"description": "Queued or deferred and due, not in a job."})
    oldest_due_seconds = fields.Float(allow_none=True)
    dispatched = fields.Integer(metadata={"description": "In an RQ job, not yet claimed."})
    queue = fields.Dict(metadata={"description": "RQ queue: depth, started, failed jobs."})


@blp.route("")
class Messages(MethodView):
    @require(*READERS)
    @blp.arguments(MessageListArgs, location="query")
    @blp.response(200, MessagePageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """Messages newest first, filtered by member, campaign, status and channel."""
        with unit_of_work() as session:
            items, cursor = outbox.list_messages(
                session,
                member=args.get("member_id"),
                campaign_id=args.get("campaign_id"),
                status=args.get("status"),
                channel=args.get("channel"),
                limit=args["limit"],
                cursor=args.get("cursor"),
                scope_store_id=current_principal().store_id,
            )
        return {"items": items, "next_cursor": cursor}


@blp.route("/<int:message_id>")
class MessageById(MethodView):
    @require(*READERS)
    @blp.response(200, MessageSchema)
    def get(self, message_id: int) -> dict[str, Any]:
        """One message with its delivery state."""
        with unit_of_work() as session:
            return outbox.get_message(session, message_id)


@blp.route("/<int:message_id>/retry")
class MessageRetry(MethodView):
    @require(*WRITERS)
    @blp.response(200, MessageSchema)
    @blp.alt_response(409, description="The message is not failed or dead")
    def post(self, message_id: int) -> dict[str, Any]:
        """Queue a failed or dead message again (attempts start over). Audited."""
        with unit_of_work() as session:
            return outbox.retry_message(session, message_id, actor=current_principal().actor)


_STATS = text(
    """
    SELECT
      (SELECT count(*) FROM outbox_messages
        WHERE status IN ('queued', 'deferred') AND dispatched_at IS NULL
          AND not_before <= now()) AS due,
      (SELECT extract(epoch FROM now() - min(not_before)) FROM outbox_messages
        WHERE status IN ('queued', 'deferred') AND dispatched_at IS NULL
          AND not_before <= now()) AS oldest_due_seconds,
      (SELECT count(*) FROM outbox_messages
        WHERE status IN ('queued', 'deferred') AND dispatched_at IS NOT NULL) AS dispatched
    """
)
_BY_STATUS = text("SELECT status, count(*) FROM outbox_messages GROUP BY status")


@blp.route("/stats")
class MessageStats(MethodView):
    @require(*READERS)
    @blp.response(200, MessageStatsSchema)
    def get(self) -> dict[str, Any]:
        """Delivery health: messages by status, backlog, and the RQ queue's depth and failures."""
        with unit_of_work() as session:
            row = session.execute(_STATS).mappings().one()
            by_status = {s.value: 0 for s in MessageStatus}
            by_status.update({s: n for s, n in session.execute(_BY_STATUS).all()})
        try:
            from campaigns.dispatch import queue_metrics

            queue: dict[str, Any] = queue_metrics(get_redis(), MessagingConfig.from_env())
        except Exception as exc:  # Redis away: the outbox figures still help
            current_app.logger.warning("message stats: redis unavailable: %s", exc)
            queue = {"error": type(exc).__name__}
        return {
            "by_status": by_status,
            "due": row["due"],
            "oldest_due_seconds": float(row["oldest_due_seconds"])
            if row["oldest_due_seconds"] is not None
            else None,
            "dispatched": row["dispatched"],
            "queue": queue,
        }
