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
    ends = datetime.combine(end_day, end, tzinfo=tz).astimezone(UTC)
    # In the hour repeated when clocks go back, the (first) end may already be past:
    # then the quiet hours are over.
    return ends if ends > moment else None


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


# --- the same policy, set-based -------------------------------------------------------
#
# The worker applies the rules above to a whole chunk in one statement (`chunk_sql`):
# per message the channel (preferred, else the first usable one in the fallback order)
# and its contact point, the member's counted contacts per channel (one index probe for
# the cap-th most recent, shared by the member's messages in the chunk), the slots the
# chunk's earlier messages take, and the deferral time in the member's zone. It agrees
# with `decide` (a property-based test runs both against PostgreSQL); `decide` stays the
# readable reference.


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _consent_sql(channel: str) -> str:
    """SQL: the member (alias m) consents to `channel` (an SQL expression)."""
    whens = " ".join(
        f"WHEN {_quote(name)} THEN " + ("true" if flag is None else f"COALESCE(m.{flag}, false)")
        for name, flag in CONSENT_FOR.items()
    )
    return f"(CASE {channel} {whens} ELSE false END)"


# JSON values Python treats as false (`attributes.get(key) or ...`).
_JSON_FALSY = "('null', 'false', '0', '\"\"', '[]', '{}')"


def _attribute_sql(key: str) -> str:
    value = f"(m.attributes -> {_quote(key)})"
    return (
        f"(CASE WHEN {value} IS NULL OR {value} IN {_JSON_FALSY} THEN NULL "
        f"ELSE m.attributes ->> {_quote(key)} END)"
    )


def _contact_sql(channel: str) -> str:
    """SQL: where `channel` reaches the member (alias m), NULL when nowhere (`contact_point`)."""
    external = "NULLIF(m.external_id, '')"
    return (
        f"(CASE {channel} "
        "WHEN 'email' THEN NULLIF(m.email, '') "
        "WHEN 'sms' THEN NULLIF(m.phone, '') WHEN 'call_centre' THEN NULLIF(m.phone, '') "
        f"WHEN 'push' THEN COALESCE({_attribute_sql('push_token')}, {external}) "
        f"WHEN 'wechat' THEN {_attribute_sql('wechat_openid')} "
        f"WHEN 'webhook' THEN {external} END)"
    )


def _usable_sql(channel: str) -> str:
    return f"({_consent_sql(channel)} AND {_contact_sql(channel)} IS NOT NULL)"


def _interval(days: float) -> str:
    return f"make_interval(secs => {float(days) * 86400.0!r})"


def _instant_sql(local: str, tz: str) -> str:
    """SQL: the instant of wall-clock `local` in zone `tz`, as zoneinfo (fold=0) reads it.

    PostgreSQL gives an ambiguous time (the hour repeated when clocks go back) the later
    instant, zoneinfo the earlier one: take the earlier when `local` also maps to an
    instant under the offset in force a day before. Times in a gap already agree.
    """
    cand = f"(({local}) AT TIME ZONE {tz})"
    before = f"({cand} - interval '1 day')"
    offset = f"(({before} AT TIME ZONE {tz}) - ({before} AT TIME ZONE 'UTC'))"
    alt = f"((({local}) - {offset}) AT TIME ZONE 'UTC')"
    return (
        f"(CASE WHEN {alt} < {cand} AND ({alt} AT TIME ZONE {tz}) = ({local}) "
        f"THEN {alt} ELSE {cand} END)"
    )


def _quiet_sql(moment: str, tz: str, start: time, end: time) -> tuple[str, str]:
    """SQL (is `moment` in quiet hours in zone `tz`, when they end) — as `quiet_until`."""
    local = f"(({moment}) AT TIME ZONE {tz})"
    clock, day = f"{local}::time", f"{local}::date"
    s, e = f"time {_quote(start.isoformat())}", f"time {_quote(end.isoformat())}"
    if start < end:
        quiet = f"({clock} >= {s} AND {clock} < {e})"
        end_day = day
    else:  # across midnight
        quiet = f"({clock} >= {s} OR {clock} < {e})"
        end_day = f"({day} + CASE WHEN {clock} >= {s} THEN 1 ELSE 0 END)"
    ends = _instant_sql(f"({end_day} + {e})", tz)
    # As in `quiet_until`: an end already past (the repeated hour) means not quiet.
    return f"({quiet} AND {ends} > ({moment}))", ends


# The worker's clock, as `decide` takes it (a parameter, so tests can set any moment).
_NOW = "CAST(%(now)s AS timestamptz)"

# What `chunk_sql` returns per message: the action ("send", "deferred", "suppressed"),
# and for sends what rendering and sending need.
CHUNK_COLUMNS = (
    "action",
    "id",
    "member_id",
    "campaign_id",
    "coupon_id",
    "template",
    "channel",
    "kind",
    "payload",
    "attempts",
    "overrides",
    "to",
    "external_id",
    "name",
    "gender",
    "birth_date",
    "email",
    "phone",
    "timezone",
    "locale",
    "tier",
    "tags",
    "attributes_json",
    "store_code",
    "store_name",
    "region_name",
)


def chunk_sql(config: MessagingConfig, external: frozenset[str]) -> str:
    """The statement that applies the contact policy to claimed, locked messages.

    Parameters: `ids` (bigint[]: rows this transaction has locked, their members locked
    too), `now` (the moment the policy is applied at), `lease` (seconds), and `zones`
    (text[]: zone names both PostgreSQL and zoneinfo know; others read as UTC, as `zone`
    does) when quiet hours are on. Messages not to be sent now are written here
    (deferred / suppressed); sends on `external` channels become `sending` with a lease,
    taking their frequency-cap slot; sends on the other channels are left for the caller
    to record in this transaction. Returns one row per message (`CHUNK_COLUMNS`); only
    sends carry the message and member, with attempts counting this one.
    """
    fallback = "ARRAY[" + ", ".join(_quote(c) for c in config.fallback) + "]::text[]"
    quiet_on = (
        config.quiet_start is not None
        and config.quiet_end is not None
        and config.quiet_start != config.quiet_end
        and any(s.quiet_hours for s in config.channels.values())
    )
    settings = ", ".join(
        f"({_quote(name)}, {int(s.cap_count)}, {_interval(s.cap_days)}, "
        f"{'true' if quiet_on and s.quiet_hours else 'false'})"
        for name, s in config.channels.items()
    )
    externals = "ARRAY[" + ", ".join(_quote(c) for c in sorted(external)) + "]::text[]"
    if quiet_on and config.quiet_start is not None and config.quiet_end is not None:
        start, end = config.quiet_start, config.quiet_end
        quiet_now, end_now = _quiet_sql(_NOW, "j.tz", start, end)
        quiet_free, end_free = _quiet_sql("q.free", "j.tz", start, end)
        quiet_free_q, end_free_q = _quiet_sql("q.free_q", "j.tz", start, end)
        zone = "CASE WHEN m.timezone = ANY(%(zones)s) THEN m.timezone ELSE 'UTC' END"
    else:
        quiet_now = quiet_free = quiet_free_q = "false"
        end_now = end_free = end_free_q = "NULL::timestamptz"
        zone = "'UTC'"
    # As `decide`: the cap at now (counting the sends of the chunk's earlier messages),
    # then quiet hours. A cap move may land in quiet hours and a quiet move on a capped
    # moment; after one of each both hold (a later moment only frees slots).
    # Every interpolated value is a validated setting (channel names, numbers, times).
    return f"""
WITH msg AS MATERIALIZED (
    SELECT o.id, o.member_id, o.campaign_id, o.coupon_id, o.template, o.channel, o.kind,
           o.not_after, o.payload, o.attempts,
           m.external_id, m.name, m.gender, m.birth_date, m.email, m.phone, m.timezone,
           m.locale, m.tier, m.tags, m.attributes::text AS attributes_json,
           m.home_store_id, c.ch, {_contact_sql("c.ch")} AS to_, {zone} AS tz,
           CASE WHEN m.status = 'erased' THEN 'member_erased'
                WHEN o.not_after IS NOT NULL AND {_NOW} > o.not_after THEN 'expired'
                WHEN c.ch IS NULL THEN
                    CASE WHEN (SELECT bool_or({_consent_sql("x.ch")})
                               FROM unnest(ARRAY[o.channel] || {fallback}) AS x(ch))
                         THEN 'no_contact' ELSE 'no_consent' END
           END AS stop
    FROM outbox_messages o
    JOIN members m ON m.id = o.member_id
    CROSS JOIN LATERAL (
        SELECT CASE WHEN {_usable_sql("o.channel")} THEN o.channel
                    ELSE (SELECT f.ch FROM unnest({fallback}) WITH ORDINALITY AS f(ch, n)
                          WHERE f.ch IS DISTINCT FROM o.channel AND {_usable_sql("f.ch")}
                          ORDER BY f.n LIMIT 1)
               END AS ch
        OFFSET 0  -- evaluated once per message, not once per use of c.ch
    ) c
    WHERE o.id = ANY(%(ids)s)
),
judged AS MATERIALIZED (
    SELECT g.id, g.member_id, g.kind, g.not_after, g.ch, g.tz, g.stop, s.k, s.d,
           COALESCE(s.quiet, false) AS quiet,
           count(*) FILTER (WHERE g.kind = 'marketing' AND g.stop IS NULL)
               OVER (PARTITION BY g.member_id, g.ch ORDER BY g.id) AS mk_upto
    FROM msg g
    LEFT JOIN (VALUES {settings}) AS s(ch, k, d, quiet) ON s.ch = g.ch
),
recent AS (
    SELECT p.member_id, p.ch, t.times
    FROM (SELECT DISTINCT member_id, ch, k, d FROM judged WHERE stop IS NULL AND k > 0) p
    CROSS JOIN LATERAL (
        SELECT array_agg(x.contacted_at ORDER BY x.contacted_at DESC) AS times
        FROM (SELECT contacted_at FROM outbox_messages
              WHERE member_id = p.member_id AND sent_channel = p.ch AND kind = 'marketing'
                AND status IN ('sending', 'sent') AND contacted_at IS NOT NULL
                AND contacted_at > {_NOW} - p.d
              ORDER BY contacted_at DESC LIMIT p.k) x
    ) t
),
decided AS (
    SELECT j.id, j.ch, j.stop, j.not_after,
           CASE
             WHEN j.stop IS NOT NULL OR j.kind <> 'marketing' THEN NULL
             WHEN q.capped_now THEN
                 CASE WHEN j.quiet AND {quiet_free} THEN {end_free} ELSE q.free END
             WHEN q.quiet_now THEN
                 CASE WHEN q.free_q IS NULL THEN q.q_end
                      WHEN {quiet_free_q} THEN {end_free_q}
                      ELSE q.free_q END
           END AS defer_to,
           CASE WHEN q.capped_now THEN 'frequency_cap' WHEN q.quiet_now THEN 'quiet_hours'
           END AS why,
           CASE WHEN j.kind <> 'marketing' AND j.stop IS NULL
                THEN concat_ws(',', CASE WHEN q.capped_now THEN 'frequency_cap' END,
                                    CASE WHEN q.quiet_now THEN 'quiet_hours' END)
           END AS overrides
    FROM judged j
    LEFT JOIN recent r ON r.member_id = j.member_id AND r.ch = j.ch
    CROSS JOIN LATERAL (
        SELECT COALESCE(cardinality(r.times), 0) AS c,
               COALESCE(j.quiet AND {quiet_now}, false) AS quiet_now
    ) a
    CROSS JOIN LATERAL (
        SELECT a.quiet_now,
               COALESCE(j.k > 0 AND CASE
                   WHEN a.quiet_now THEN a.c >= j.k
                   WHEN j.kind = 'marketing' THEN j.mk_upto > GREATEST(j.k - a.c, 0)
                   -- a transactional message sees the slots the chunk's earlier
                   -- marketing messages took (mk_upto counts them)
                   ELSE a.c + LEAST(j.mk_upto, GREATEST(j.k - a.c, 0)) >= j.k
               END, false) AS capped_now,
               -- the cap-th most recent contact (or this chunk's sends, now) + window
               COALESCE(r.times[a.c], {_NOW}) + j.d AS free,
               CASE WHEN a.quiet_now THEN {end_now} END AS q_end
    ) q0
    CROSS JOIN LATERAL (
        SELECT q0.*,
               CASE WHEN q0.quiet_now AND j.k > 0 AND a.c >= j.k
                         AND r.times[j.k] > q0.q_end - j.d
                    THEN r.times[j.k] + j.d END AS free_q
    ) q
),
final AS (
    SELECT d.*,
           CASE WHEN d.stop IS NOT NULL THEN 'suppressed'
                WHEN d.defer_to IS NULL THEN 'send'
                WHEN d.not_after IS NOT NULL AND d.defer_to > d.not_after THEN 'suppressed'
                ELSE 'deferred' END AS action
    FROM decided d
),
written AS (
    UPDATE outbox_messages o SET
        status = CASE WHEN f.action = 'send' THEN 'sending' ELSE f.action END,
        sent_channel = COALESCE(f.ch, o.sent_channel),
        reason = CASE WHEN f.action <> 'send' THEN COALESCE(f.stop, f.why) END,
        last_error = CASE WHEN f.action = 'suppressed' AND f.stop IS NULL
                          THEN 'the next allowed moment is after the offer expires' END,
        not_before = CASE WHEN f.action = 'deferred' THEN f.defer_to ELSE o.not_before END,
        dispatched_at = CASE WHEN f.action = 'deferred' THEN NULL ELSE o.dispatched_at END,
        attempts = o.attempts + CASE WHEN f.action = 'send' THEN 1 ELSE 0 END,
        lease_until = CASE WHEN f.action = 'send'
                           THEN {_NOW} + make_interval(secs => %(lease)s) END,
        contacted_at = CASE WHEN f.action = 'send' AND o.kind = 'marketing' THEN {_NOW} END,
        sent_at = NULL,
        overrides = CASE WHEN f.overrides <> '' THEN string_to_array(f.overrides, ',')
                         ELSE o.overrides END,
        updated_at = now()
    FROM final f
    WHERE o.id = f.id AND (f.action <> 'send' OR f.ch = ANY({externals}))
)
SELECT f.action, f.id, g.member_id, g.campaign_id, g.coupon_id, g.template, g.ch, g.kind,
       g.payload, g.attempts + 1, f.overrides, g.to_,
       g.external_id, g.name, g.gender, g.birth_date, g.email, g.phone, g.timezone,
       g.locale, g.tier, g.tags, g.attributes_json, st.code, st.name, rg.name
FROM final f
LEFT JOIN msg g ON g.id = f.id AND f.action = 'send'
LEFT JOIN stores st ON st.id = g.home_store_id
LEFT JOIN regions rg ON rg.id = st.region_id
ORDER BY f.id
"""  # noqa: S608
