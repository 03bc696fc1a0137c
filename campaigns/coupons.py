"""Coupons: templates, issuing, bulk bearer codes, validation, redemption and rollback.

Services take a Session and never commit. The guarantees:

- Issuing is idempotent per campaign decision (unique `coupons.decision_id`).
- A redemption first inserts its idempotency record (`coupon_redemptions`, unique key),
  then consumes the coupon with ONE conditional UPDATE (`status = 'issued'` and every
  condition of the template in its WHERE clause). Two tills can never both succeed:
  the second UPDATE waits for the first's row lock, re-checks `status = 'issued'` on
  the committed row, and matches nothing. A partial unique index on live redemptions
  per coupon backs this up inside the database.
- A failed redemption writes nothing (the transaction rolls back, idempotency record
  included), so a retry with the same key is evaluated afresh: it succeeds if the
  reason went away (e.g. the coupon was rolled back), else fails with the current reason.
  A successful one is stored and replayed byte for byte.

Time rules (all in the template's `timezone`, by default PATRON_TIMEZONE when the
template was created): a coupon is valid on [valid_from, valid_until). With
`valid_days = N` it is valid from the moment of issue through the end of the N-th
local calendar day counting the day of issue (valid_until = local midnight that
starts day N + 1). Weekdays (ISO 1 = Monday) and hours [hours_from, hours_until)
are those of the local time of the redemption; hours_from > hours_until is an
overnight window (22:00-02:00).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import CursorResult, delete, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from campaigns import codes
from campaigns.models_coupons import (
    Coupon,
    CouponBatch,
    CouponKind,
    CouponRedemption,
    CouponStatus,
    CouponTemplate,
    RedemptionStatus,
)
from service.audit import record as audit
from service.cursors import decode_id, encode_id
from service.db import execute_prepared
from service.errors import Conflict, NotFound, PatronError, ValidationFailed
from service.models import Member, MemberStatus, Region, Store

CENT = Decimal("0.01")
# Bulk generation inserts in chunks of this many rows (one statement each).
BATCH_CHUNK = 250_000
# Batches up to this size are generated inside the API request; bigger ones by a job.
INLINE_BATCH_MAX = 10_000


class Reason:
    """Why a coupon cannot be used now (stable codes a till can switch on)."""

    MISTYPED = "mistyped"
    UNKNOWN = "unknown"
    VOID = "void"
    ALREADY_USED = "already_used"
    MEMBER_REQUIRED = "member_required"
    OTHER_MEMBER = "other_member"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    WRONG_STORE = "wrong_store"
    WRONG_WEEKDAY = "wrong_weekday"
    WRONG_HOUR = "wrong_hour"
    MIN_SPEND_NOT_MET = "min_spend_not_met"


REASON_DETAILS = {
    Reason.MISTYPED: "the code's check character does not match: probably a typing error",
    Reason.UNKNOWN: "no coupon has this code",
    Reason.VOID: "the coupon was voided",
    Reason.ALREADY_USED: "the coupon was already redeemed",
    Reason.MEMBER_REQUIRED: "this coupon belongs to a member: send the member's id",
    Reason.OTHER_MEMBER: "this coupon belongs to another member",
    Reason.NOT_YET_VALID: "the coupon is not valid yet",
    Reason.EXPIRED: "the coupon has expired",
    Reason.WRONG_STORE: "the coupon cannot be used at this store",
    Reason.WRONG_WEEKDAY: "the coupon cannot be used on this day of the week",
    Reason.WRONG_HOUR: "the coupon cannot be used at this time of day",
    Reason.MIN_SPEND_NOT_MET: "the order does not reach the coupon's minimum spend",
}


class CouponNotUsable(PatronError):
    """A redemption that cannot happen, with its reason code (422)."""

    status = 422
    type = "coupon-not-usable"
    title = "Coupon cannot be used"


# --------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A coupon template as the engine uses it (immutable once created)."""

    id: int
    code: str
    name: str
    description: str
    kind: str
    percent_off: Decimal | None
    amount_off: Decimal | None
    free_item_sku: str | None
    face_value: Decimal
    currency: str
    min_spend: Decimal
    valid_days: int | None
    valid_from: datetime | None
    valid_until: datetime | None
    timezone: str
    weekdays: tuple[int, ...] | None
    hours_from: time | None
    hours_until: time | None
    store_codes: tuple[str, ...] | None
    region_codes: tuple[str, ...] | None
    archived: bool
    created_at: datetime
    created_by: str

    @property
    def value(self) -> str:
        """The percentage, the amount, or the free item's SKU, as a string."""
        if self.kind == CouponKind.PERCENT:
            return str(self.percent_off)
        if self.kind == CouponKind.AMOUNT:
            return str(self.amount_off)
        return str(self.free_item_sku)


def _template(row: CouponTemplate) -> Template:
    return Template(
        id=row.id,
        code=row.code,
        name=row.name,
        description=row.description,
        kind=row.kind,
        percent_off=row.percent_off,
        amount_off=row.amount_off,
        free_item_sku=row.free_item_sku,
        face_value=row.face_value,
        currency=row.currency,
        min_spend=row.min_spend,
        valid_days=row.valid_days,
        valid_from=row.valid_from,
        valid_until=row.valid_until,
        timezone=row.timezone,
        weekdays=tuple(row.weekdays) if row.weekdays is not None else None,
        hours_from=row.hours_from,
        hours_until=row.hours_until,
        store_codes=tuple(row.store_codes) if row.store_codes is not None else None,
        region_codes=tuple(row.region_codes) if row.region_codes is not None else None,
        archived=row.archived,
        created_at=row.created_at,
        created_by=row.created_by,
    )


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value is not None else None


def _hhmm(value: time | None) -> str | None:
    return value.strftime("%H:%M") if value is not None else None


def template_dict(t: Template) -> dict[str, Any]:
    """A template as the API shows it."""
    return {
        "code": t.code,
        "name": t.name,
        "description": t.description,
        "kind": t.kind,
        "value": t.value,
        "percent_off": str(t.percent_off) if t.percent_off is not None else None,
        "amount_off": str(t.amount_off) if t.amount_off is not None else None,
        "free_item_sku": t.free_item_sku,
        "face_value": str(t.face_value),
        "currency": t.currency,
        "min_spend": str(t.min_spend),
        "valid_days": t.valid_days,
        "valid_from": _iso(t.valid_from),
        "valid_until": _iso(t.valid_until),
        "timezone": t.timezone,
        "weekdays": list(t.weekdays) if t.weekdays is not None else None,
        "hours_from": _hhmm(t.hours_from),
        "hours_until": _hhmm(t.hours_until),
        "stores": list(t.store_codes) if t.store_codes is not None else None,
        "regions": list(t.region_codes) if t.region_codes is not None else None,
        "archived": t.archived,
        "created_at": _iso(t.created_at),
        "created_by": t.created_by,
    }


def get_template(session: Session, code: str) -> Template | None:
    """The template with this code (archived ones too), or None."""
    row = session.scalar(select(CouponTemplate).where(CouponTemplate.code == code))
    return _template(row) if row is not None else None


def require_template(session: Session, code: str) -> Template:
    found = get_template(session, code)
    if found is None:
        raise NotFound(f"coupon template {code!r} not found", errors={"template": ["unknown"]})
    return found


def _money(value: Any) -> Decimal:
    return Decimal(str(value)).quantize(CENT)


def create_template(
    session: Session,
    data: Mapping[str, Any],
    *,
    actor: str,
    default_timezone: str,
    currency: str,
) -> Template:
    """Validate and store a template (field checks in the API schema; the rules across
    fields and against stores / regions here). Duplicate codes are a 409."""
    errors: dict[str, list[str]] = {}

    def err(field: str, message: str) -> None:
        errors.setdefault(field, []).append(message)

    kind = data["kind"]
    kind_fields = {
        CouponKind.PERCENT: "percent_off",
        CouponKind.AMOUNT: "amount_off",
        CouponKind.FREE_ITEM: "free_item_sku",
    }
    for k, field in kind_fields.items():
        if k == kind and data.get(field) is None:
            err(field, f"required for kind {kind!r}")
        elif k != kind and data.get(field) is not None:
            err(field, f"only allowed for kind {k.value!r}")
    face_value = data.get("face_value")
    if kind == CouponKind.AMOUNT and data.get("amount_off") is not None:
        if face_value is None:
            face_value = data["amount_off"]
        elif face_value != data["amount_off"]:
            err("face_value", "must equal amount_off for kind 'amount' (or be left out)")
    elif face_value is None:
        what = "the largest discount of one coupon" if kind == "percent" else "the item's value"
        err("face_value", f"required for kind {kind!r}: {what}")
    if data.get("currency", currency) != currency:
        err("currency", f"must be {currency} (this deployment's currency)")
    has_days = data.get("valid_days") is not None
    has_from, has_until = data.get("valid_from") is not None, data.get("valid_until") is not None
    if has_days and (has_from or has_until):
        err("valid_days", "give either valid_days or valid_from and valid_until, not both")
    elif not has_days and not (has_from and has_until):
        if not has_from and not has_until:
            err("valid_days", "required unless valid_from and valid_until are given")
        else:
            err("valid_until" if has_from else "valid_from", "give both valid_from and valid_until")
    elif has_from and has_until and data["valid_from"] >= data["valid_until"]:
        err("valid_until", "must be after valid_from")
    if (data.get("hours_from") is None) != (data.get("hours_until") is None):
        err("hours_until" if data.get("hours_from") else "hours_from", "give both hours or none")
    elif data.get("hours_from") is not None and data["hours_from"] == data["hours_until"]:
        err("hours_until", "must differ from hours_from (leave both out for all day)")
    stores = data.get("stores")
    if stores:
        found = set(session.scalars(select(Store.code).where(Store.code.in_(stores))))
        missing = sorted(set(stores) - found)
        if missing:
            err("stores", f"unknown store codes: {', '.join(missing)}")
    regions = data.get("regions")
    if regions:
        found = set(session.scalars(select(Region.code).where(Region.code.in_(regions))))
        missing = sorted(set(regions) - found)
        if missing:
            err("regions", f"unknown region codes: {', '.join(missing)}")
    if errors:
        raise ValidationFailed("The coupon template is not consistent.", errors=errors)

    weekdays = data.get("weekdays")
    row = CouponTemplate(
        code=data["code"],
        name=data["name"],
        description=data.get("description", ""),
        kind=kind,
        percent_off=data.get("percent_off"),
        amount_off=data.get("amount_off"),
        free_item_sku=data.get("free_item_sku"),
        face_value=face_value,
        currency=currency,
        min_spend=data.get("min_spend") or Decimal("0"),
        valid_days=data.get("valid_days"),
        valid_from=data.get("valid_from"),
        valid_until=data.get("valid_until"),
        timezone=data.get("timezone") or default_timezone,
        weekdays=sorted(set(weekdays)) if weekdays else None,
        hours_from=data.get("hours_from"),
        hours_until=data.get("hours_until"),
        store_codes=sorted(set(stores)) if stores else None,
        region_codes=sorted(set(regions)) if regions else None,
        created_by=actor,
    )
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError as exc:
        if "uq_coupon_templates_code" in str(exc.orig):
            raise Conflict(
                f"a coupon template {data['code']!r} already exists",
                errors={"code": ["already used by another template"]},
            ) from None
        raise
    audit(session, actor, "coupon_template.created", "coupon_template", row.code, {"kind": kind})
    # As stored (NUMERIC scale, server defaults), so the answer equals a later GET.
    session.refresh(row)
    return _template(row)


def encode_cursor(template_id: int) -> str:
    return encode_id("ct", template_id)


def decode_cursor(cursor: str) -> int:
    return decode_id("ct", cursor)


def list_templates(
    session: Session, *, cursor: str | None, limit: int, include_archived: bool
) -> tuple[list[Template], str | None]:
    """Templates in creation order, paginated by cursor."""
    stmt = select(CouponTemplate)
    if not include_archived:
        stmt = stmt.where(CouponTemplate.archived.is_(False))
    if cursor is not None:
        stmt = stmt.where(CouponTemplate.id > decode_cursor(cursor))
    rows = session.scalars(stmt.order_by(CouponTemplate.id).limit(limit + 1)).all()
    page = [_template(r) for r in rows[:limit]]
    return page, encode_cursor(rows[limit - 1].id) if len(rows) > limit else None


def archive_template(session: Session, code: str, *, actor: str) -> Template:
    """Stop issuing from a template; coupons already issued stay usable. Idempotent."""
    require_template(session, code)
    changed = session.execute(
        update(CouponTemplate)
        .where(CouponTemplate.code == code, CouponTemplate.archived.is_(False))
        .values(archived=True, archived_at=func.now())
        .returning(CouponTemplate.id)
    ).first()
    if changed is not None:
        audit(session, actor, "coupon_template.archived", "coupon_template", code)
    session.expire_all()
    return require_template(session, code)


# --------------------------------------------------------------------------------------
# Issuing
# --------------------------------------------------------------------------------------


def validity(template: Template, issued_at: datetime) -> tuple[datetime, datetime]:
    """(valid_from, valid_until) of a coupon issued at `issued_at` (aware, UTC out)."""
    if issued_at.tzinfo is None:
        raise ValueError("issued_at must be timezone-aware")
    if template.valid_days is None:
        assert template.valid_from is not None
        assert template.valid_until is not None
        return template.valid_from.astimezone(UTC), template.valid_until.astimezone(UTC)
    zone = ZoneInfo(template.timezone)
    first_invalid = issued_at.astimezone(zone).date() + timedelta(days=template.valid_days)
    # The local midnight that ends the last valid day, in the template's zone.
    until = datetime.combine(first_invalid, time(0), tzinfo=zone).astimezone(UTC)
    return issued_at.astimezone(UTC), until


def issuable(template: Template, at: datetime) -> str | None:
    """Why coupons cannot be issued from `template` at `at` (None when they can)."""
    if template.archived:
        return "template_archived"
    if template.valid_until is not None and template.valid_until <= at:
        return "template_expired"
    return None


def coupon_dict(
    code: str,
    template: Template,
    *,
    face_value: Decimal,
    valid_from: datetime,
    valid_until: datetime,
) -> dict[str, Any]:
    """The JSON shape of an issued coupon (also what the purchase response includes)."""
    return {
        "code": codes.display(code),
        "template": template.code,
        "name": template.name,
        "kind": template.kind,
        "value": template.value,
        "face_value": str(face_value),
        "min_spend": str(template.min_spend),
        "valid_from": _iso(valid_from),
        "valid_until": _iso(valid_until),
    }


_ISSUE = text(
    """
    INSERT INTO coupons (code, template_id, member_id, campaign_id, decision_id, face_value,
                         valid_from, valid_until, issued_at)
    VALUES (:code, :template_id, :member_id, :campaign_id, :decision_id, :face_value,
            :valid_from, :valid_until, :issued_at)
    ON CONFLICT DO NOTHING
    RETURNING id, code, face_value, valid_from, valid_until
    """
)


# The issue statement, for callers that hold the template already (the campaign engine).
ISSUE_STATEMENT = _ISSUE


def issue_coupon(
    session: Session,
    *,
    template_code: str,
    member_id: int,
    campaign_id: int | None,
    decision_id: int | None,
    issued_at: datetime,
) -> dict[str, Any]:
    """Issue one coupon to a member; with a decision id, at most one per decision (a
    repeat returns the coupon issued the first time). Raises NotFound for an unknown
    template and Conflict for an archived or expired one (see `issuable`). Returns
    `coupon_dict(...)` plus `id`, the coupons row id."""
    template = require_template(session, template_code)
    reason = issuable(template, issued_at)
    if reason is not None:
        raise Conflict(
            f"coupon template {template_code!r} cannot issue coupons now ({reason})",
            errors={"template": [reason]},
        )
    valid_from, valid_until = validity(template, issued_at)
    params = {
        "template_id": template.id,
        "member_id": member_id,
        "campaign_id": campaign_id,
        "decision_id": decision_id,
        "face_value": template.face_value,
        "valid_from": valid_from,
        "valid_until": valid_until,
        "issued_at": issued_at,
    }
    for _ in range(5):
        row = execute_prepared(session, _ISSUE, {**params, "code": codes.new_code()})
        if row is not None:
            break
        if decision_id is not None:
            existing = session.execute(
                select(
                    Coupon.id,
                    Coupon.code,
                    Coupon.face_value,
                    Coupon.valid_from,
                    Coupon.valid_until,
                ).where(Coupon.decision_id == decision_id)
            ).first()
            if existing is not None:
                row = existing
                break
        # Otherwise a code collision (about 1 in 2**74 per issued coupon): draw again.
    else:  # pragma: no cover - five collisions in a row mean the generator is broken
        raise RuntimeError("could not draw an unused coupon code")
    # `id` (the coupons row) lets the caller link the decision without another query.
    return {
        "id": row.id,
        **coupon_dict(
            row.code,
            template,
            face_value=row.face_value,
            valid_from=row.valid_from,
            valid_until=row.valid_until,
        ),
    }


def member_coupons(
    session: Session, member_id: int, *, at: datetime | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """A member's latest coupons for the profile; `status` is 'expired' for an unused
    coupon whose validity has ended."""
    at = at or datetime.now(UTC)
    rows = session.execute(
        select(
            Coupon.code,
            Coupon.status,
            Coupon.face_value,
            Coupon.valid_from,
            Coupon.valid_until,
            Coupon.issued_at,
            Coupon.redeemed_at,
            Coupon.campaign_id,
            CouponTemplate.code.label("template"),
            CouponTemplate.name,
            CouponTemplate.kind,
            CouponTemplate.percent_off,
            CouponTemplate.amount_off,
            CouponTemplate.free_item_sku,
        )
        .join(CouponTemplate, CouponTemplate.id == Coupon.template_id)
        .where(Coupon.member_id == member_id)
        .order_by(Coupon.issued_at.desc(), Coupon.id.desc())
        .limit(limit)
    ).all()
    out = []
    for r in rows:
        status = r.status
        if status == CouponStatus.ISSUED and r.valid_until <= at:
            status = "expired"
        value = r.percent_off if r.kind == "percent" else r.amount_off or r.free_item_sku
        out.append(
            {
                "code": codes.display(r.code),
                "template": r.template,
                "name": r.name,
                "kind": r.kind,
                "value": str(value),
                "face_value": str(r.face_value),
                "status": status,
                "valid_from": _iso(r.valid_from),
                "valid_until": _iso(r.valid_until),
                "issued_at": _iso(r.issued_at),
                "redeemed_at": _iso(r.redeemed_at),
                "campaign_id": r.campaign_id,
            }
        )
    return out


# --------------------------------------------------------------------------------------
# Bulk bearer codes
# --------------------------------------------------------------------------------------


def _batch_dict(row: Any, template_code: str) -> dict[str, Any]:
    return {
        "id": row.id,
        "template": template_code,
        "requested": row.requested,
        "generated": row.generated,
        "status": row.status,
        "label": row.label,
        "created_at": _iso(row.created_at),
        "created_by": row.created_by,
        "finished_at": _iso(row.finished_at),
    }


def get_batch(session: Session, batch_id: int) -> dict[str, Any]:
    row = session.execute(
        select(CouponBatch, CouponTemplate.code)
        .join(CouponTemplate, CouponTemplate.id == CouponBatch.template_id)
        .where(CouponBatch.id == batch_id)
    ).first()
    if row is None:
        raise NotFound(f"coupon batch {batch_id} not found")
    return _batch_dict(row[0], row[1])


def create_batch(
    session: Session,
    template_code: str,
    count: int,
    *,
    actor: str,
    label: str = "",
    idempotency_key: str | None = None,
) -> tuple[dict[str, Any], bool]:
    """Record a request for `count` bearer codes (generated by `fill_batch`); with an
    idempotency key a retry returns the first batch. Returns (batch, created)."""
    template = require_template(session, template_code)
    reason = issuable(template, datetime.now(UTC))
    if reason is not None:
        raise Conflict(
            f"coupon template {template_code!r} cannot issue coupons now ({reason})",
            errors={"template": [reason]},
        )
    if not 1 <= count <= 10_000_000:
        raise ValidationFailed("count out of range", errors={"count": ["must be 1 to 10,000,000"]})
    new_id = session.execute(
        text(
            "INSERT INTO coupon_batches (template_id, requested, idempotency_key, label,"
            " created_by) VALUES (:t, :n, :key, :label, :actor)"
            " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
        ),
        {"t": template.id, "n": count, "key": idempotency_key, "label": label, "actor": actor},
    ).scalar()
    if new_id is None:
        existing = session.execute(
            select(CouponBatch.id, CouponBatch.template_id, CouponBatch.requested).where(
                CouponBatch.idempotency_key == idempotency_key
            )
        ).one()
        if (existing.template_id, existing.requested) != (template.id, count):
            raise Conflict(
                "this Idempotency-Key was already used for a different batch",
                errors={"idempotency_key": ["already used with different content"]},
            )
        return get_batch(session, existing.id), False
    audit(
        session,
        actor,
        "coupon_batch.created",
        "coupon_batch",
        str(new_id),
        {"template": template_code, "count": count},
    )
    return get_batch(session, new_id), True


_FILL_CLAIM = text(
    """
    UPDATE coupon_batches SET status = 'done', generated = requested, finished_at = now()
    WHERE id = :id AND status = 'pending'
    RETURNING template_id, requested
    """
)

# Codes drawn inline (no function call per row) and inserted in code order, so the
# unique index on `code` is filled left to right instead of at random pages. A rare
# collision is skipped by ON CONFLICT and drawn again by the next round.
_FILL_INSERT = text(
    f"""
    INSERT INTO coupons (code, template_id, batch_id, face_value, valid_from, valid_until,
                         issued_at)
    SELECT g.code, :template_id, :batch_id, :face_value, :valid_from, :valid_until, :issued_at
    FROM (SELECT {codes.sql_code_expression("r.x", "r.y")} AS code
          FROM ({codes.SQL_RANDOM_PAIRS}) AS r) AS g
    ORDER BY g.code
    ON CONFLICT (code) DO NOTHING
    """  # noqa: S608 - generated arithmetic, values are bound parameters
)


def fill_batch(session: Session, batch_id: int, *, at: datetime | None = None) -> dict[str, Any]:
    """Generate a batch's codes set-based, exactly once: the batch row is claimed by a
    conditional UPDATE in the same transaction as the inserts (a second run waits for
    the first and then finds it done; a failed run rolls back and can be retried).
    Code collisions are skipped by the unique index and drawn again."""
    claimed = session.execute(_FILL_CLAIM, {"id": batch_id}).first()
    if claimed is None:
        return get_batch(session, batch_id)
    template = session.get(CouponTemplate, claimed.template_id)
    assert template is not None
    issued_at = at or datetime.now(UTC)
    valid_from, valid_until = validity(_template(template), issued_at)
    params = {
        "template_id": template.id,
        "batch_id": batch_id,
        "face_value": template.face_value,
        "valid_from": valid_from,
        "valid_until": valid_until,
        "issued_at": issued_at,
    }
    remaining, rounds = claimed.requested, 0
    while remaining > 0:
        rounds += 1
        if rounds > 20 + claimed.requested // BATCH_CHUNK:  # pragma: no cover
            raise RuntimeError("coupon code generation keeps colliding")
        n = min(remaining, BATCH_CHUNK)
        result = cast(CursorResult[Any], session.execute(_FILL_INSERT, {**params, "n": n}))
        remaining -= result.rowcount
    return get_batch(session, batch_id)


def fill_batch_job(batch_id: int) -> dict[str, Any]:
    """RQ job: generate a batch's codes in the worker's own unit of work (idempotent)."""
    from service.db import unit_of_work
    from service.jobs import job_app

    with job_app().app_context(), unit_of_work() as session:
        return fill_batch(session, batch_id)


def batch_codes(session: Session, batch_id: int, *, chunk: int = 10_000) -> Iterator[str]:
    """Yield the batch's codes in display form, streaming (server-side cursor)."""
    get_batch(session, batch_id)
    result = session.execute(
        select(Coupon.code).where(Coupon.batch_id == batch_id).order_by(Coupon.id),
        execution_options={"yield_per": chunk},
    )
    for code in result.scalars():
        yield codes.display(code)


# --------------------------------------------------------------------------------------
# Validation and redemption
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedeemResult:
    """What the till gets back; `replayed` is true when this answers a retry."""

    status: int
    body: str
    replayed: bool


def discount_for(
    kind: str,
    *,
    percent_off: Decimal | None,
    amount_off: Decimal | None,
    face_value: Decimal,
    order_amount: Decimal,
) -> Decimal:
    """The discount one coupon gives on an order: never above the face value (the cap
    of a percentage) nor above the order itself. Percentages round half up to cents."""
    if kind == CouponKind.PERCENT:
        assert percent_off is not None
        raw = (order_amount * percent_off / 100).quantize(CENT, rounding=ROUND_HALF_UP)
    elif kind == CouponKind.AMOUNT:
        assert amount_off is not None
        raw = amount_off
    else:
        raw = face_value
    return min(raw, face_value, order_amount)


def _in_hours(local: time, start: time, end: time) -> bool:
    if start < end:
        return start <= local < end
    return local >= start or local < end  # overnight window


_STATE = text(
    """
    SELECT c.id, c.code, c.status, c.member_id, c.face_value, c.valid_from, c.valid_until,
           t.code AS template, t.name, t.kind, t.percent_off, t.amount_off, t.free_item_sku,
           t.min_spend, t.timezone, t.weekdays, t.hours_from, t.hours_until,
           t.store_codes, t.region_codes,
           m.external_id AS member_external_id
    FROM coupons c
    JOIN coupon_templates t ON t.id = c.template_id
    LEFT JOIN members m ON m.id = c.member_id
    WHERE c.code = :code
    """
)


def _reason(
    row: Any,
    *,
    member_id: int | None,
    store_code: str,
    region_code: str,
    order_amount: Decimal,
    at: datetime,
) -> str | None:
    """The first condition that fails, in the order a cashier should hear about it.
    Mirrors the WHERE clause of `_REDEEM` (tests hold them to the same answers)."""
    if row is None:
        return Reason.UNKNOWN
    if row.status == CouponStatus.VOID:
        return Reason.VOID
    if row.status == CouponStatus.REDEEMED:
        return Reason.ALREADY_USED
    if row.member_id is not None and member_id is None:
        return Reason.MEMBER_REQUIRED
    if row.member_id is not None and row.member_id != member_id:
        return Reason.OTHER_MEMBER
    if at < row.valid_from:
        return Reason.NOT_YET_VALID
    if at >= row.valid_until:
        return Reason.EXPIRED
    if (row.store_codes is not None or row.region_codes is not None) and not (
        store_code in (row.store_codes or ()) or region_code in (row.region_codes or ())
    ):
        return Reason.WRONG_STORE
    local = at.astimezone(ZoneInfo(row.timezone))
    if row.weekdays is not None and local.isoweekday() not in row.weekdays:
        return Reason.WRONG_WEEKDAY
    if row.hours_from is not None and not _in_hours(
        local.time().replace(tzinfo=None), row.hours_from, row.hours_until
    ):
        return Reason.WRONG_HOUR
    if order_amount < row.min_spend:
        return Reason.MIN_SPEND_NOT_MET
    return None


def _store(session: Session, store_code: str, scope_store_id: int | None) -> tuple[int, str]:
    row = session.execute(
        select(Store.id, Region.code)
        .join(Region, Region.id == Store.region_id)
        .where(Store.code == store_code)
    ).first()
    if row is None:
        raise ValidationFailed(
            f"unknown store {store_code!r}", errors={"store": [f"unknown store {store_code!r}"]}
        )
    if scope_store_id is not None and row[0] != scope_store_id:
        raise ValidationFailed(
            "this API key may only use coupons at its own store",
            errors={"store": ["this API key may only use coupons at its own store"]},
        )
    return row[0], row[1]


def _member(session: Session, external_id: str | None) -> int | None:
    if external_id is None:
        return None
    row = session.execute(
        select(Member.id, Member.status).where(Member.external_id == external_id)
    ).first()
    if row is None:
        raise ValidationFailed(
            f"unknown member {external_id!r}", errors={"member_id": ["unknown member"]}
        )
    if row.status != MemberStatus.ACTIVE:
        raise ValidationFailed(
            f"member {external_id!r} was erased", errors={"member_id": ["member was erased"]}
        )
    return int(row.id)


def validate_coupon(
    session: Session,
    *,
    code: str,
    member: str | None,
    store: str,
    order_amount: Decimal,
    at: datetime,
    scope_store_id: int | None = None,
) -> dict[str, Any]:
    """Would this coupon be accepted? Changes nothing. Unknown members / stores are input
    errors (422); an unusable coupon is an answer: valid false with a reason code."""
    _store_id, region = _store(session, store, scope_store_id)
    member_id = _member(session, member)
    normalised = codes.normalise(code)
    row = None
    if not codes.is_well_formed(normalised):
        reason: str | None = Reason.MISTYPED
    else:
        row = session.execute(_STATE, {"code": normalised}).first()
        reason = _reason(
            row,
            member_id=member_id,
            store_code=store,
            region_code=region,
            order_amount=order_amount,
            at=at,
        )
    body: dict[str, Any] = {
        "code": codes.display(normalised) if row is not None else code,
        "valid": reason is None,
        "reason": reason,
        "detail": REASON_DETAILS[reason] if reason else "the coupon can be redeemed",
        "discount": None,
        "checked_at": _iso(at),
        "coupon": None,
    }
    if row is not None:
        body["coupon"] = {
            "template": row.template,
            "name": row.name,
            "kind": row.kind,
            "value": str(
                row.percent_off if row.kind == "percent" else row.amount_off or row.free_item_sku
            ),
            "face_value": str(row.face_value),
            "min_spend": str(row.min_spend),
            "status": row.status,
            "valid_from": _iso(row.valid_from),
            "valid_until": _iso(row.valid_until),
            "member_id": row.member_external_id,
        }
    if reason is None and row is not None:
        body["discount"] = str(
            discount_for(
                row.kind,
                percent_off=row.percent_off,
                amount_off=row.amount_off,
                face_value=row.face_value,
                order_amount=order_amount,
            )
        )
    if reason == Reason.MIN_SPEND_NOT_MET and row is not None:
        body["missing_spend"] = str(row.min_spend - order_amount)
    return body


def redemption_hash(
    code: str, member: str | None, store: str, order_amount: Decimal, transaction_id: str | None
) -> bytes:
    """Hash of the canonical redemption request: a reused key with another body is a 409."""
    canonical = json.dumps(
        [code, member, store, str(order_amount.quantize(CENT)), transaction_id],
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).digest()


# The idempotency record first, then the single conditional UPDATE, in one round trip:
# `used` joins `ins`, so nothing is consumed unless this request's record was inserted.
# A concurrent request with the same key waits on the unique index and then inserts
# nothing; a concurrent request for the same coupon waits on its row lock and then
# re-checks `status = 'issued'` against the committed row (EvalPlanQual).
# {member} and {region} are the member's id and the store's region code.
_CONDITIONS = """
      c.status = 'issued' AND t.id = c.template_id
      AND c.valid_from <= CAST(:at AS timestamptz) AND CAST(:at AS timestamptz) < c.valid_until
      AND (c.member_id IS NULL OR c.member_id = {member})
      AND ((t.store_codes IS NULL AND t.region_codes IS NULL)
           OR CAST(:store AS text) = ANY (t.store_codes)
           OR {region} = ANY (t.region_codes))
      AND (t.weekdays IS NULL
           OR CAST(extract(isodow FROM lt.local) AS smallint) = ANY (t.weekdays))
      AND (t.hours_from IS NULL
           OR (t.hours_from < t.hours_until
               AND CAST(lt.local AS time) >= t.hours_from
               AND CAST(lt.local AS time) < t.hours_until)
           OR (t.hours_from > t.hours_until
               AND (CAST(lt.local AS time) >= t.hours_from
                    OR CAST(lt.local AS time) < t.hours_until)))
      AND t.min_spend <= CAST(:order_amount AS numeric)
"""
# The redemption instant as wall-clock time in the template's zone.
_LOCAL = "LATERAL (SELECT CAST(:at AS timestamptz) AT TIME ZONE t.timezone AS local) lt"
_RETURNING = """
    RETURNING c.id, c.code, c.face_value, t.code AS template, t.name, t.kind, t.percent_off,
              t.amount_off, t.free_item_sku
"""

# Store (within the key's scope) and member are looked up in the same statement: an
# unknown one inserts nothing, which the slow path then explains.
_REDEEM = text(
    f"""
    WITH st AS (
        SELECT s.id, r.code AS region
        FROM stores s JOIN regions r ON r.id = s.region_id
        WHERE s.code = :store AND (CAST(:scope AS integer) IS NULL OR s.id = :scope)
    ), mem AS (
        SELECT id FROM members WHERE external_id = :member AND status = 'active'
    ), ins AS (
        INSERT INTO coupon_redemptions (idempotency_key, request_hash, coupon_id, member_id,
                                        store_id, transaction_id, order_amount)
        SELECT :key, :hash, (SELECT id FROM coupons WHERE code = :code), (SELECT id FROM mem),
               st.id, :transaction_id, :order_amount
        FROM st
        WHERE CAST(:member AS text) IS NULL OR EXISTS (SELECT 1 FROM mem)
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING id, member_id
    ), used AS (
        UPDATE coupons c SET status = 'redeemed', redeemed_at = CAST(:at AS timestamptz)
        FROM ins, st, coupon_templates t, {_LOCAL}
        WHERE c.code = :code
          AND {_CONDITIONS.format(member="ins.member_id", region="st.region")}
        {_RETURNING}
    )
    SELECT ins.id AS redemption_id, used.* FROM ins LEFT JOIN used ON true
    """  # noqa: S608 - fixed SQL fragments, values are bound parameters
)

# The same consumption alone, for the rare retry after the coupon was rolled back
# between this statement's snapshot and its explanation.
_CONSUME = text(
    f"""
    UPDATE coupons c SET status = 'redeemed', redeemed_at = CAST(:at AS timestamptz)
    FROM coupon_templates t, {_LOCAL}
    WHERE c.code = :code
      AND {_CONDITIONS.format(member="CAST(:member_id AS bigint)", region="CAST(:region AS text)")}
    {_RETURNING}
    """  # noqa: S608 - fixed SQL fragments, values are bound parameters
)

_COMPLETE = text(
    """
    UPDATE coupon_redemptions
    SET status = 'redeemed', coupon_id = :coupon_id, discount = :discount, response = :response
    WHERE id = :id
    """
)


def _replay_redemption(session: Session, key: str, digest: bytes) -> RedeemResult:
    row = session.execute(
        select(CouponRedemption.request_hash, CouponRedemption.response).where(
            CouponRedemption.idempotency_key == key
        )
    ).one()
    if row.request_hash != digest:
        raise Conflict(
            "this Idempotency-Key was already used for a different redemption",
            errors={"Idempotency-Key": ["already used with different content"]},
        )
    return RedeemResult(status=201, body=row.response, replayed=True)


def redeem(
    session: Session,
    *,
    idempotency_key: str,
    code: str,
    member: str | None,
    store: str,
    order_amount: Decimal,
    transaction_id: str | None,
    at: datetime,
    currency: str,
    scope_store_id: int | None = None,
) -> RedeemResult:
    """Redeem a coupon exactly once per idempotency key (see the module docstring)."""
    normalised = codes.normalise(code)
    digest = redemption_hash(normalised, member, store, order_amount, transaction_id)
    if not codes.is_well_formed(normalised):
        _store(session, store, scope_store_id)
        _member(session, member)
        # Nothing to consume; a replay of an earlier success with this key still wins.
        if session.scalar(
            select(CouponRedemption.id).where(CouponRedemption.idempotency_key == idempotency_key)
        ):
            return _replay_redemption(session, idempotency_key, digest)
        raise CouponNotUsable(
            REASON_DETAILS[Reason.MISTYPED], reason=Reason.MISTYPED, errors={"code": ["mistyped"]}
        )
    params: dict[str, Any] = {
        "key": idempotency_key,
        "hash": digest,
        "code": normalised,
        "member": member,
        "store": store,
        "scope": scope_store_id,
        "transaction_id": transaction_id,
        "order_amount": order_amount,
        "at": at,
    }
    row = execute_prepared(session, _REDEEM, params)
    if row is None:
        # Either an unknown / out-of-scope store or member (these raise), or a retry.
        _store(session, store, scope_store_id)
        _member(session, member)
        return _replay_redemption(session, idempotency_key, digest)
    if row.id is None:
        _store_id, region = _store(session, store, scope_store_id)
        member_id = _member(session, member)
        params.update(member_id=member_id, region=region)
        state = session.execute(_STATE, {"code": normalised}).first()
        reason = _reason(
            state,
            member_id=member_id,
            store_code=store,
            region_code=region,
            order_amount=order_amount,
            at=at,
        )
        if reason is None:
            # Rolled back after our snapshot was taken: it is usable now, consume it.
            consumed = session.execute(_CONSUME, params).first()
            if consumed is None:
                state = session.execute(_STATE, {"code": normalised}).first()
                reason = (
                    _reason(
                        state,
                        member_id=member_id,
                        store_code=store,
                        region_code=region,
                        order_amount=order_amount,
                        at=at,
                    )
                    or Reason.ALREADY_USED
                )
            else:
                redemption_id = row.redemption_id
                row = consumed
        if reason is not None:
            # Nothing of a failed attempt stays, even for a caller that goes on to
            # commit: a retry with this key is evaluated afresh.
            session.execute(
                delete(CouponRedemption).where(
                    CouponRedemption.id == row.redemption_id,
                    CouponRedemption.status == RedemptionStatus.PENDING.value,
                )
            )
            raise CouponNotUsable(REASON_DETAILS[reason], reason=reason)
    else:
        redemption_id = row.redemption_id
    discount = discount_for(
        row.kind,
        percent_off=row.percent_off,
        amount_off=row.amount_off,
        face_value=row.face_value,
        order_amount=order_amount,
    )
    value = row.percent_off if row.kind == "percent" else row.amount_off or row.free_item_sku
    body = {
        "redemption_id": redemption_id,
        "status": RedemptionStatus.REDEEMED.value,
        "code": codes.display(row.code),
        "template": row.template,
        "name": row.name,
        "kind": row.kind,
        "value": str(value),
        "discount": str(discount),
        "order_amount": str(order_amount.quantize(CENT)),
        "currency": currency,
        "member_id": member,
        "store": store,
        "transaction_id": transaction_id,
        "redeemed_at": _iso(at),
    }
    text_body = json.dumps(body)
    execute_prepared(
        session,
        _COMPLETE,
        {"coupon_id": row.id, "discount": discount, "response": text_body, "id": redemption_id},
    )
    return RedeemResult(status=201, body=text_body, replayed=False)


_ROLLBACK = text(
    """
    WITH r AS (
        UPDATE coupon_redemptions
        SET status = 'rolled_back', rolled_back_at = :at, rollback_reason = :reason
        WHERE id = :id AND status = 'redeemed'
          AND (CAST(:scope AS integer) IS NULL OR store_id = :scope)
        RETURNING coupon_id
    )
    UPDATE coupons c SET status = 'issued', redeemed_at = NULL
    FROM r WHERE c.id = r.coupon_id AND c.status = 'redeemed'
    RETURNING c.id
    """
)


def get_redemption(
    session: Session, redemption_id: int, *, scope_store_id: int | None = None
) -> dict[str, Any]:
    row = session.execute(
        select(
            CouponRedemption,
            Coupon.code,
            Coupon.status.label("coupon_status"),
            Store.code.label("store"),
            Member.external_id,
        )
        .join(Coupon, Coupon.id == CouponRedemption.coupon_id)
        .join(Store, Store.id == CouponRedemption.store_id)
        .outerjoin(Member, Member.id == CouponRedemption.member_id)
        .where(
            CouponRedemption.id == redemption_id,
            CouponRedemption.status != RedemptionStatus.PENDING.value,
        )
    ).first()
    if row is None or (scope_store_id is not None and row[0].store_id != scope_store_id):
        raise NotFound(f"redemption {redemption_id} not found")
    r = row[0]
    return {
        "redemption_id": r.id,
        "status": r.status,
        "code": codes.display(row.code),
        "coupon_status": row.coupon_status,
        "discount": str(r.discount),
        "order_amount": str(r.order_amount),
        "member_id": row.external_id,
        "store": row.store,
        "transaction_id": r.transaction_id,
        "redeemed_at": _iso(r.created_at),
        "rolled_back_at": _iso(r.rolled_back_at),
        "rollback_reason": r.rollback_reason,
    }


def rollback_redemption(
    session: Session,
    redemption_id: int,
    *,
    reason: str,
    at: datetime,
    scope_store_id: int | None = None,
) -> dict[str, Any]:
    """Undo a redemption (refund or void of the sale): the coupon is usable again.
    One conditional statement; repeating it changes nothing and returns the same state."""
    session.execute(
        _ROLLBACK, {"id": redemption_id, "reason": reason, "at": at, "scope": scope_store_id}
    )
    return get_redemption(session, redemption_id, scope_store_id=scope_store_id)


def get_coupon(session: Session, code: str) -> dict[str, Any]:
    """One coupon with its template and state."""
    normalised = codes.normalise(code)
    row = session.execute(_STATE, {"code": normalised}).first() if normalised else None
    if row is None:
        raise NotFound(f"coupon {code!r} not found", errors={"code": ["unknown"]})
    extra = session.execute(
        select(
            Coupon.campaign_id, Coupon.batch_id, Coupon.issued_at, Coupon.redeemed_at,
            Coupon.voided_at,
        ).where(Coupon.id == row.id)
    ).one()  # fmt: skip
    return {
        "code": codes.display(row.code),
        "template": row.template,
        "name": row.name,
        "kind": row.kind,
        "value": str(
            row.percent_off if row.kind == "percent" else row.amount_off or row.free_item_sku
        ),
        "face_value": str(row.face_value),
        "min_spend": str(row.min_spend),
        "status": row.status,
        "member_id": row.member_external_id,
        "campaign_id": extra.campaign_id,
        "batch_id": extra.batch_id,
        "valid_from": _iso(row.valid_from),
        "valid_until": _iso(row.valid_until),
        "issued_at": _iso(extra.issued_at),
        "redeemed_at": _iso(extra.redeemed_at),
        "voided_at": _iso(extra.voided_at),
    }


def void_coupon(session: Session, code: str, *, actor: str) -> dict[str, Any]:
    """Cancel an unused coupon (staff); idempotent; a redeemed coupon cannot be voided."""
    normalised = codes.normalise(code)
    changed = session.execute(
        update(Coupon)
        .where(Coupon.code == normalised, Coupon.status == CouponStatus.ISSUED.value)
        .values(status=CouponStatus.VOID.value, voided_at=func.now())
        .returning(Coupon.id)
    ).first()
    current = get_coupon(session, normalised)
    if changed is not None:
        audit(session, actor, "coupon.voided", "coupon", normalised)
    elif current["status"] == CouponStatus.REDEEMED:
        raise Conflict(
            "a redeemed coupon cannot be voided; roll the redemption back first",
            errors={"code": ["already redeemed"]},
        )
    return current


def count_codes(session: Session, batch_id: int) -> int:
    return int(session.scalar(select(func.count()).where(Coupon.batch_id == batch_id)) or 0)


def bulk_issue_params(template: Template, issued_at: datetime) -> dict[str, Any]:
    """Bind parameters for a set-based issue `INSERT … SELECT patron_coupon_code(), …`."""
    valid_from, valid_until = validity(template, issued_at)
    return {
        "template_id": template.id,
        "face_value": template.face_value,
        "valid_from": valid_from,
        "valid_until": valid_until,
        "issued_at": issued_at,
    }
