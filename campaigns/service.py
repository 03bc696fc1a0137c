"""Campaign definitions: create, version, lifecycle with four-eyes approval, audit.

Services take the session and never commit. Every change bumps the campaign
generation so API processes recompile their cached event campaigns.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from marshmallow import ValidationError
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from campaigns.definition import load_definition
from campaigns.engine import bump_generation, face_value_of, parse_condition
from campaigns.models import Campaign, CampaignVersion, Status
from rules import RuleSyntaxError, RuleValidationError
from service.audit import record as audit
from service.errors import Conflict, Forbidden, NotFound, ValidationFailed

# Which transitions each action allows (from → to is decided by the action).
_EDITABLE = {Status.DRAFT.value, Status.PAUSED.value, Status.PENDING_APPROVAL.value}


def _flatten(messages: Any, prefix: str = "") -> dict[str, list[str]]:
    """marshmallow's nested messages as {"trigger.cron": [...]} (the field's path)."""
    out: dict[str, list[str]] = {}
    if isinstance(messages, dict):
        for key, value in messages.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict):
                out.update(_flatten(value, path))
            else:
                out[path] = [str(v) for v in (value if isinstance(value, list) else [value])]
    else:
        out[prefix or "_schema"] = [str(messages)]
    return out


def validate_definition(session: Session, raw: Any) -> dict[str, Any]:
    """Shape, then every reference; a 422 naming each bad field."""
    try:
        definition = load_definition(raw)
    except ValidationError as exc:
        raise ValidationFailed(
            "The campaign definition is invalid.", errors=_flatten(exc.messages)
        ) from None
    errors = check_references(session, definition)
    if errors:
        raise ValidationFailed("The campaign refers to things that do not exist.", errors=errors)
    return definition


def check_references(session: Session, d: dict[str, Any]) -> dict[str, list[str]]:
    """Everything the definition names must exist now (rules, segments, templates...)."""
    errors: dict[str, list[str]] = {}
    try:
        parse_condition(d)
    except RuleSyntaxError as exc:
        errors["condition"] = [f"does not parse: {exc}"]
    except RuleValidationError as exc:
        errors["condition"] = [f"{p.pointer or '/'}: {p.message}" for p in exc.problems]
    trigger = d["trigger"]
    names = set(d["audience"].get("segments", []))
    if trigger["type"] == "segment_entry":
        names.add(trigger["segment"])
    if names:
        found = set(
            session.scalars(
                text(
                    "SELECT name FROM segments WHERE name = ANY(:n) AND archived_at IS NULL"
                ).bindparams(n=sorted(names))
            )
        )
        missing = sorted(names - found)
        if missing:
            key = "audience.segments" if names - {trigger.get("segment")} else "trigger.segment"
            errors[key] = [f"unknown segment(s): {', '.join(missing)}"]
    for key, table in (("stores", "stores"), ("regions", "regions")):
        wanted = set(d["audience"].get(key, []))
        if wanted:
            found = set(
                session.scalars(
                    text(f"SELECT code FROM {table} WHERE code = ANY(:c)").bindparams(  # noqa: S608
                        c=sorted(wanted)
                    )
                )
            )
            if wanted - found:
                errors[f"audience.{key}"] = [f"unknown {key}: {', '.join(sorted(wanted - found))}"]
    if trigger["type"] == "calendar":
        from campaigns.calendar_dates import validate_name

        bad = []
        for name in trigger["dates"]:
            try:
                validate_name(name)
            except ValueError as exc:
                bad.append(str(exc))
        if bad:
            errors["trigger.dates"] = bad
    tiers = [t for t in (d["actions"].get("tier", {}).get("to"), trigger.get("to")) if t]
    if tiers:
        known = set(session.scalars(text("SELECT name FROM tiers")))
        for path, name in (
            ("actions.tier.to", d["actions"].get("tier", {}).get("to")),
            ("trigger.to", trigger.get("to")),
        ):
            if name and name not in known:
                errors[path] = [f"unknown tier {name!r}; tiers are {', '.join(sorted(known))}"]
    coupon = d["actions"].get("coupon")
    if coupon:
        from campaigns.coupons import get_template

        template = get_template(session, coupon["template"])
        if template is None:
            errors["actions.coupon.template"] = [f"unknown coupon template {coupon['template']!r}"]
        elif getattr(template, "archived", False):
            errors["actions.coupon.template"] = [
                f"coupon template {coupon['template']!r} is archived"
            ]
    message = d["actions"].get("message")
    if message:
        from campaigns.templates import template_exists

        if not template_exists(session, message["template"]):
            errors["actions.message.template"] = [
                f"unknown message template {message['template']!r}"
            ]
    return errors


def _columns(session: Session, d: dict[str, Any], approval_budget: Decimal) -> dict[str, Any]:
    budget = d.get("budget") or {}
    value = Decimal(budget["value"]) if budget.get("value") is not None else None
    count = budget.get("coupons")
    face = face_value_of(session, d["actions"]) if "coupon" in d["actions"] else Decimal(0)
    implied = [v for v in (value, face * count if count is not None else None) if v is not None]
    exposure = min(implied) if implied else None
    return {
        "kind": d["kind"],
        "trigger_type": d["trigger"]["type"],
        "definition": d,
        "priority": d["priority"],
        "exclusivity_group": d.get("exclusivity_group"),
        "valid_from": datetime.fromisoformat(d["valid_from"]) if d.get("valid_from") else None,
        "valid_until": datetime.fromisoformat(d["valid_until"]) if d.get("valid_until") else None,
        "budget_coupons": count,
        "budget_value": value,
        # Four-eyes for any coupon campaign that could cost more than the threshold
        # (an unbounded budget could cost anything).
        "needs_approval": "coupon" in d["actions"]
        and (exposure is None or exposure > approval_budget),
    }


def campaign_dict(row: Campaign) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "kind": row.kind,
        "status": row.status,
        "version": row.version,
        "definition": row.definition,
        "needs_approval": row.needs_approval,
        "approved_version": row.approved_version,
        "approved_by": row.approved_by,
        "approved_at": row.approved_at,
        "budget": {
            "coupons": row.budget_coupons,
            "value": str(row.budget_value) if row.budget_value is not None else None,
            "issued_coupons": row.issued_coupons,
            "issued_value": str(row.issued_value),
        },
        "created_by": row.created_by,
        "created_at": row.created_at,
        "updated_by": row.updated_by,
        "updated_at": row.updated_at,
    }


def create_campaign(
    session: Session, raw: Any, *, actor: str, approval_budget: Decimal
) -> dict[str, Any]:
    d = validate_definition(session, raw)
    if session.scalar(select(Campaign.id).where(Campaign.name == d["name"])) is not None:
        raise Conflict(
            f"campaign {d['name']!r} already exists", errors={"name": ["already exists"]}
        )
    row = Campaign(
        name=d["name"],
        status=Status.DRAFT.value,
        version=1,
        created_by=actor,
        updated_by=actor,
        **_columns(session, d, approval_budget),
    )
    session.add(row)
    session.flush()
    session.add(CampaignVersion(campaign_id=row.id, version=1, definition=d, created_by=actor))
    audit(
        session,
        actor,
        "campaign.created",
        "campaign",
        str(row.id),
        {"name": row.name, "version": 1},
    )
    bump_generation(session)
    session.flush()
    session.refresh(row)
    return campaign_dict(row)


def _row(session: Session, campaign_id: int, *, lock: bool = False) -> Campaign:
    stmt = select(Campaign).where(Campaign.id == campaign_id)
    if lock:
        stmt = stmt.with_for_update()
    row = session.scalars(stmt).first()
    if row is None:
        raise NotFound(f"campaign {campaign_id} does not exist")
    return row


def get_campaign(session: Session, campaign_id: int) -> dict[str, Any]:
    return campaign_dict(_row(session, campaign_id))


def list_campaigns(
    session: Session, *, status: str | None = None, limit: int = 50, after: int | None = None
) -> tuple[list[dict[str, Any]], int | None]:
    stmt = select(Campaign).order_by(Campaign.id).limit(limit + 1)
    if status:
        stmt = stmt.where(Campaign.status == status)
    if after is not None:
        stmt = stmt.where(Campaign.id > after)
    rows = list(session.scalars(stmt))
    more = len(rows) > limit
    rows = rows[:limit]
    return [campaign_dict(r) for r in rows], rows[-1].id if more and rows else None


def update_campaign(
    session: Session,
    campaign_id: int,
    raw: Any,
    *,
    actor: str,
    approval_budget: Decimal,
    base_version: int | None = None,
) -> dict[str, Any]:
    """Save a new version (draft, paused or pending campaigns only; approval starts over)."""
    row = _row(session, campaign_id, lock=True)
    if row.status not in _EDITABLE:
        raise Conflict(
            f"campaign {row.name!r} is {row.status}; pause it before editing",
            errors={"status": [row.status]},
        )
    if base_version is not None and base_version != row.version:
        raise Conflict(
            f"campaign {row.name!r} is at version {row.version}, not {base_version}",
            errors={"base_version": [f"latest is {row.version}"]},
        )
    d = validate_definition(session, raw)
    if d["name"] != row.name:
        raise ValidationFailed("a campaign keeps its name", errors={"name": ["cannot be changed"]})
    if d == row.definition:
        return campaign_dict(row)
    for key, value in _columns(session, d, approval_budget).items():
        setattr(row, key, value)
    row.version += 1
    row.updated_by = actor
    row.updated_at = datetime.now().astimezone()
    if row.status == Status.PENDING_APPROVAL.value:
        row.status = Status.DRAFT.value
    session.add(
        CampaignVersion(campaign_id=row.id, version=row.version, definition=d, created_by=actor)
    )
    audit(session, actor, "campaign.versioned", "campaign", str(row.id), {"version": row.version})
    bump_generation(session)
    session.flush()
    return campaign_dict(row)


def list_versions(session: Session, campaign_id: int) -> list[dict[str, Any]]:
    _row(session, campaign_id)
    rows = session.scalars(
        select(CampaignVersion)
        .where(CampaignVersion.campaign_id == campaign_id)
        .order_by(CampaignVersion.version)
    )
    return [
        {
            "version": v.version,
            "definition": v.definition,
            "created_by": v.created_by,
            "created_at": v.created_at,
        }
        for v in rows
    ]


def _transition(
    session: Session, row: Campaign, to: Status, actor: str, action: str, **detail: Any
) -> dict[str, Any]:
    before = row.status
    row.status = to.value
    row.updated_at = datetime.now().astimezone()
    audit(
        session,
        actor,
        f"campaign.{action}",
        "campaign",
        str(row.id),
        {"from": before, "to": to.value, "version": row.version, **detail},
    )
    bump_generation(session)
    session.flush()
    return campaign_dict(row)


def _refuse(row: Campaign, action: str) -> Conflict:
    return Conflict(
        f"cannot {action} campaign {row.name!r} while it is {row.status}",
        errors={"status": [row.status]},
    )


def activate(session: Session, campaign_id: int, *, actor: str) -> dict[str, Any]:
    """Draft or paused → active, or → pending approval when four-eyes applies."""
    row = _row(session, campaign_id, lock=True)
    if row.status not in (Status.DRAFT.value, Status.PAUSED.value):
        raise _refuse(row, "activate")
    if row.needs_approval and row.approved_version != row.version:
        return _transition(session, row, Status.PENDING_APPROVAL, actor, "submitted")
    return _transition(session, row, Status.ACTIVE, actor, "activated")


def approve(
    session: Session, campaign_id: int, *, actor: str, note: str | None = None
) -> dict[str, Any]:
    """Four eyes: the approver is neither the campaign's author nor this version's editor."""
    row = _row(session, campaign_id, lock=True)
    if row.status != Status.PENDING_APPROVAL.value:
        raise _refuse(row, "approve")
    version_author = session.scalar(
        select(CampaignVersion.created_by).where(
            CampaignVersion.campaign_id == row.id, CampaignVersion.version == row.version
        )
    )
    if actor in (row.created_by, row.updated_by, version_author):
        raise Forbidden(
            "four-eyes rule: a campaign is approved by someone other than its author",
            errors={"approver": ["must not be the author of the campaign or of this version"]},
        )
    row.approved_version = row.version
    row.approved_by = actor
    row.approved_at = datetime.now().astimezone()
    return _transition(session, row, Status.ACTIVE, actor, "approved", note=note)


def reject(
    session: Session, campaign_id: int, *, actor: str, note: str | None = None
) -> dict[str, Any]:
    row = _row(session, campaign_id, lock=True)
    if row.status != Status.PENDING_APPROVAL.value:
        raise _refuse(row, "reject")
    return _transition(session, row, Status.DRAFT, actor, "rejected", note=note)


def pause(session: Session, campaign_id: int, *, actor: str) -> dict[str, Any]:
    row = _row(session, campaign_id, lock=True)
    if row.status != Status.ACTIVE.value:
        raise _refuse(row, "pause")
    return _transition(session, row, Status.PAUSED, actor, "paused")


def end(session: Session, campaign_id: int, *, actor: str) -> dict[str, Any]:
    row = _row(session, campaign_id, lock=True)
    if row.status == Status.ENDED.value:
        raise _refuse(row, "end")
    return _transition(session, row, Status.ENDED, actor, "ended")
