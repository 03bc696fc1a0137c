"""Stores of the chain: `/v1/stores`."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from service.api.schemas import StoreCreateSchema, StoreListArgs, StoreListSchema, StoreSchema
from service.auth import current_principal, require
from service.db import unit_of_work
from service.models import Role
from service.stores import list_stores, upsert_store

blp = Blueprint("stores", __name__, url_prefix="/v1/stores", description="Stores and regions")

READERS = (Role.MARKETER, Role.APPROVER, Role.ANALYST, Role.POS)


@blp.route("")
class Stores(MethodView):
    @require(*READERS)
    @blp.arguments(StoreListArgs, location="query")
    @blp.response(200, StoreListSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List stores, optionally of one region."""
        with unit_of_work() as session:
            return {"items": list_stores(session, args.get("region"))}

    @require()
    @blp.arguments(StoreCreateSchema)
    @blp.response(201, StoreSchema)
    def post(self, data: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """Create a store (or rename / move it to another region). Admin only."""
        with unit_of_work() as session:
            store, created = upsert_store(
                session, data["code"], data["name"], data["region"], actor=current_principal().actor
            )
        return store, 201 if created else 200
