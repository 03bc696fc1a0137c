"""Stores and regions: the chain is headquarters → regions → stores."""

from __future__ import annotations

from typing import Any

from sqlalchemy import literal_column, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from service.audit import record as audit
from service.models import Region, Store


def ensure_region(session: Session, code: str) -> int:
    """Return the id of region `code`, creating it (named after its code) if new."""
    stmt = (
        insert(Region)
        .values(code=code, name=code)
        .on_conflict_do_update(index_elements=[Region.code], set_={"code": code})
        .returning(Region.id)
    )
    return int(session.execute(stmt).scalar_one())


def upsert_store(
    session: Session, code: str, name: str, region: str, *, actor: str
) -> tuple[dict[str, Any], bool]:
    """Create or rename/move a store; returns (store, created)."""
    region_id = ensure_region(session, region)
    ins = insert(Store).values(code=code, name=name, region_id=region_id)
    stmt: Any = ins.on_conflict_do_update(
        index_elements=[Store.code],
        set_={"name": ins.excluded.name, "region_id": ins.excluded.region_id},
    ).returning(Store.id, literal_column("(xmax = 0)").label("created"))
    created = session.execute(stmt).one()
    audit(session, actor, "store.upserted", "store", code, {"name": name, "region": region})
    return get_store(session, code), bool(created.created)


def get_store(session: Session, code: str) -> dict[str, Any]:
    row = (
        session.execute(
            select(Store.code, Store.name, Region.code.label("region"), Store.created_at)
            .join(Region, Region.id == Store.region_id)
            .where(Store.code == code)
        )
        .mappings()
        .one()
    )
    return dict(row)


def list_stores(session: Session, region: str | None = None) -> list[dict[str, Any]]:
    """All stores (a chain has hundreds, not millions), optionally of one region."""
    stmt = select(Store.code, Store.name, Region.code.label("region"), Store.created_at).join(
        Region, Region.id == Store.region_id
    )
    if region is not None:
        stmt = stmt.where(Region.code == region)
    return [dict(r) for r in session.execute(stmt.order_by(Store.code)).mappings()]
