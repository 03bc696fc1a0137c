"""Contact policy, checked when a message is about to be sent.

Consent and contact points pick the channel (the preferred one, else the first
consented one in the fallback order); the member's frequency cap per channel and
quiet hours in the member's time zone defer a marketing message to the next
allowed moment — or suppress it when that moment is after the offer expires.
Transactional messages override the cap and quiet hours (recorded), never consent.

Pure functions: the worker reads members and recent contacts under a row lock and
asks `decide` what to do with each message.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from campaigns.channels.config import MessagingConfig

# Channel → the member's consent flag it needs (None: an internal channel, no consent).
# A call-centre call uses the phone number, so it needs the consent given for it.
CONSENT_FOR = {
    "email": "consent_email",
    "sms": "consent_sms",
    "push": "consent_push",
    "wechat": "consent_wechat",
    "call_centre": "consent_sms",
    "webhook": None,
}


class Reason(enum.StrEnum):
    NO_CONSENT = "no_consent"
    NO_CONTACT = "no_contact"
    FREQUENCY_CAP = "frequency_cap"
    QUIET_HOURS = "quiet_hours"
    EXPIRED = "expired"
    MEMBER_ERASED = "member_erased"
    TEMPLATE_MISSING = "template_missing"
    RENDER_ERROR = "render_error"
    PERMANENT_ERROR = "permanent_error"
    RETRY = "retry"
    LEASE_EXPIRED = "lease_expired"
    MAX_ATTEMPTS = "max_attempts"


@dataclass(frozen=True)
class Decision:
    action: str  # "send" | "defer" | "suppress"
    channel: str | None = None
    not_before: datetime | None = None
    reason: str | None = None
    overrides: tuple[str, ...] = field(default_factory=tuple)


def contact_point(channel: str, member: Mapping[str, Any]) -> str | None:
    """Where this channel reaches the member, or None."""
    attributes = member.get("attributes") or {}
    if channel == "email":
        return member.get("email") or None
    if channel in ("sms", "call_centre"):
        return member.get("phone") or None
    if channel == "push":
        # App push providers address a device token, or the member's id as an alias.
        return str(attributes.get("push_token") or member.get("external_id") or "") or None
    if channel == "wechat":
        openid = attributes.get("wechat_openid")
        return str(openid) if openid else None
    if channel == "webhook":
        return str(member.get("external_id") or "") or None
    return None


def has_consent(channel: str, member: Mapping[str, Any]) -> bool:
    flag = CONSENT_FOR.get(channel)
    return True if flag is None else bool(member.get(flag))


def resolve_channel(
    preferred: str | None, member: Mapping[str, Any], fallback: Sequence[str]
) -> tuple[str | None, str | None]:
    """(channel, None) for the first usable channel, or (None, reason) when there is none."""
    order = [preferred] if preferred else []
    order += [c for c in fallback if c != preferred]
    consented_without_contact = False
    for channel in order:
        if channel not in CONSENT_FOR or not has_consent(channel, member):
            continue
        if contact_point(channel, member):
            return channel, None
        consented_without_contact = True
    return None, (Reason.NO_CONTACT if consented_without_contact else Reason.NO_CONSENT).value


def zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def quiet_until(
    moment: datetime, timezone: str | None, start: time | None, end: time | None
) -> datetime | None:
    """If `moment` falls in the quiet hours of the member's zone, when they end (UTC)."""
    if start is None or end is None or start == end:
        return None
    tz = zone(timezone)
    local = moment.astimezone(tz)
    clock = local.time().replace(tzinfo=None)
    if start < end:
        quiet = start <= clock < end
        end_day = local.date()
    else:  # across midnight, e.g. 21:00-09:00
        quiet = clock >= start or clock < end
        end_day = local.date() + timedelta(days=1) if clock >= start else local.date()
    if not quiet:
        return None
    # Wall-clock end in the member's zone; across a DST gap zoneinfo moves it forward.
    ends = datetime.combine(end_day, end, tzinfo=tz)
    return ends.astimezone(UTC)


def cap_free_at(
    contacts: Sequence[datetime], moment: datetime, cap_count: int, cap_days: float
) -> datetime | None:
    """If the cap is reached at `moment`, when a slot frees (else None)."""
    if cap_count <= 0:
        return None
    window = timedelta(days=cap_days)
    recent = sorted((c for c in contacts if c > moment - window), reverse=True)
    if len(recent) < cap_count:
        return None
    # The slot frees when the cap-th most recent contact leaves the window.
    return recent[cap_count - 1] + window


def decide(
    message: Mapping[str, Any],
    member: Mapping[str, Any],
    contacts: Mapping[str, Sequence[datetime]],
    config: MessagingConfig,
    now: datetime,
) -> Decision:
    """What to do with one message now. `contacts`: this member's counted contacts per channel."""
    not_after = message.get("not_after")
    if member.get("status") == "erased":
        return Decision("suppress", reason=Reason.MEMBER_ERASED.value)
    if not_after is not None and now > not_after:
        return Decision("suppress", reason=Reason.EXPIRED.value)
    channel, why = resolve_channel(message.get("channel"), member, config.fallback)
    if channel is None:
        return Decision("suppress", reason=why)
    settings = config.channels[channel]
    transactional = message.get("kind") == "transactional"
    overrides: list[str] = []
    when = now
    reason: str | None = None
    # Moving past the cap may land in quiet hours and the other way round: iterate.
    for _ in range(4):
        moved = False
        free = cap_free_at(contacts.get(channel, ()), when, settings.cap_count, settings.cap_days)
        if free is not None:
            if transactional:
                overrides.append(Reason.FREQUENCY_CAP.value)
            else:
                when, reason, moved = free, Reason.FREQUENCY_CAP.value, True
        if settings.quiet_hours:
            ends = quiet_until(when, member.get("timezone"), config.quiet_start, config.quiet_end)
            if ends is not None:
                if transactional:
                    overrides.append(Reason.QUIET_HOURS.value)
                else:
                    when, reason, moved = ends, reason or Reason.QUIET_HOURS.value, True
        if not moved or transactional:
            break
    if when > now:
        if not_after is not None and when > not_after:
            return Decision("suppress", channel=channel, reason=reason)
        return Decision("defer", channel=channel, not_before=when, reason=reason)
    return Decision("send", channel=channel, overrides=tuple(sorted(set(overrides))))
