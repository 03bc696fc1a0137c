"""Contact policy: consent and fallback, frequency cap, quiet hours in the member's zone."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from campaigns.policy import cap_free_at, decide, quiet_until, resolve_channel
from tests.campaigns.messaging_helpers import config_for

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
