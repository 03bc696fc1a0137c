"""Contact policy: consent and fallback, frequency cap, quiet hours in the member's zone."""

from __future__ import annotations

import json
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.orm import Session

from campaigns.channels.config import MessagingConfig
from campaigns.policy import cap_free_at, chunk_sql, decide, quiet_until, resolve_channel
from tests.campaigns.messaging_helpers import config_for
from tests.conftest import unique

SHANGHAI = "Asia/Shanghai"


def member(**overrides):
    base = {
        "external_id": "M-1",
        "status": "active",
        "timezone": SHANGHAI,
        "email": "a@example.com",
        "phone": "+8613800000000",
        "attributes": {"wechat_openid": "oABC"},
        "consent_email": True,
        "consent_sms": True,
        "consent_push": False,
        "consent_wechat": True,
    }
    base.update(overrides)
    return base


def at(local: str, tz: str = SHANGHAI) -> datetime:
    return datetime.fromisoformat(local).replace(tzinfo=ZoneInfo(tz)).astimezone(UTC)


def test_preferred_channel_without_consent_falls_back_to_next_consented():
    m = member(consent_sms=False)
    assert resolve_channel("sms", m, ("wechat", "push", "sms", "email")) == ("wechat", None)
    assert resolve_channel(None, m, ("push", "sms", "email")) == ("email", None)


def test_consent_without_contact_point_falls_back_and_says_why_when_nothing_left():
    m = member(attributes={}, consent_sms=False, consent_email=False)
    # WeChat consented but no openid: nothing usable.
    assert resolve_channel("wechat", m, ("wechat", "email")) == (None, "no_contact")
    assert resolve_channel(
        None,
        member(consent_email=False, consent_sms=False, consent_wechat=False),
        ("wechat", "sms"),
    ) == (
        None,
        "no_consent",
    )


def test_quiet_hours_are_in_the_members_zone_and_end_next_morning():
    start, end = time(21, 0), time(9, 0)
    # 22:30 in Shanghai is 14:30 UTC: quiet until 09:00 Shanghai the next day.
    ends = quiet_until(at("2026-03-01T22:30"), SHANGHAI, start, end)
    assert ends == at("2026-03-02T09:00")
    # The same instant is 09:30 in New York's morning: not quiet there.
    assert quiet_until(at("2026-03-01T22:30"), "America/New_York", start, end) is None
    assert quiet_until(at("2026-03-01T08:59"), SHANGHAI, start, end) == at("2026-03-01T09:00")
    assert quiet_until(at("2026-03-01T09:00"), SHANGHAI, start, end) is None


def test_quiet_hours_end_across_a_daylight_saving_change():
    # New York springs forward on 2026-03-08 (02:00 → 03:00): 09:00 local is 13:00 UTC.
    ends = quiet_until(
        at("2026-03-07T23:00", "America/New_York"), "America/New_York", time(21, 0), time(9, 0)
    )
    assert ends == datetime(2026, 3, 8, 13, 0, tzinfo=UTC)


@settings(max_examples=150, deadline=None)
@given(
    minute=st.integers(0, 7 * 24 * 60),
    start=st.integers(0, 23),
    end=st.integers(0, 23),
    tz=st.sampled_from(["Asia/Shanghai", "America/New_York", "Europe/London", "UTC"]),
)
def test_quiet_until_agrees_with_a_minute_by_minute_scan(minute, start, end, tz):
    moment = datetime(2026, 3, 5, tzinfo=UTC) + timedelta(minutes=minute)
    s, e = time(start), time(end)

    def quiet(t: datetime) -> bool:
        clock = t.astimezone(ZoneInfo(tz)).time()
        return (s <= clock < e) if s < e else (clock >= s or clock < e)

    found = quiet_until(moment, tz, s, e)
    if s == e or not quiet(moment):
        assert found is None
        return
    # Brute force: the first whole minute after `moment` that is not quiet.
    probe = moment.replace(second=0, microsecond=0)
    while quiet(probe):
        probe += timedelta(minutes=1)
    assert found == probe


def test_cap_defers_until_the_oldest_counted_contact_leaves_the_window():
    now = datetime(2026, 5, 10, 12, tzinfo=UTC)
    contacts = [now - timedelta(days=6), now - timedelta(days=1)]
    assert cap_free_at(contacts, now, 2, 7) == now + timedelta(days=1)
    assert cap_free_at(contacts[:1], now, 2, 7) is None
    assert cap_free_at([now - timedelta(days=8)] * 5, now, 2, 7) is None


def test_capped_marketing_message_is_deferred_not_dropped():
    cfg = config_for()
    now = datetime(2026, 5, 10, 4, tzinfo=UTC)  # 12:00 in Shanghai
    contacts = {"sms": [now - timedelta(days=2), now - timedelta(days=3)]}
    message = {"channel": "sms", "kind": "marketing", "not_after": None}
    d = decide(message, member(), contacts, cfg, now)
    assert (d.action, d.channel, d.reason) == ("defer", "sms", "frequency_cap")
    assert d.not_before == now + timedelta(days=4)


def test_deferral_past_the_offer_expiry_suppresses_instead_of_sending_late():
    cfg = config_for()
    now = datetime(2026, 5, 10, 4, tzinfo=UTC)
    contacts = {"sms": [now - timedelta(days=2), now - timedelta(days=3)]}
    message = {"channel": "sms", "kind": "marketing", "not_after": now + timedelta(days=1)}
    d = decide(message, member(), contacts, cfg, now)
    assert (d.action, d.reason) == ("suppress", "frequency_cap")


def test_cap_then_quiet_hours_moves_to_the_next_allowed_morning():
    cfg = config_for({"PATRON_QUIET_HOURS": "21:00-09:00"})
    now = at("2026-05-10T12:00")
    # A slot frees at 23:00 Shanghai, inside quiet hours: the answer is 09:00 next day.
    contacts = {"sms": [at("2026-05-03T23:00"), at("2026-05-04T10:00")]}
    d = decide(
        {"channel": "sms", "kind": "marketing", "not_after": None}, member(), contacts, cfg, now
    )
    assert (d.action, d.not_before) == ("defer", at("2026-05-11T09:00"))


def test_transactional_message_overrides_cap_and_quiet_hours_and_says_so():
    cfg = config_for({"PATRON_QUIET_HOURS": "21:00-09:00"})
    now = at("2026-05-10T23:00")
    contacts = {"sms": [now - timedelta(hours=1), now - timedelta(hours=2)]}
    d = decide(
        {"channel": "sms", "kind": "transactional", "not_after": None}, member(), contacts, cfg, now
    )
    assert d.action == "send"
    assert d.overrides == ("frequency_cap", "quiet_hours")


def test_transactional_message_still_needs_consent():
    cfg = config_for()
    m = member(consent_sms=False, consent_email=False, consent_wechat=False)
    d = decide(
        {"channel": "sms", "kind": "transactional", "not_after": None},
        m,
        {},
        cfg,
        datetime.now(UTC),
    )
    assert (d.action, d.reason) == ("suppress", "no_consent")


def test_expired_offer_and_erased_member_are_suppressed():
    cfg = config_for()
    now = datetime.now(UTC)
    expired = {"channel": "sms", "kind": "marketing", "not_after": now - timedelta(seconds=1)}
    assert decide(expired, member(), {}, cfg, now).reason == "expired"
    fresh = {"channel": "sms", "kind": "marketing", "not_after": None}
    assert decide(fresh, member(status="erased"), {}, cfg, now).reason == "member_erased"


# --- the worker's set-based policy agrees with `decide` --------------------------------

CHANNEL_NAMES = ("email", "sms", "push", "wechat", "webhook", "call_centre")
ZONES = ("Asia/Shanghai", "America/New_York", "Europe/London", "Australia/Lord_Howe", "UTC")
# Daylight-saving changes (both directions, and Lord Howe's half hour) and a plain day.
AROUND = (
    datetime(2026, 3, 8, 7, tzinfo=UTC),
    datetime(2026, 11, 1, 6, tzinfo=UTC),
    datetime(2026, 3, 29, 1, tzinfo=UTC),
    datetime(2026, 10, 25, 1, tzinfo=UTC),
    datetime(2026, 4, 4, 15, tzinfo=UTC),
    datetime(2026, 6, 15, 12, tzinfo=UTC),
)

scenarios = st.fixed_dictionaries(
    {
        "now": st.builds(
            lambda base, minutes, micro: base + timedelta(minutes=minutes, microseconds=micro),
            st.sampled_from(AROUND),
            st.integers(-36 * 60, 36 * 60),
            st.integers(0, 999_999),
        ),
        "member": st.fixed_dictionaries(
            {
                "timezone": st.sampled_from((*ZONES, "Mars/Base")),
                "status": st.sampled_from(("active", "active", "active", "erased")),
                "email": st.sampled_from((None, "", "a@example.com")),
                "phone": st.sampled_from((None, "+8613800000000")),
                "consent_email": st.booleans(),
                "consent_sms": st.booleans(),
                "consent_push": st.booleans(),
                "consent_wechat": st.booleans(),
                "attributes": st.fixed_dictionaries(
                    {},
                    optional={
                        "push_token": st.sampled_from(("", "tok-1", None)),
                        "wechat_openid": st.sampled_from(("", "oid-1", None)),
                    },
                ),
            }
        ),
        "contacts": st.lists(
            st.tuples(st.sampled_from(CHANNEL_NAMES), st.integers(0, 9 * 24 * 60)), max_size=5
        ),
        "messages": st.lists(
            st.tuples(
                st.sampled_from((None, *CHANNEL_NAMES)),
                st.sampled_from(("marketing", "marketing", "transactional")),
                st.one_of(st.none(), st.integers(-120, 14 * 24 * 60)),
            ),
            min_size=1,
            max_size=5,
        ),
        "env": st.fixed_dictionaries(
            {
                "PATRON_CHANNEL_FALLBACK": st.permutations(CHANNEL_NAMES[:4]).map(
                    lambda p: ",".join(p[:3])
                ),
                "PATRON_FREQUENCY_CAP": st.sampled_from(("off", "1/1d", "2/7d", "3/2.5d")),
                "PATRON_SMS_FREQUENCY_CAP": st.sampled_from(("1/1d", "2/7d")),
                "PATRON_QUIET_HOURS": st.sampled_from(
                    ("off", "21:00-09:00", "22:30-01:30", "00:00-02:30", "12:00-18:00")
                ),
                "PATRON_QUIET_HOURS_CHANNELS": st.sampled_from(("email,sms,push,wechat", "sms")),
            }
        ),
    }
)


def _edge(now: datetime, tz: str, quiet: str, contacts: list | None = None) -> dict:
    """One marketing SMS at `now` for a member in `tz` with quiet hours `quiet`."""
    return {
        "now": now,
        "member": {
            "timezone": tz,
            "status": "active",
            "email": None,
            "phone": "+8613800000000",
            "consent_email": False,
            "consent_sms": True,
            "consent_push": False,
            "consent_wechat": False,
            "attributes": {},
        },
        "contacts": contacts or [],
        "messages": [("sms", "marketing", None), ("sms", "transactional", None)],
        "env": {
            "PATRON_CHANNEL_FALLBACK": "sms",
            "PATRON_FREQUENCY_CAP": "2/7d",
            "PATRON_SMS_FREQUENCY_CAP": "1/1d",
            "PATRON_QUIET_HOURS": quiet,
            "PATRON_QUIET_HOURS_CHANNELS": "sms",
        },
    }


@settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(scenario=scenarios)
# Quiet hours ending on a repeated wall-clock time (clocks going back: the first one)
# and on one that does not exist (clocks going forward), and a cap slot freeing inside
# quiet hours — rare for random draws, so named here.
@example(scenario=_edge(datetime(2026, 11, 1, 5, 0, tzinfo=UTC), "America/New_York", "22:30-01:30"))
@example(scenario=_edge(datetime(2026, 10, 25, 0, 10, tzinfo=UTC), "Europe/London", "22:30-01:30"))
@example(
    scenario=_edge(datetime(2026, 4, 4, 14, 10, tzinfo=UTC), "Australia/Lord_Howe", "22:30-01:30")
)
@example(scenario=_edge(datetime(2026, 3, 8, 6, 30, tzinfo=UTC), "America/New_York", "00:00-02:30"))
# 06:00 UTC on 1 Nov 2026 is the repeated 01:00 in New York: the quiet hours' (first)
# 01:30 end is already past, so both sides send (found by a CI hypothesis run).
@example(scenario=_edge(datetime(2026, 11, 1, 6, 0, tzinfo=UTC), "America/New_York", "22:30-01:30"))
@example(
    scenario=_edge(
        datetime(2026, 6, 15, 4, tzinfo=UTC), "Asia/Shanghai", "21:00-09:00", [("sms", 60 * 13)]
    )
)
def test_chunk_statement_decides_as_decide_does(session: Session, scenario: dict) -> None:
    """The worker's one-statement policy (PostgreSQL) and `decide` (Python, message by
    message, earlier sends taking cap slots) agree on every message: send / defer (to the
    microsecond) / suppress, channel, reason and overrides — across zones, daylight-saving
    changes, caps, quiet hours and fallbacks."""
    now = scenario["now"]
    config = MessagingConfig.from_env(scenario["env"])
    member = dict(scenario["member"])
    with session.begin_nested() as nested:
        conn = session.connection()
        member_id = conn.execute(
            text(
                "INSERT INTO members (external_id, timezone, status, email, phone, "
                "consent_email, consent_sms, consent_push, consent_wechat, attributes) "
                "VALUES (:x, :timezone, :status, :email, :phone, :consent_email, :consent_sms, "
                ":consent_push, :consent_wechat, CAST(:attrs AS jsonb)) RETURNING id"
            ),
            {**member, "x": unique("P"), "attrs": json.dumps(member["attributes"])},
        ).scalar_one()
        member["external_id"] = "x"
        contacts: dict[str, list[datetime]] = {}
        for channel, minutes in scenario["contacts"]:
            at_ = now - timedelta(minutes=minutes)
            contacts.setdefault(channel, []).append(at_)
            conn.execute(
                text(
                    "INSERT INTO outbox_messages (member_id, template, status, kind, "
                    "sent_channel, contacted_at, sent_at) "
                    "VALUES (:m, 't', 'sent', 'marketing', :c, :at, :at)"
                ),
                {"m": member_id, "c": channel, "at": at_},
            )
        messages = []
        for channel, kind, expires in scenario["messages"]:
            not_after = None if expires is None else now + timedelta(minutes=expires)
            message_id = conn.execute(
                text(
                    "INSERT INTO outbox_messages (member_id, template, channel, kind, not_after) "
                    "VALUES (:m, 't', :c, :k, :na) RETURNING id"
                ),
                {"m": member_id, "c": channel, "k": kind, "na": not_after},
            ).scalar_one()
            messages.append(
                {"id": message_id, "channel": channel, "kind": kind, "not_after": not_after}
            )
        statement = chunk_sql(config, frozenset(CHANNEL_NAMES))
        params = {"ids": [m["id"] for m in messages], "now": now, "lease": 60.0}
        if "%(zones)s" in statement:
            params["zones"] = list(ZONES)
        cursor = conn.connection.cursor()
        cursor.execute(statement, params)
        actions = {row[1]: row[0] for row in cursor.fetchall()}
        rows = {
            r["id"]: r
            for r in conn.execute(
                text("SELECT * FROM outbox_messages WHERE id = ANY(:ids)"), {"ids": list(actions)}
            ).mappings()
        }
        nested.rollback()
    for message in messages:  # as the worker did, message by message in id order
        expected = decide(message, member, contacts, config, now)
        row = rows[message["id"]]
        where = f"message {message} → {expected}, got {actions[message['id']]} {dict(row)}"
        if expected.action == "send":
            assert actions[message["id"]] == "send", where
            assert row["sent_channel"] == expected.channel, where
            assert sorted(row["overrides"] or []) == list(expected.overrides), where
            if message["kind"] == "marketing":
                assert expected.channel is not None
                contacts.setdefault(expected.channel, []).append(now)
        elif expected.action == "defer":
            assert (row["status"], row["reason"]) == ("deferred", expected.reason), where
            assert row["not_before"] == expected.not_before, where
            assert row["sent_channel"] == expected.channel, where
        else:
            assert (row["status"], row["reason"]) == ("suppressed", expected.reason), where
