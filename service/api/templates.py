"""Message templates (`/v1/templates`): per channel and locale, validated, previewed."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import fields, validate

from campaigns import templates
from campaigns.channels.config import CHANNELS, MessagingConfig
from service.api.schemas import BaseSchema
from service.auth import current_principal, require
from service.db import unit_of_work
from service.models import Role

blp = Blueprint(
    "templates",
    __name__,
    url_prefix="/v1/templates",
    description=(
        "Message templates: one text per channel and locale (Jinja2, sandboxed). Variables: "
        "member, coupon, tier, store, campaign, message, extra; anything else is rejected "
        "when saved. A message picks the member's locale, then the default, then en."
    ),
)

READERS = (Role.MARKETER, Role.APPROVER, Role.ANALYST)
WRITERS = (Role.MARKETER,)


class VariantInputSchema(BaseSchema):
    subject = fields.String(load_default="", validate=validate.Length(max=templates.MAX_SOURCE))
    body = fields.String(required=True, validate=validate.Length(min=1, max=templates.MAX_SOURCE))


class VariantSchema(BaseSchema):
    name = fields.String()
    channel = fields.String()
    locale = fields.String()
    subject = fields.String()
    body = fields.String()
    version = fields.Integer()
    updated_at = fields.DateTime()
    updated_by = fields.String()


class MessageTemplateSchema(BaseSchema):
    name = fields.String()
    variants = fields.List(fields.Nested(VariantSchema))


class MessageTemplateSummarySchema(BaseSchema):
    name = fields.String()
    variants = fields.List(fields.String(), metadata={"description": "channel:locale pairs"})
    updated_at = fields.DateTime()


class MessageTemplateListSchema(BaseSchema):
    items = fields.List(fields.Nested(MessageTemplateSummarySchema))


class VariablesSchema(BaseSchema):
    variables = fields.Dict(keys=fields.String(), values=fields.Dict())


class PreviewInputSchema(BaseSchema):
    member_id = fields.String(required=True, validate=validate.Length(min=1, max=64))
    channel = fields.String(
        validate=validate.OneOf(CHANNELS),
        metadata={"description": "Default: the member's first consented channel."},
    )
    locale = fields.String(validate=validate.Length(min=2, max=16))
    coupon = fields.Dict(
        metadata={"description": "code, value / amount_off / percent_off, kind, valid_until"}
    )
    payload = fields.Dict(metadata={"description": "The message payload (`extra`)."})


class PreviewSchema(BaseSchema):
    name = fields.String()
    channel = fields.String()
    locale = fields.String()
    version = fields.Integer()
    subject = fields.String()
    body = fields.String()
    member_id = fields.String()
    no_channel_reason = fields.String(
        allow_none=True,
        metadata={"description": "Why no channel would reach the member now (if none)."},
    )


PATH = "/<string:name>/<string:channel>/<string:locale>"


@blp.route("")
class Templates(MethodView):
    @require(*READERS)
    @blp.response(200, MessageTemplateListSchema)
    def get(self) -> dict[str, Any]:
        """Template names with their channel:locale variants."""
        with unit_of_work() as session:
            return {"items": templates.list_templates(session)}


@blp.route("/variables")
class Variables(MethodView):
    @require(*READERS)
    @blp.response(200, VariablesSchema)
    def get(self) -> dict[str, Any]:
        """The variables (and their fields) templates may use."""
        return {
            "variables": {
                name: {
                    "fields": sorted(allowed) if allowed is not None else None,
                    "description": templates.VARIABLE_HELP[name],
                }
                for name, allowed in templates.VARIABLES.items()
            }
        }


@blp.route("/<string:name>")
class TemplateByName(MethodView):
    @require(*READERS)
    @blp.response(200, MessageTemplateSchema)
    def get(self, name: str) -> dict[str, Any]:
        """Every variant of a template."""
        with unit_of_work() as session:
            return templates.get_template(session, name)


@blp.route(PATH)
class TemplateVariant(MethodView):
    @require(*WRITERS)
    @blp.arguments(
        VariantInputSchema,
        example={
            "subject": "{{ member.name }}，生日快乐",
            "body": "送您 {{ coupon.value }} 元券 {{ coupon.code }}，{{ coupon.expiry }} 前有效。",
        },
    )
    @blp.response(201, VariantSchema)
    @blp.alt_response(200, schema=VariantSchema, description="An existing variant was replaced")
    @blp.alt_response(422, description="Syntax error or unknown variable, per field")
    def put(
        self, data: dict[str, Any], name: str, channel: str, locale: str
    ) -> tuple[dict[str, Any], int]:
        """Create or replace the variant of a template for a channel and locale. Audited."""
        with unit_of_work() as session:
            saved, created = templates.save_variant(
                session,
                name,
                channel,
                locale,
                subject=data["subject"],
                body=data["body"],
                actor=current_principal().actor,
            )
        return saved, 201 if created else 200

    @require(*WRITERS)
    @blp.response(204)
    def delete(self, name: str, channel: str, locale: str) -> None:
        """Delete one variant. Audited."""
        with unit_of_work() as session:
            templates.delete_variant(
                session, name, channel, locale, actor=current_principal().actor
            )


@blp.route("/<string:name>/preview")
class TemplatePreview(MethodView):
    @require(*READERS)
    @blp.arguments(PreviewInputSchema, example={"member_id": "M-1001", "channel": "sms"})
    @blp.response(200, PreviewSchema)
    def post(self, data: dict[str, Any], name: str) -> dict[str, Any]:
        """Render a template for a member (a sample coupon unless one is given); sends nothing."""
        config = MessagingConfig.from_env()
        with unit_of_work() as session:
            return templates.preview(
                session,
                name,
                member_external_id=data["member_id"],
                channel=data.get("channel"),
                locale=data.get("locale"),
                coupon=data.get("coupon"),
                payload=data.get("payload"),
                fallback=config.fallback,
                default_locale=config.default_locale,
            )
