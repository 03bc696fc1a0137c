"""Message templates per channel and locale, rendered in Jinja2's sandbox.

Templates see a fixed set of variables (member, coupon, tier, store, campaign, message,
extra); a template naming anything else — or an unknown field of a known variable —
is rejected when saved, so a typo never reaches a member as an empty string.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import StrictUndefined, TemplateSyntaxError, meta, nodes
from jinja2.sandbox import SandboxedEnvironment
from sqlalchemy import delete, exists, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from campaigns.channels.config import CHANNELS
from campaigns.models_messaging import MessageTemplate
from service.audit import record as audit
from service.errors import NotFound, ValidationFailed

# Variable → the fields a template may read (None: any key, e.g. custom attributes).
VARIABLES: dict[str, frozenset[str] | None] = {
    "member": frozenset(
        {
            "external_id",
            "name",
            "gender",
            "birth_date",
            "email",
            "phone",
            "locale",
            "timezone",
            "tier",
            "tags",
            "attributes",
            "home_store",
        }
    ),
    "coupon": frozenset({"code", "value", "kind", "expiry", "valid_from", "face_value"}),
    "tier": frozenset({"name"}),
    "store": frozenset({"code", "name", "region"}),
    "campaign": frozenset({"id"}),
    "message": frozenset({"id", "channel", "kind", "template"}),
    "extra": None,
}
VARIABLE_HELP = {
    "member": "the member (external_id, name, birth_date, tier, attributes.<key>, ...)",
    "coupon": "the coupon of the offer: code, value, kind, expiry (date in the member's zone)",
    "tier": "the member's tier: name",
    "store": "the member's home store: code, name, region",
    "campaign": "the campaign: id",
    "message": "this message: id, channel, kind, template",
    "extra": "the message's payload (any key the campaign put there)",
}
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
LOCALE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
MAX_SOURCE = 20_000


def _finalize(value: Any) -> Any:
    # Missing optional data (a member without a name) prints as nothing, not "None".
    return "" if value is None else value


_ENV = SandboxedEnvironment(
    undefined=StrictUndefined, finalize=_finalize, autoescape=False, keep_trailing_newline=False
)


def check_source(source: str) -> list[str]:
    """Problems with one template text: syntax, unknown variables or fields."""
    if len(source) > MAX_SOURCE:
        return [f"at most {MAX_SOURCE} characters"]
    try:
        tree = _ENV.parse(source)
    except TemplateSyntaxError as exc:
        return [f"syntax error on line {exc.lineno}: {exc.message}"]
    problems = [
        f"unknown variable {name!r} (allowed: {', '.join(sorted(VARIABLES))})"
        for name in sorted(meta.find_undeclared_variables(tree))
        if name not in VARIABLES
    ]
    found: Any
    for found in tree.find_all((nodes.Getattr, nodes.Getitem)):
        node = found
        if not isinstance(node.node, nodes.Name) or node.node.name not in VARIABLES:
            continue
        allowed = VARIABLES[node.node.name]
        if allowed is None:
            continue
        if isinstance(node, nodes.Getattr):
            attr: Any = node.attr
        elif isinstance(node.arg, nodes.Const):
            attr = node.arg.value
        else:
            continue
        if attr not in allowed:
            problems.append(
                f"unknown field {node.node.name}.{attr} (allowed: {', '.join(sorted(allowed))})"
            )
    return sorted(set(problems))


def validate_variant(name: str, channel: str, locale: str, subject: str, body: str) -> None:
    errors: dict[str, list[str]] = {}
    if not NAME.match(name):
        errors["name"] = ["lowercase letters, digits and . _ - (at most 100)"]
    if channel not in CHANNELS:
        errors["channel"] = [f"must be one of: {', '.join(CHANNELS)}"]
    if not LOCALE.match(locale) or len(locale) > 16:
        errors["locale"] = ["a locale such as zh-CN or en"]
    for field_name, source in (("subject", subject), ("body", body)):
        problems = check_source(source)
        if problems:
            errors[field_name] = problems
    if not body.strip():
        errors.setdefault("body", []).append("must not be empty")
    if errors:
        raise ValidationFailed("The template is not valid.", errors=errors)


def _variant_dict(row: Any) -> dict[str, Any]:
    return {
        "name": row.name,
        "channel": row.channel,
        "locale": row.locale,
        "subject": row.subject,
        "body": row.body,
        "version": row.version,
        "updated_at": row.updated_at,
        "updated_by": row.updated_by,
    }


def save_variant(
    session: Session,
    name: str,
    channel: str,
    locale: str,
    *,
    subject: str,
    body: str,
    actor: str,
) -> tuple[dict[str, Any], bool]:
    """Create or replace one variant; returns (variant, created). Audited."""
    validate_variant(name, channel, locale, subject, body)
    stmt: Any = insert(MessageTemplate).values(
        name=name, channel=channel, locale=locale, subject=subject, body=body, updated_by=actor
    )
    stmt = stmt.on_conflict_do_update(
        constraint="uq_message_templates_variant",
        set_={
            "subject": stmt.excluded.subject,
            "body": stmt.excluded.body,
            "version": MessageTemplate.version + 1,
            "updated_at": func.now(),
            "updated_by": stmt.excluded.updated_by,
        },
    ).returning(MessageTemplate)
    row = session.execute(stmt).scalar_one()
    created = row.version == 1
    audit(
        session,
        actor,
        "template.created" if created else "template.updated",
        "message_template",
        f"{name}/{channel}/{locale}",
        {"version": row.version},
    )
    return _variant_dict(row), created


def delete_variant(session: Session, name: str, channel: str, locale: str, *, actor: str) -> None:
    deleted = session.execute(
        delete(MessageTemplate)
        .where(
            MessageTemplate.name == name,
            MessageTemplate.channel == channel,
            MessageTemplate.locale == locale,
        )
        .returning(MessageTemplate.id)
    ).first()
    if deleted is None:
        raise NotFound(f"template {name}/{channel}/{locale} does not exist")
    audit(session, actor, "template.deleted", "message_template", f"{name}/{channel}/{locale}")


def template_exists(session: Session, name: str) -> bool:
    """Whether a template of this name exists in any channel or locale (campaign validation)."""
    return bool(session.scalar(select(exists().where(MessageTemplate.name == name))))


def get_template(session: Session, name: str) -> dict[str, Any]:
    rows = session.execute(
        select(MessageTemplate)
        .where(MessageTemplate.name == name)
        .order_by(MessageTemplate.channel, MessageTemplate.locale)
    ).scalars()
    variants = [_variant_dict(r) for r in rows]
    if not variants:
        raise NotFound(f"template {name!r} does not exist", errors={"name": ["unknown template"]})
    return {"name": name, "variants": variants}


def list_templates(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(
        select(
            MessageTemplate.name,
            func.array_agg(func.distinct(MessageTemplate.channel + ":" + MessageTemplate.locale)),
            func.max(MessageTemplate.updated_at),
        )
        .group_by(MessageTemplate.name)
        .order_by(MessageTemplate.name)
    ).all()
    return [
        {"name": name, "variants": sorted(variants), "updated_at": updated}
        for name, variants, updated in rows
    ]


# --- rendering -------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    id: int
    version: int
    name: str
    channel: str
    locale: str
    subject: str
    body: str


class _Compiled:
    """Compiled templates of this process, keyed by variant id and version."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[int, int], tuple[Any, Any]] = {}

    def get(self, variant: Variant) -> tuple[Any, Any]:
        key = (variant.id, variant.version)
        found = self._items.get(key)
        if found is None:
            found = (_ENV.from_string(variant.subject), _ENV.from_string(variant.body))
            with self._lock:
                if len(self._items) > 5000:
                    self._items.clear()
                self._items[key] = found
        return found


_COMPILED = _Compiled()


class VariantCache:
    """Variants by template name, re-read from the database after `ttl` seconds."""

    def __init__(self, ttl: float = 10.0) -> None:
        self.ttl = ttl
        self._loaded: dict[str, tuple[float, list[Variant]]] = {}

    def variants(self, session: Session, names: Iterable[str]) -> dict[str, list[Variant]]:
        now = time.monotonic()
        wanted = set(names)
        stale = [n for n in wanted if now - self._loaded.get(n, (-1e9, []))[0] > self.ttl]
        if stale:
            found: dict[str, list[Variant]] = {n: [] for n in stale}
            for row in session.execute(
                select(MessageTemplate).where(MessageTemplate.name.in_(stale))
            ).scalars():
                found[row.name].append(
                    Variant(
                        row.id,
                        row.version,
                        row.name,
                        row.channel,
                        row.locale,
                        row.subject,
                        row.body,
                    )
                )
            for n, vs in found.items():
                self._loaded[n] = (now, vs)
        return {n: self._loaded[n][1] for n in wanted}


def choose(
    variants: list[Variant], channel: str, locale: str | None, default_locale: str
) -> Variant | None:
    """The variant for a channel: the member's locale, then the default, then en, then any."""
    mine = [v for v in variants if v.channel == channel]
    if not mine:
        return None
    by_locale = {v.locale: v for v in mine}
    for candidate in (locale, (locale or "").split("-")[0], default_locale, "en", "zh-CN"):
        if candidate and candidate in by_locale:
            return by_locale[candidate]
    return sorted(mine, key=lambda v: v.locale)[0]


def render(variant: Variant, context: Mapping[str, Any]) -> tuple[str, str]:
    """(subject, body) of a variant for one message; raises on a render error."""
    subject_t, body_t = _COMPILED.get(variant)
    return subject_t.render(context).strip(), body_t.render(context)


def coupon_context(row: Mapping[str, Any] | None, timezone: str) -> dict[str, Any] | None:
    """Template fields of a coupon row (code, kind, percent/amount, valid dates)."""
    if row is None:
        return None
    kind = row.get("kind")

    def number(key: str) -> Decimal | None:
        raw = row.get(key)
        if raw is None or raw == "":
            return None
        try:
            return Decimal(str(raw))
        except InvalidOperation:
            return None

    value: str | None
    if kind == "percent" and number("percent_off") is not None:
        value = f"{number('percent_off'):f}".rstrip("0").rstrip(".") + "%"
    elif number("amount_off") is not None:
        value = f"{number('amount_off'):.2f}"
    elif row.get("value") is not None:
        value = str(row["value"])
    else:
        face = number("face_value")
        value = f"{face:.2f}" if face is not None else None

    def local_day(moment: Any) -> Any:
        if isinstance(moment, datetime):
            return moment.astimezone(ZoneInfo(timezone)).date().isoformat()
        return moment

    return {
        "code": row.get("code"),
        "kind": kind,
        "value": value,
        "face_value": f"{number('face_value'):.2f}" if number("face_value") is not None else None,
        "expiry": local_day(row.get("valid_until") or row.get("expiry")),
        "valid_from": local_day(row.get("valid_from")),
    }


def build_context(
    member: Mapping[str, Any],
    *,
    coupon: Mapping[str, Any] | None = None,
    payload: Mapping[str, Any] | None = None,
    message: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The variables a template sees for one member and message."""
    payload = dict(payload or {})
    birth = member.get("birth_date")
    context: dict[str, Any] = {
        "member": {
            "external_id": member.get("external_id"),
            "name": member.get("name"),
            "gender": member.get("gender"),
            "birth_date": birth.isoformat() if isinstance(birth, date) else birth,
            "email": member.get("email"),
            "phone": member.get("phone"),
            "locale": member.get("locale"),
            "timezone": member.get("timezone"),
            "tier": member.get("tier"),
            "tags": list(member.get("tags") or []),
            "attributes": dict(member.get("attributes") or {}),
            "home_store": member.get("store_code"),
        },
        "tier": {"name": member.get("tier")},
        "store": {
            "code": member.get("store_code"),
            "name": member.get("store_name"),
            "region": member.get("region_name"),
        },
        "campaign": {"id": (message or {}).get("campaign_id")},
        "message": {k: (message or {}).get(k) for k in ("id", "channel", "kind", "template")},
        "extra": payload,
    }
    # A campaign may pass the coupon (or tier / store details) in the payload itself.
    payload_coupon = payload.get("coupon")
    # Always defined, so a template can say {% if coupon %} for messages without one.
    context["coupon"] = None
    if coupon is not None:
        context["coupon"] = dict(coupon)
    elif isinstance(payload_coupon, Mapping):
        context["coupon"] = coupon_context(payload_coupon, member.get("timezone") or "UTC")
    for key in ("tier", "store"):
        if isinstance(payload.get(key), Mapping):
            context[key] = {**context[key], **payload[key]}
    return context


def sample_coupon(timezone: str) -> dict[str, Any]:
    """A stand-in coupon for previews of templates that print one."""
    expiry = (datetime.now(ZoneInfo(timezone)) + timedelta(days=30)).date().isoformat()
    return {
        "code": "SAMPLE-CODE",
        "kind": "amount",
        "value": "50.00",
        "face_value": "50.00",
        "expiry": expiry,
        "valid_from": None,
    }


_MEMBER = text(
    """
    SELECT m.id, m.external_id, m.name, m.gender, m.birth_date, m.email, m.phone,
           m.timezone, m.locale, m.tier, m.tags, m.attributes, m.status,
           m.consent_email, m.consent_sms, m.consent_push, m.consent_wechat,
           s.code AS store_code, s.name AS store_name, r.name AS region_name
    FROM members m
    LEFT JOIN stores s ON s.id = m.home_store_id
    LEFT JOIN regions r ON r.id = s.region_id
    WHERE m.external_id = :external_id
    """
)


def preview(
    session: Session,
    name: str,
    *,
    member_external_id: str,
    channel: str | None = None,
    locale: str | None = None,
    coupon: Mapping[str, Any] | None = None,
    payload: Mapping[str, Any] | None = None,
    fallback: tuple[str, ...] = ("wechat", "push", "sms", "email"),
    default_locale: str = "zh-CN",
) -> dict[str, Any]:
    """Render a saved template for a member, as the worker would (nothing is sent)."""
    from campaigns.policy import resolve_channel

    found = session.execute(_MEMBER, {"external_id": member_external_id}).mappings().first()
    if found is None:
        raise NotFound(
            f"member {member_external_id!r} does not exist", errors={"member_id": ["unknown"]}
        )
    member = dict(found)
    variants = VariantCache(ttl=0).variants(session, [name])[name]
    if not variants:
        raise NotFound(f"template {name!r} does not exist", errors={"name": ["unknown template"]})
    reason = None
    if channel is None:
        channel, reason = resolve_channel(None, member, fallback)
        if channel is None:
            channel = sorted({v.channel for v in variants})[0]
    variant = choose(variants, channel, locale or member["locale"], default_locale)
    if variant is None:
        raise ValidationFailed(
            f"template {name!r} has no variant for {channel}",
            errors={"channel": [f"available: {', '.join(sorted({v.channel for v in variants}))}"]},
        )
    tz = member["timezone"] or "UTC"
    context = build_context(
        member,
        coupon=coupon_context(dict(coupon), tz) if coupon else sample_coupon(tz),
        payload=payload,
        message={"id": None, "channel": channel, "kind": "marketing", "template": name},
    )
    try:
        subject, body = render(variant, context)
    except Exception as exc:
        raise ValidationFailed(
            "the template cannot be rendered for this member",
            errors={"template": [f"{type(exc).__name__}: {exc}"]},
        ) from None
    return {
        "name": name,
        "channel": channel,
        "locale": variant.locale,
        "version": variant.version,
        "subject": subject,
        "body": body,
        "member_id": member_external_id,
        "no_channel_reason": reason,
    }
