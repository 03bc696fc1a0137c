"""Campaigns over HTTP: definitions (versioned), lifecycle with approvals, preview,
backtest, runs, reports, ready-made templates, and each member's decisions."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import fields, validate
from sqlalchemy import select

from campaigns import insights, ready_made, runs
from campaigns import service as campaigns
from campaigns.definition import DefinitionOutSchema
from campaigns.models import Campaign, Decision, Status
from service.api.schemas import BaseSchema
from service.auth import current_principal, require
from service.db import unit_of_work
from service.errors import NotFound, ValidationFailed
from service.models import Member, Role

blp = Blueprint(
    "campaigns",
    __name__,
    url_prefix="/v1",
    description=(
        "Campaigns: coupons, tier upgrades, win-back and birthday offers. Versioned like "
        "rules; draft → pending approval → active ⇄ paused → ended; every evaluation leaves "
        "a decision per campaign × member × period. See docs/campaigns.md."
    ),
)

READERS = (Role.MARKETER, Role.APPROVER, Role.ANALYST)
WRITERS = (Role.MARKETER,)
DEFINITION_DOC = {
    "description": "A campaign definition (see docs/campaigns.md for every field).",
    "type": "object",
}


def _approval_budget() -> Decimal:
    return Decimal(current_app.config["PATRON"].approval_budget)


def _actor() -> str:
    return current_principal().actor


class CampaignSchema(BaseSchema):
    id = fields.Integer()
    name = fields.String()
    kind = fields.String()
    status = fields.String()
    version = fields.Integer()
    definition = fields.Nested(DefinitionOutSchema)
    needs_approval = fields.Boolean()
    approved_version = fields.Integer(allow_none=True)
    approved_by = fields.String(allow_none=True)
    approved_at = fields.DateTime(allow_none=True)
    budget = fields.Dict()
    created_by = fields.String()
    created_at = fields.DateTime()
    updated_by = fields.String()
    updated_at = fields.DateTime()


class CampaignPageSchema(BaseSchema):
    items = fields.List(fields.Nested(CampaignSchema))
    next_cursor = fields.String(allow_none=True)


class ListArgs(BaseSchema):
    status = fields.String(validate=validate.OneOf([s.value for s in Status]))
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))
    cursor = fields.String()


class EditQuery(BaseSchema):
    base_version = fields.Integer(validate=validate.Range(min=1))


class NoteSchema(BaseSchema):
    note = fields.String(validate=validate.Length(max=1000))


class BacktestSchema(BaseSchema):
    days = fields.Integer(load_default=30, validate=validate.Range(min=1, max=365))


class RunSchema(BaseSchema):
    run_key = fields.String(
        validate=validate.Regexp(r"^[A-Za-z0-9:._-]{1,80}$"),
        metadata={"description": "Idempotency key of the run (default: manual:<UTC date>)."},
    )


class DecisionArgs(BaseSchema):
    campaign = fields.Integer(validate=validate.Range(min=1))
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))
    cursor = fields.String()


def _cursor(value: int) -> str:
    return base64.urlsafe_b64encode(str(value).encode()).decode()


def _uncursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    try:
        return int(base64.urlsafe_b64decode(cursor.encode()).decode())
    except (ValueError, binascii.Error):
        raise ValidationFailed(
            "bad cursor", errors={"cursor": ["not a cursor from this API"]}
        ) from None


@blp.route("/campaigns")
class Campaigns(MethodView):
    @require(*READERS)
    @blp.arguments(ListArgs, location="query")
    @blp.response(200, CampaignPageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List campaigns (cursor), optionally by status."""
        with unit_of_work() as session:
            items, last = campaigns.list_campaigns(
                session,
                status=args.get("status"),
                limit=args["limit"],
                after=_uncursor(args.get("cursor")),
            )
        return {"items": items, "next_cursor": _cursor(last) if last is not None else None}

    @require(*WRITERS)
    @blp.doc(requestBody={"content": {"application/json": {"schema": DEFINITION_DOC}}})
    @blp.response(201, CampaignSchema)
    def post(self) -> dict[str, Any]:
        """Create a campaign (version 1, draft)."""
        from flask import request

        with unit_of_work() as session:
            return campaigns.create_campaign(
                session, request.get_json(), actor=_actor(), approval_budget=_approval_budget()
            )


@blp.route("/campaigns/templates")
class ReadyMade(MethodView):
    @require(*READERS)
    @blp.response(200)
    def get(self) -> dict[str, Any]:
        """Ready-made campaign definitions (birthday, win-back, tier congratulation, holiday)."""
        return {"items": ready_made.catalogue()}


@blp.route("/campaigns/<int:campaign_id>")
class CampaignItem(MethodView):
    @require(*READERS)
    @blp.response(200, CampaignSchema)
    def get(self, campaign_id: int) -> dict[str, Any]:
        """A campaign with its current definition, status and budget counters."""
        with unit_of_work() as session:
            return campaigns.get_campaign(session, campaign_id)

    @require(*WRITERS)
    @blp.arguments(EditQuery, location="query")
    @blp.doc(requestBody={"content": {"application/json": {"schema": DEFINITION_DOC}}})
    @blp.response(200, CampaignSchema)
    def put(self, query: dict[str, Any], campaign_id: int) -> dict[str, Any]:
        """Save a new version (draft or paused campaigns; approval starts over)."""
        from flask import request

        with unit_of_work() as session:
            return campaigns.update_campaign(
                session,
                campaign_id,
                request.get_json(),
                actor=_actor(),
                approval_budget=_approval_budget(),
                base_version=query.get("base_version"),
            )


@blp.route("/campaigns/<int:campaign_id>/versions")
class CampaignVersions(MethodView):
    @require(*READERS)
    @blp.response(200)
    def get(self, campaign_id: int) -> dict[str, Any]:
        """Every saved version of the campaign."""
        with unit_of_work() as session:
            return {"items": campaigns.list_versions(session, campaign_id)}


def _lifecycle(name: str, roles: tuple[Role, ...], doc: str) -> None:
    action = getattr(campaigns, name)

    @require(*roles)
    @blp.arguments(NoteSchema)
    @blp.response(200, CampaignSchema)
    def post(self: Any, data: dict[str, Any], campaign_id: int) -> dict[str, Any]:
        with unit_of_work() as session:
            if name in ("approve", "reject"):
                return action(session, campaign_id, actor=_actor(), note=data.get("note"))
            return action(session, campaign_id, actor=_actor())

    post.__doc__ = doc
    view = type(f"Campaign{name.title()}", (MethodView,), {"post": post})
    blp.route(f"/campaigns/<int:campaign_id>/{name}")(view)


_lifecycle("activate", WRITERS, "Activate (draft/paused → active, or → pending approval).")
_lifecycle("approve", (Role.APPROVER,), "Approve (four eyes: not the campaign's author).")
_lifecycle("reject", (Role.APPROVER,), "Send a pending campaign back to draft.")
_lifecycle("pause", WRITERS, "Pause an active campaign.")
_lifecycle("end", WRITERS, "End the campaign (final).")


@blp.route("/campaigns/<int:campaign_id>/preview")
class CampaignPreview(MethodView):
    @require(*READERS)
    @blp.response(200)
    def post(self, campaign_id: int) -> dict[str, Any]:
        """Dry run: audience, holdout, coupons and face value, budget hit, explained sample."""
        with unit_of_work() as session:
            return insights.preview(session, campaign_id, datetime.now(UTC))


@blp.route("/campaigns/<int:campaign_id>/backtest")
class CampaignBacktest(MethodView):
    @require(*READERS)
    @blp.arguments(BacktestSchema)
    @blp.response(200)
    def post(self, data: dict[str, Any], campaign_id: int) -> dict[str, Any]:
        """Replay the last N days of purchases through a purchase campaign."""
        with unit_of_work() as session:
            return insights.backtest(session, campaign_id, datetime.now(UTC), data["days"])


@blp.route("/campaigns/<int:campaign_id>/runs")
class CampaignRuns(MethodView):
    @require(*WRITERS)
    @blp.arguments(RunSchema)
    @blp.response(200)
    def post(self, data: dict[str, Any], campaign_id: int) -> dict[str, Any]:
        """Run an active campaign over its audience now (idempotent per run_key)."""
        now = datetime.now(UTC)
        key = data.get("run_key") or f"manual:{now.date().isoformat()}"
        with unit_of_work() as session:
            row = session.get(Campaign, campaign_id)
            if row is None:
                raise NotFound(f"campaign {campaign_id} does not exist")
            if row.trigger_type in ("purchase", "signup", "tier_change"):
                raise ValidationFailed(
                    "event campaigns run inside purchases and sign-ups; use backtest",
                    errors={"trigger": [row.trigger_type]},
                )
            return runs.run_campaign(session, campaign_id, run_key=key, now=now)


@blp.route("/campaigns/<int:campaign_id>/report")
class CampaignReport(MethodView):
    @require(*READERS)
    @blp.response(200)
    def get(self, campaign_id: int) -> dict[str, Any]:
        """Issued, redeemed, revenue, decisions by reason, uplift against the holdout, messages."""
        with unit_of_work() as session:
            return insights.report(session, campaign_id, datetime.now(UTC))


@blp.route("/members/<string:external_id>/decisions")
class MemberDecisions(MethodView):
    @require(*READERS, Role.POS)
    @blp.arguments(DecisionArgs, location="query")
    @blp.response(200)
    def get(self, args: dict[str, Any], external_id: str) -> dict[str, Any]:
        """Why did / didn't this member get an offer: decisions, newest first, with versions."""
        with unit_of_work() as session:
            member_id = session.scalar(select(Member.id).where(Member.external_id == external_id))
            if member_id is None:
                raise NotFound(f"member {external_id!r} does not exist")
            stmt = (
                select(Decision, Campaign.name)
                .join(Campaign, Campaign.id == Decision.campaign_id)
                .where(Decision.member_id == member_id)
                .order_by(Decision.id.desc())
                .limit(args["limit"] + 1)
            )
            if args.get("campaign"):
                stmt = stmt.where(Decision.campaign_id == args["campaign"])
            before = _uncursor(args.get("cursor"))
            if before is not None:
                stmt = stmt.where(Decision.id < before)
            rows = session.execute(stmt).all()
            more = len(rows) > args["limit"]
            rows = rows[: args["limit"]]
            items = [
                {
                    "id": d.id,
                    "campaign": {"id": d.campaign_id, "name": name, "version": d.campaign_version},
                    "period": d.period,
                    "trigger": d.trigger,
                    "outcome": d.outcome,
                    "reason": d.reason,
                    "rule_hash": d.rule_hash,
                    "detail": d.detail,
                    "decided_at": d.decided_at.isoformat(),
                }
                for d, name in rows
            ]
        return {"items": items, "next_cursor": _cursor(rows[-1][0].id) if more and rows else None}
