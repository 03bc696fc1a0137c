"""Members: `/v1/members`."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from service.api.schemas import (
    ErasureSchema,
    MemberCreateSchema,
    MemberFieldsSchema,
    MemberListArgs,
    MemberPageSchema,
    MemberSchema,
    ProfileSchema,
)
from service.auth import current_principal, require
from service.db import unit_of_work
from service.members import (
    erase_member,
    get_member,
    get_profile,
    list_members,
    update_member,
    upsert_member,
)
from service.models import Role

blp = Blueprint("members", __name__, url_prefix="/v1/members", description="Members")

READERS = (Role.MARKETER, Role.APPROVER, Role.ANALYST, Role.POS)
WRITERS = (Role.MARKETER, Role.POS)


def _scope() -> int | None:
    return current_principal().store_id


@blp.route("")
class Members(MethodView):
    @require(*READERS)
    @blp.arguments(MemberListArgs, location="query")
    @blp.response(200, MemberPageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List members by cursor, filtered by store, region, tier or tag."""
        with unit_of_work() as session:
            items, next_cursor = list_members(session, **args, scope_store_id=_scope())
        return {"items": items, "next_cursor": next_cursor}

    @require(*WRITERS)
    @blp.arguments(MemberCreateSchema)
    @blp.response(201, MemberSchema)
    @blp.alt_response(200, schema=MemberSchema, description="An existing member was updated")
    def post(self, data: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """Create a member, or update the given fields of the member with this external id."""
        external_id = data.pop("external_id")
        with unit_of_work() as session:
            member, created = upsert_member(
                session, external_id, data, scope_store_id=_scope(), actor=current_principal().actor
            )
        return member, 201 if created else 200


@blp.route("/<string:external_id>")
class MemberById(MethodView):
    @require(*READERS)
    @blp.response(200, MemberSchema)
    def get(self, external_id: str) -> dict[str, Any]:
        """Get one member."""
        with unit_of_work() as session:
            return get_member(session, external_id, scope_store_id=_scope())

    @require(*WRITERS)
    @blp.arguments(MemberFieldsSchema)
    @blp.response(201, MemberSchema)
    @blp.alt_response(200, schema=MemberSchema, description="An existing member was updated")
    def put(self, data: dict[str, Any], external_id: str) -> tuple[dict[str, Any], int]:
        """Create or update the member with this external id."""
        with unit_of_work() as session:
            member, created = upsert_member(
                session, external_id, data, scope_store_id=_scope(), actor=current_principal().actor
            )
        return member, 201 if created else 200

    @require(*WRITERS)
    @blp.arguments(MemberFieldsSchema)
    @blp.response(200, MemberSchema)
    def patch(self, data: dict[str, Any], external_id: str) -> dict[str, Any]:
        """Change some fields of a member."""
        with unit_of_work() as session:
            return update_member(
                session, external_id, data, scope_store_id=_scope(), actor=current_principal().actor
            )


@blp.route("/<string:external_id>/profile")
class MemberProfile(MethodView):
    @require(*READERS)
    @blp.response(200, ProfileSchema)
    def get(self, external_id: str) -> dict[str, Any]:
        """The member with statistics (and, as they land, segments, tier, coupons, decisions)."""
        with unit_of_work() as session:
            return get_profile(session, external_id, scope_store_id=_scope())


@blp.route("/<string:external_id>/erasure")
class MemberErasure(MethodView):
    @require()
    @blp.arguments(ErasureSchema)
    @blp.response(200, MemberSchema)
    def post(self, data: dict[str, Any], external_id: str) -> dict[str, Any]:
        """Erase a member's personal data (right to be forgotten); aggregates stay. Admin only."""
        with unit_of_work() as session:
            return erase_member(
                session, external_id, actor=current_principal().actor, reason=data.get("reason")
            )
