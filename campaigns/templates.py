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


class _Slow(Exception):
    """The fast renderer met something only Jinja knows how to print (or how to refuse)."""


# A step of a variable path: (is_getattr, key). Getattr on a dict is a key lookup unless
# the name is one of dict's own attributes (`extra.items` prints the method in Jinja).
_Step = tuple[bool, Any]
_DICT_ATTRIBUTES = frozenset(dir(dict))


class Fast:
    """A template that is only text and `{{ variable.path }}` outputs, rendered without Jinja.

    Most message templates are exactly that. Jinja's sandboxed render costs ~30 µs per
    call (a new context, sandboxed attribute lookups); this costs one dict lookup per
    path step. It only handles what it can print exactly as Jinja would — plain dicts,
    present keys, str() of the value, None as "" — and raises `_Slow` for anything else
    (a missing key, a list, a dict method name), so the caller renders that message with
    Jinja, which prints it or raises the proper error. Both agree (a property-based test).
    """

    __slots__ = ("parts", "roots")

    def __init__(self, parts: list[str | tuple[str, tuple[_Step, ...]]]) -> None:
        self.parts = parts
        self.roots = frozenset(p[0] for p in parts if isinstance(p, tuple))

    @classmethod
    def compile(cls, source: str) -> Fast | None:
        """The fast form of a template, or None when it needs Jinja."""
        try:
            tree = _ENV.parse(source)
        except TemplateSyntaxError:
            return None
        parts: list[str | tuple[str, tuple[_Step, ...]]] = []
        for output in tree.body:
            if not isinstance(output, nodes.Output):
                return None
            for node in output.nodes:
                if isinstance(node, nodes.TemplateData):
                    parts.append(node.data)
                    continue
                steps: list[_Step] = []
                current: Any = node
                while not isinstance(current, nodes.Name):
                    if isinstance(current, nodes.Getattr):
                        if current.attr in _DICT_ATTRIBUTES:
                            return None
                        steps.append((True, current.attr))
                    elif isinstance(current, nodes.Getitem) and isinstance(
                        current.arg, nodes.Const
                    ):
                        if type(current.arg.value) not in (str, int):
                            return None
                        steps.append((False, current.arg.value))
                    else:
                        return None
                    current = current.node
                if current.name not in VARIABLES or current.ctx != "load":
                    return None
                parts.append((current.name, tuple(reversed(steps))))
        return cls(parts)

    def render(self, context: Mapping[str, Any]) -> str:
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            root, steps = part
            try:
                value = context[root]
            except KeyError:
                raise _Slow from None
            for _, key in steps:
                # Only plain dicts holding the key: everything else is Jinja's to judge.
                if type(value) is not dict or key not in value:
                    raise _Slow
                value = value[key]
            out.append("" if value is None else str(value))
        return "".join(out)


class Compiled:
    """One variant compiled once per process: the fast form where possible, else Jinja."""

    __slots__ = ("body", "body_fast", "roots", "subject", "subject_fast")

    def __init__(self, variant: Variant) -> None:
        self.subject = _ENV.from_string(variant.subject)
        self.body = _ENV.from_string(variant.body)
        self.subject_fast = Fast.compile(variant.subject)
        self.body_fast = Fast.compile(variant.body)
        roots: set[str] = set()
        for source in (variant.subject, variant.body):
            roots |= meta.find_undeclared_variables(_ENV.parse(source))
        # The variables this variant reads: the worker builds only those.
        self.roots = frozenset(roots)

    def render(self, context: Mapping[str, Any]) -> tuple[str, str]:
        if self.subject_fast is not None:
            try:
                subject = self.subject_fast.render(context)
            except _Slow:
                subject = self.subject.render(context)
        else:
            subject = self.subject.render(context)
        if self.body_fast is not None:
            try:
                body = self.body_fast.render(context)
            except _Slow:
                body = self.body.render(context)
        else:
            body = self.body.render(context)
        return subject.strip(), body


class _Compiled:
    """Compiled templates of this process, keyed by variant id and version."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[int, int], Compiled] = {}

    def get(self, variant: Variant) -> Compiled:
        key = (variant.id, variant.version)
        found = self._items.get(key)
        if found is None:
            found = Compiled(variant)
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


def compiled(variant: Variant) -> Compiled:
    """This process's compiled form of a variant (compiled on first use)."""
    return _COMPILED.get(variant)


def render(variant: Variant, context: Mapping[str, Any]) -> tuple[str, str]:
    """(subject, body) of a variant for one message; raises on a render error."""
    return _COMPILED.get(variant).render(context)


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
    roots: frozenset[str] | None = None,
) -> dict[str, Any]:
    """The variables a template sees for one member and message.

    `roots`: build only these variables (the ones a compiled variant reads: the worker
    builds nothing else per message). A variable not built is undefined, as any unknown
    name is.
    """
    payload = dict(payload or {})
    context: dict[str, Any] = {}
    wanted = VARIABLES.keys() if roots is None else roots
    if "member" in wanted:
        birth = member.get("birth_date")
        context["member"] = {
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
        }
    if "tier" in wanted:
        context["tier"] = {"name": member.get("tier")}
    if "store" in wanted:
        context["store"] = {
            "code": member.get("store_code"),
            "name": member.get("store_name"),
            "region": member.get("region_name"),
        }
    if "campaign" in wanted:
        context["campaign"] = {"id": (message or {}).get("campaign_id")}
    if "message" in wanted:
        context["message"] = {
            k: (message or {}).get(k) for k in ("id", "channel", "kind", "template")
        }
    if "extra" in wanted:
        context["extra"] = payload
    if "coupon" in wanted:
        # Always defined, so a template can say {% if coupon %} for messages without one.
        context["coupon"] = None
        # A campaign may pass the coupon (or tier / store details) in the payload itself.
        payload_coupon = payload.get("coupon")
        if coupon is not None:
            context["coupon"] = dict(coupon)
        elif isinstance(payload_coupon, Mapping):
            context["coupon"] = coupon_context(payload_coupon, member.get("timezone") or "UTC")
    for key in ("tier", "store"):
        if key in context and isinstance(payload.get(key), Mapping):
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
