"""Members: create-or-update by external id, read, list by cursor, erase."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, func, literal, literal_column, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from service.audit import record as audit
from service.cursors import decode_id, encode_id
from service.errors import Gone, NotFound, ValidationFailed
from service.models import CONSENT_CHANNELS, Member, MemberStats, MemberStatus, Region, Store

PROFILE_FIELDS = (
    "name",
    "gender",
    "birth_date",
    "phone",
    "email",
    "timezone",
    "locale",
    "tags",
    "attributes",
)
PERSONAL_FIELDS = ("name", "gender", "birth_date", "phone", "email")


def _member_columns() -> Select[Any]:
    stmt: Select[Any] = select(  # type: ignore[assignment]
        Member.id,
        Member.external_id,
        Member.name,
        Member.gender,
        Member.birth_date,
        Member.phone,
        Member.email,
        Member.timezone,
        Member.locale,
        Store.code.label("home_store"),
        Member.consent_email,
        Member.consent_sms,
        Member.consent_push,
        Member.consent_wechat,
        Member.tier,
        Member.tags,
        Member.attributes,
        Member.status,
        Member.created_at,
        Member.updated_at,
        Member.erased_at,
    ).outerjoin(Store, Store.id == Member.home_store_id)
    return stmt


def member_dict(row: Mapping[Any, Any]) -> dict[str, Any]:
    """Shape a member row the way the API shows it."""
    data = {k: row[k] for k in ("external_id", *PROFILE_FIELDS, "home_store", "tier", "status")}
    data["consent"] = {ch: row[f"consent_{ch}"] for ch in CONSENT_CHANNELS}
    data["created_at"] = row["created_at"]
    data["updated_at"] = row["updated_at"]
    data["erased_at"] = row["erased_at"]
    return data


def store_id_for(session: Session, code: str, field: str = "home_store") -> int:
    store_id = session.scalar(select(Store.id).where(Store.code == code))
    if store_id is None:
        raise ValidationFailed(
            f"store {code!r} does not exist", errors={field: [f"unknown store {code!r}"]}
        )
    return store_id


def _values_from(session: Session, data: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {k: data[k] for k in PROFILE_FIELDS if k in data}
    if "home_store" in data:
        values["home_store_id"] = (
            store_id_for(session, data["home_store"]) if data["home_store"] is not None else None
        )
    for channel, granted in (data.get("consent") or {}).items():
        values[f"consent_{channel}"] = granted
    return values


def _check_scope(session: Session, member_store_id: int | None, scope_store_id: int | None) -> None:
    if scope_store_id is not None and member_store_id != scope_store_id:
        # Store-scoped keys must not learn whether other stores' members exist.
        raise NotFound("member not found")


def upsert_member(
    session: Session,
    external_id: str,
    data: Mapping[str, Any],
    *,
    scope_store_id: int | None = None,
    actor: str,
) -> tuple[dict[str, Any], bool]:
    """Create the member or update the given fields; returns (member, created)."""
    values = _values_from(session, data)
    if scope_store_id is not None:
        home = values.setdefault("home_store_id", scope_store_id)
        if home != scope_store_id:
            raise ValidationFailed(
                "a store-scoped key can only register members of its own store",
                errors={"home_store": ["must be the key's store"]},
            )
    ins = insert(Member).values(external_id=external_id, **values)
    update_values: dict[str, Any] = {k: ins.excluded[k] for k in values}
    update_values["updated_at"] = func.now()
    stmt: Any = ins.on_conflict_do_update(
        index_elements=[Member.external_id],
        set_=update_values,
        where=(Member.status == MemberStatus.ACTIVE.value)
        & (literal(scope_store_id is None) | (Member.home_store_id == literal(scope_store_id))),
    ).returning(Member.id, literal_column("(xmax = 0)").label("created"))
    row = session.execute(stmt).first()
    if row is None:
        existing = session.execute(
            select(Member.status, Member.home_store_id).where(Member.external_id == external_id)
        ).first()
        if existing is not None and existing.status == MemberStatus.ERASED.value:
            raise Gone(f"member {external_id!r} was erased and cannot be changed")
        raise NotFound("member not found")
    created = bool(row.created)
    audit(
        session,
        actor,
        "member.created" if created else "member.updated",
        "member",
        external_id,
        {"fields": sorted(data)},
    )
    if created:
        # Sign-up campaigns (welcome coupon / message) in the same transaction.
        from campaigns.hooks import after_signup

        after_signup(session, member_id=row.id, now=datetime.now(UTC))
    return get_member(session, external_id), created


def update_member(
    session: Session,
    external_id: str,
    data: Mapping[str, Any],
    *,
    scope_store_id: int | None = None,
    actor: str,
) -> dict[str, Any]:
    """Change some fields of an existing member."""
    current = _find(session, external_id, scope_store_id)
    if current["status"] == MemberStatus.ERASED.value:
        raise Gone(f"member {external_id!r} was erased and cannot be changed")
    values = _values_from(session, data)
    if scope_store_id is not None and values.get("home_store_id", scope_store_id) != scope_store_id:
        raise ValidationFailed(
            "a store-scoped key cannot move a member to another store",
            errors={"home_store": ["must be the key's store"]},
        )
    if values:
        session.execute(
            update(Member).where(Member.id == current["id"]).values(**values, updated_at=func.now())
        )
    audit(session, actor, "member.updated", "member", external_id, {"fields": sorted(data)})
    return get_member(session, external_id)


def _find(session: Session, external_id: str, scope_store_id: int | None) -> dict[str, Any]:
    row = (
        session.execute(
            _member_columns()
            .add_columns(Member.home_store_id)
            .where(Member.external_id == external_id)
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"member {external_id!r} not found")
    _check_scope(session, row["home_store_id"], scope_store_id)
    return dict(row)


def get_member(
    session: Session, external_id: str, *, scope_store_id: int | None = None
) -> dict[str, Any]:
    """Return one member as the API shows it."""
    return member_dict(_find(session, external_id, scope_store_id))


def encode_cursor(member_id: int) -> str:
    return encode_id("m", member_id)


def decode_cursor(cursor: str) -> int:
    return decode_id("m", cursor)


def list_members(
    session: Session,
    *,
    store: str | None = None,
    region: str | None = None,
    tier: str | None = None,
    tag: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
    scope_store_id: int | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of members in id order, and the cursor of the next page (keyset)."""
    stmt = _member_columns().add_columns(Member.id.label("member_pk"))
    if store is not None:
        stmt = stmt.where(Store.code == store)
    if region is not None:
        stmt = stmt.where(
            Member.home_store_id.in_(
                select(Store.id)
                .join(Region, Region.id == Store.region_id)
                .where(Region.code == region)
            )
        )
    if tier is not None:
        stmt = stmt.where(Member.tier == tier)
    if tag is not None:
        stmt = stmt.where(Member.tags.contains([tag]))
    if scope_store_id is not None:
        stmt = stmt.where(Member.home_store_id == scope_store_id)
    if cursor is not None:
        stmt = stmt.where(Member.id > decode_cursor(cursor))
    rows = session.execute(stmt.order_by(Member.id).limit(limit + 1)).mappings().all()
    page = [member_dict(r) for r in rows[:limit]]
    next_cursor = encode_cursor(rows[limit - 1]["member_pk"]) if len(rows) > limit else None
    return page, next_cursor


def get_profile(
    session: Session, external_id: str, *, scope_store_id: int | None = None
) -> dict[str, Any]:
    """The member with their statistics (segments, tier and offers join later)."""
    found = _find(session, external_id, scope_store_id)
    stats = (
        session.execute(
            select(
                MemberStats.first_purchase_at,
                MemberStats.last_purchase_at,
                MemberStats.purchase_count,
                MemberStats.purchase_amount,
                MemberStats.refund_count,
                MemberStats.refund_amount,
                MemberStats.net_spend,
            ).where(MemberStats.member_id == found["id"])
        )
        .mappings()
        .first()
    )
    empty = {
        "first_purchase_at": None,
        "last_purchase_at": None,
        "purchase_count": 0,
        "purchase_amount": 0,
        "refund_count": 0,
        "refund_amount": 0,
        "net_spend": 0,
    }
    from campaigns.coupons import member_coupons
    from campaigns.insights import member_decisions
    from campaigns.outbox import member_messages
    from campaigns.tiers import member_tier_profile
    from segments.profile import member_scores

    return {
        "member": member_dict(found),
        "stats": dict(stats) if stats else empty,
        "scores": member_scores(session, found["id"]),
        "tier": member_tier_profile(session, found["id"]),
        "coupons": member_coupons(session, found["id"]),
        "messages": member_messages(session, found["id"]),
        "decisions": member_decisions(session, found["id"]),
    }


def erase_member(
    session: Session, external_id: str, *, actor: str, reason: str | None = None
) -> dict[str, Any]:
    """Remove personal data; purchases and statistics stay for aggregates. Audited."""
    found = _find(session, external_id, None)
    if found["status"] == MemberStatus.ERASED.value:
        return member_dict(found)
    session.execute(
        update(Member)
        .where(Member.id == found["id"])
        .values(
            **{f: None for f in PERSONAL_FIELDS},
            tags=[],
            attributes={},
            **{f"consent_{ch}": False for ch in CONSENT_CHANNELS},
            status=MemberStatus.ERASED.value,
            erased_at=func.now(),
            updated_at=func.now(),
        )
    )
    audit(session, actor, "member.erased", "member", external_id, {"reason": reason})
    return get_member(session, external_id)
