"""The rule language over HTTP: vocabulary, validate, explain, and saved rule versions."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from flask import request
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import fields, validate

from rules import Scope, explain
from rules.validate import limits
from service.api.schemas import EXTERNAL_ID, STORE_CODE, AwareDateTime, BaseSchema, Money
from service.auth import current_principal, require
from service.db import unit_of_work
from service.errors import NotFound, ValidationFailed
from service.models import Role, SalesChannel
from service.rule_versions import (
    create_rule,
    describe_rule,
    get_rule,
    list_rules,
    list_versions,
    rule_or_422,
    save_version,
)
from service.vocabulary import (
    default_vocabulary,
    event_facts,
    load_member_facts,
    member_id_for,
    store_region,
)

blp = Blueprint(
    "rules",
    __name__,
    url_prefix="/v1/rules",
    description=(
        "The rule language. A rule is a JSON condition tree of `all` / `any` / `not` groups "
        "over `{field, op, value}` conditions, or the same rule as text, e.g. "
        "`days_since_last_purchase >= 90 and consent.sms = true`. Errors point at the node "
        "by JSON pointer. See docs/rules.md."
    ),
)

READERS = (Role.MARKETER, Role.APPROVER, Role.ANALYST)
WRITERS = (Role.MARKETER,)

EXAMPLE_TREE: dict[str, Any] = {
    "all": [
        {"field": "days_since_last_purchase", "op": "ge", "value": 90},
        {"field": "net_spend", "op": "gt", "value": "500"},
        {"field": "consent.sms", "op": "eq", "value": True},
        {"field": "region", "op": "eq", "value": "East"},
    ]
}
EXAMPLE_TEXT = (
    'days_since_last_purchase >= 90 and net_spend > 500 and consent.sms = true and region = "East"'
)
RULE_FIELD = {
    "description": "The rule: a JSON condition tree, or the same rule in text form.",
    "oneOf": [{"type": "object"}, {"type": "string"}],
    "example": EXAMPLE_TREE,
}
SCOPES = [s.value for s in Scope]


def _reject_deep_json() -> None:
    # The JSON decoder itself raises RecursionError on thousands of nested brackets; answer
    # 422 like any other too-deep rule instead of letting it surface as a 500.
    if request.method in ("POST", "PUT") and request.mimetype == "application/json":
        try:
            json.loads(request.get_data(cache=True) or b"null")
        except RecursionError:
            raise ValidationFailed(
                "The request body is nested too deeply.",
                errors={"rule": ["nested more than 10 levels deep; at most 10 levels"]},
            ) from None
        except ValueError:
            return  # malformed JSON: the normal 400 path reports it


blp.before_request(_reject_deep_json)


class RuleInputSchema(BaseSchema):
    rule = fields.Raw(required=True, metadata=RULE_FIELD)
    scope = fields.String(
        load_default=Scope.MEMBER.value,
        validate=validate.OneOf(SCOPES),
        metadata={"description": "member (segments, audiences) or event (purchase triggers)"},
    )


class NormalisedRuleSchema(BaseSchema):
    scope = fields.String()
    rule = fields.Dict(metadata={"description": "The normalised JSON tree."})
    text = fields.String(metadata={"description": "The same rule in text form."})
    hash = fields.String(metadata={"description": "sha256 of the canonical JSON."})
    fields_ = fields.List(fields.String(), data_key="fields", attribute="fields")


class ItemSchema(BaseSchema):
    sku = fields.String(required=True, validate=validate.Length(min=1, max=64))
    category = fields.String(validate=validate.Length(min=1, max=64))
    quantity = fields.Integer(validate=validate.Range(min=1, max=100_000))
    amount = Money()


class EventInputSchema(BaseSchema):
    amount = Money(required=True)
    store = fields.String(required=True, validate=STORE_CODE)
    channel = fields.String(required=True, validate=validate.OneOf([c.value for c in SalesChannel]))
    occurred_at = AwareDateTime()
    items = fields.List(fields.Nested(ItemSchema), validate=validate.Length(max=500))


class ExplainInputSchema(BaseSchema):
    rule = fields.Raw(required=True, metadata=RULE_FIELD)
    member_id = fields.String(
        required=True, validate=EXTERNAL_ID, metadata={"description": "The member's external id."}
    )
    event = fields.Nested(
        EventInputSchema, metadata={"description": "A purchase, for event-triggered rules."}
    )
    scope = fields.String(
        validate=validate.OneOf(SCOPES),
        metadata={"description": "Defaults to event when an event is given, else member."},
    )
    at = AwareDateTime(
        metadata={"description": "Evaluation instant (default: now); answers 'as of when?'."}
    )


class ExplanationSchema(BaseSchema):
    outcome = fields.Boolean()
    decided_by = fields.List(
        fields.String(), metadata={"description": "Pointers of the leaves that decided."}
    )
    rule_text = fields.String()
    evaluated_at = fields.String()
    member_id = fields.String()
    trace = fields.Dict(
        metadata={
            "description": "Each node with its result; leaves carry field, op, value, the "
            "member's actual value and whether it was missing."
        }
    )


class VocabularySchema(BaseSchema):
    fields_ = fields.List(fields.Dict(), data_key="fields", attribute="fields")
    operators = fields.List(fields.Dict())
    scopes = fields.Dict()
    limits = fields.Dict()
    missing_values = fields.String()


class RuleCreateSchema(BaseSchema):
    name = fields.String(
        required=True,
        validate=validate.Length(min=1, max=100),
        metadata={"description": "Lowercase letters, digits and . _ -", "example": "win-back-sms"},
    )
    rule = fields.Raw(required=True, metadata=RULE_FIELD)
    scope = fields.String(load_default=Scope.MEMBER.value, validate=validate.OneOf(SCOPES))
    description = fields.String(load_default="", validate=validate.Length(max=2000))


class RuleEditSchema(BaseSchema):
    rule = fields.Raw(required=True, metadata=RULE_FIELD)
    description = fields.String(validate=validate.Length(max=2000))
    base_version = fields.Integer(
        validate=validate.Range(min=1),
        metadata={"description": "The version the edit started from (409 if no longer latest)."},
    )


class RuleVersionSchema(BaseSchema):
    name = fields.String()
    version = fields.Integer()
    scope = fields.String()
    description = fields.String()
    rule = fields.Dict()
    text = fields.String()
    hash = fields.String()
    created_at = fields.DateTime()
    created_by = fields.String()


class RuleListArgs(BaseSchema):
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))
    cursor = fields.String(validate=validate.Length(max=100))


class RulePageSchema(BaseSchema):
    items = fields.List(fields.Nested(RuleVersionSchema))
    next_cursor = fields.String(allow_none=True)


class RuleVersionListSchema(BaseSchema):
    items = fields.List(fields.Nested(RuleVersionSchema))


MISSING_VALUES = (
    "A condition on a missing value (no birth date, never purchased, empty list) is false; "
    "'is not set' is true. 'not' negates that true/false result, so 'not (tier = \"gold\")' "
    "includes members without a tier while 'tier != \"gold\"' does not."
)


@blp.route("/vocabulary")
class RuleVocabulary(MethodView):
    @require(*READERS)
    @blp.response(200, VocabularySchema)
    def get(self) -> dict[str, Any]:
        """Fields, their types, operators and enum values: what a rule builder can offer."""
        data = default_vocabulary().export()
        data["limits"] = limits()
        data["missing_values"] = MISSING_VALUES
        return data


@blp.route("/validate")
class RuleValidation(MethodView):
    @require(*READERS)
    @blp.arguments(
        RuleInputSchema,
        examples={
            "tree": {"value": {"rule": EXAMPLE_TREE}},
            "text": {"value": {"rule": EXAMPLE_TEXT}},
            "event": {
                "value": {
                    "scope": "event",
                    "rule": 'event.amount >= 200 and event.channel = "ecom" '
                    'and event.item_categories contains "shoes"',
                }
            },
        },
    )
    @blp.response(200, NormalisedRuleSchema)
    @blp.alt_response(422, description="Invalid rule: `errors` keyed by JSON pointer, e.g. /all/0")
    def post(self, data: dict[str, Any]) -> dict[str, Any]:
        """Check a rule (either form); 200 with the normalised tree and text, or 422."""
        rule = rule_or_422(data["rule"], default_vocabulary(), Scope(data["scope"]))
        return describe_rule(rule)


@blp.route("/explain")
class RuleExplanation(MethodView):
    @require(*READERS)
    @blp.arguments(
        ExplainInputSchema,
        examples={
            "member": {"value": {"rule": EXAMPLE_TEXT, "member_id": "M-1001"}},
            "purchase": {
                "value": {
                    "rule": "event.amount >= 200 and purchase_count >= 1",
                    "member_id": "M-1001",
                    "event": {
                        "amount": "268.00",
                        "store": "SH-001",
                        "channel": "ecom",
                        "items": [{"sku": "A-1", "category": "shoes"}],
                    },
                }
            },
        },
    )
    @blp.response(200, ExplanationSchema)
    def post(self, data: dict[str, Any]) -> dict[str, Any]:
        """Evaluate a rule for one member (and event) and show why: every leaf with its value."""
        vocab = default_vocabulary()
        event = data.get("event")
        scope = Scope(data.get("scope") or (Scope.EVENT if event else Scope.MEMBER))
        rule = rule_or_422(data["rule"], vocab, scope)
        now = data.get("at") or datetime.now(UTC)
        with unit_of_work() as session:
            found = member_id_for(session, data["member_id"])
            scope_store = current_principal().store_id
            if found is None or (scope_store is not None and found[1] != scope_store):
                raise NotFound("member not found", errors={"member_id": ["unknown member"]})
            facts = load_member_facts(session, [found[0]])[found[0]]
            ev = None
            if event is not None:
                event.setdefault("occurred_at", now)
                ev = event_facts(event, store_region(session, event["store"]))
        result = explain(rule, vocab, facts, ev, now=now).to_json()
        result["member_id"] = data["member_id"]
        return result


@blp.route("")
class Rules(MethodView):
    @require(*READERS)
    @blp.arguments(RuleListArgs, location="query")
    @blp.response(200, RulePageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """Saved rules (latest version of each), by name, paginated by cursor."""
        with unit_of_work() as session:
            items, cursor = list_rules(session, after=args.get("cursor"), limit=args["limit"])
        return {"items": items, "next_cursor": cursor}

    @require(*WRITERS)
    @blp.arguments(
        RuleCreateSchema,
        example={"name": "win-back-sms", "rule": EXAMPLE_TEXT, "description": "Lapsed spenders"},
    )
    @blp.response(201, RuleVersionSchema)
    def post(self, data: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """Save a new rule as version 1 (409 if the name exists)."""
        with unit_of_work() as session:
            saved = create_rule(
                session,
                default_vocabulary(),
                data["name"],
                data["rule"],
                scope=Scope(data["scope"]),
                description=data["description"],
                actor=current_principal().actor,
            )
        return saved, 201


@blp.route("/<string:name>")
class RuleByName(MethodView):
    @require(*READERS)
    @blp.response(200, RuleVersionSchema)
    def get(self, name: str) -> dict[str, Any]:
        """The latest version of a rule."""
        with unit_of_work() as session:
            return get_rule(session, name)

    @require(*WRITERS)
    @blp.arguments(RuleEditSchema, example={"rule": EXAMPLE_TEXT, "base_version": 1})
    @blp.response(201, RuleVersionSchema)
    @blp.alt_response(200, schema=RuleVersionSchema, description="Same content: nothing changed")
    def put(self, data: dict[str, Any], name: str) -> tuple[dict[str, Any], int]:
        """Save an edit as the next version (versions are immutable)."""
        with unit_of_work() as session:
            saved, created = save_version(
                session,
                default_vocabulary(),
                name,
                data["rule"],
                description=data.get("description"),
                base_version=data.get("base_version"),
                actor=current_principal().actor,
            )
        return saved, 201 if created else 200


@blp.route("/<string:name>/versions")
class RuleVersions(MethodView):
    @require(*READERS)
    @blp.response(200, RuleVersionListSchema)
    def get(self, name: str) -> dict[str, Any]:
        """Every version of a rule, oldest first."""
        with unit_of_work() as session:
            return {"items": list_versions(session, name)}


@blp.route("/<string:name>/versions/<int:version>")
class RuleVersionByNumber(MethodView):
    @require(*READERS)
    @blp.response(200, RuleVersionSchema)
    def get(self, name: str, version: int) -> dict[str, Any]:
        """One version of a rule."""
        with unit_of_work() as session:
            return get_rule(session, name, version)
