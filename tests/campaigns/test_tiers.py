"""Tiers: upgrades at once on purchase, downgrades only at the yearly review, the profile."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from campaigns import tiers
from campaigns.models_tiers import MemberTier, TierChange
from segments import stats as member_stats
from service.errors import ValidationFailed
from service.models import AuditEntry, Member
from tests.conftest import KeyFactory, purchase_payload, unique


@pytest.fixture(autouse=True)
def _windows_from_now(session: Session) -> None:
    # Without a window state the rolling 12 months are "the last 365 days from now"; a
    # state left by another test could put them elsewhere. Rolled back with the test.
    session.execute(text("DELETE FROM stats_windows"))
    session.flush()


def make_member(client: FlaskClient, auth: KeyFactory, store: str, tz: str = "Asia/Shanghai"):
    ext = unique("M")
    resp = client.put(
        f"/v1/members/{ext}", json={"home_store": store, "timezone": tz}, headers=auth("marketer")
    )
    assert resp.status_code == 201
    return ext


@pytest.fixture
def member(client: FlaskClient, auth: KeyFactory, store: str) -> str:
    return make_member(client, auth, store)


def recent() -> str:
    return (datetime.now(UTC) - timedelta(hours=1)).isoformat()


def buy(client: FlaskClient, pos: dict[str, str], member: str, store: str, amount: str, **kw: Any):
    payload = purchase_payload(member, store, amount=amount, occurred_at=recent())
    del payload["items"]
    payload.update(kw)
    resp = client.post("/v1/events/purchases", json=payload, headers=pos)
    assert resp.status_code == 201, resp.json
    return payload, resp.json


def member_id(session: Session, ext: str) -> int:
    found = session.scalar(select(Member.id).where(Member.external_id == ext))
    assert found is not None
    return found


def tier_of(session: Session, ext: str) -> str | None:
    session.expire_all()
    return session.scalar(select(Member.tier).where(Member.external_id == ext))


def history(session: Session, ext: str) -> list[tuple[Any, ...]]:
    rows = session.execute(
        select(TierChange.from_tier, TierChange.to_tier, TierChange.direction, TierChange.reason)
        .where(TierChange.member_id == member_id(session, ext))
        .order_by(TierChange.id)
    ).all()
    return [tuple(r) for r in rows]


def review_date(session: Session, ext: str) -> date | None:
    session.expire_all()
    return session.scalar(
        select(MemberTier.review_on).where(MemberTier.member_id == member_id(session, ext))
    )


# --- upgrades on purchase ----------------------------------------------------------------------


def test_purchase_crossing_the_threshold_upgrades_at_once(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    _, first = buy(client, pos, member, store, "1500.00")
    assert first["rewards"]["tier_change"] is None
    _, second = buy(client, pos, member, store, "600.00")
    change = second["rewards"]["tier_change"]
    assert change["from"] is None and change["to"] == "silver"
    assert change["reason"] == "purchase"
    today_shanghai = datetime.now(UTC).astimezone(tiers_zone("Asia/Shanghai")).date()
    assert change["review_on"] == add_year(today_shanghai).isoformat()
    assert tier_of(session, member) == "silver"
    row = session.execute(
        select(TierChange.transaction_id, TierChange.direction).where(
            TierChange.member_id == member_id(session, member)
        )
    ).one()
    assert row.direction == "up"
    tx_id = session.scalar(
        text("SELECT id FROM transactions WHERE external_id = :e"),
        {"e": second["transaction_id"]},
    )
    assert row.transaction_id == tx_id
    # Further purchases below gold change nothing.
    _, third = buy(client, pos, member, store, "100.00")
    assert third["rewards"]["tier_change"] is None


def test_purchase_count_alone_qualifies(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    changes = [
        buy(client, pos, member, store, "10.00")[1]["rewards"]["tier_change"] for _ in range(4)
    ]
    assert changes[:3] == [None, None, None]
    assert changes[3]["to"] == "silver"


def test_a_big_purchase_jumps_straight_to_diamond(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    _, body = buy(client, pos, member, store, "35000.00")
    assert body["rewards"]["tier_change"]["from"] is None
    assert body["rewards"]["tier_change"]["to"] == "diamond"
    assert history(session, member) == [(None, "diamond", "up", "purchase")]


def test_replayed_purchase_does_not_upgrade_again(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    payload, body = buy(client, pos, member, store, "2500.00")
    assert body["rewards"]["tier_change"]["to"] == "silver"
    again = client.post("/v1/events/purchases", json=payload, headers=pos)
    assert again.status_code == 201
    assert again.json == body, "a retry answers exactly what the till got the first time"
    assert history(session, member) == [(None, "silver", "up", "purchase")]


def test_refund_never_downgrades_at_once(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    payload, _ = buy(client, pos, member, store, "9000.00")
    assert tier_of(session, member) == "gold"
    refund = purchase_payload(
        member,
        store,
        amount="9000.00",
        occurred_at=recent(),
        original_transaction_id=payload["transaction_id"],
    )
    del refund["items"]
    resp = client.post("/v1/events/refunds", json=refund, headers=pos)
    assert resp.status_code == 201, resp.json
    assert tier_of(session, member) == "gold"
    profile = client.get(f"/v1/members/{member}/profile", headers=pos).json["tier"]
    assert profile["current"] == "gold"
    assert profile["qualifies_for"] is None
    assert profile["spend_12m"] == "0.00"


# --- the yearly review ------------------------------------------------------------------------


def tiers_zone(name: str):
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


def add_year(day: date) -> date:
    try:
        return day.replace(year=day.year + 1)
    except ValueError:  # 29 February
        return day.replace(year=day.year + 1, day=28)


def refund_all(client: FlaskClient, pos: dict[str, str], member: str, store: str, payload: dict):
    refund = purchase_payload(
        member,
        store,
        amount=payload["amount"],
        occurred_at=recent(),
        original_transaction_id=payload["transaction_id"],
    )
    del refund["items"]
    assert client.post("/v1/events/refunds", json=refund, headers=pos).status_code == 201


def test_review_downgrades_one_step_and_only_when_due(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    payload, _ = buy(client, pos, member, store, "35000.00")
    refund_all(client, pos, member, store, payload)
    due = review_date(session, member)
    assert due is not None and due > date.today()
    # Not yet due: nothing happens, even though the member qualifies for nothing.
    tiers.review_tiers(session, due - timedelta(days=1))
    assert tier_of(session, member) == "diamond"
    # Due: exactly one step, and the next review is a year later.
    counts = tiers.review_tiers(session, due)
    assert counts["downgraded"] >= 1
    assert tier_of(session, member) == "gold"
    assert review_date(session, member) == add_year(due)
    # Same day again: idempotent.
    assert tiers.review_tiers(session, due) == {"upgraded": 0, "downgraded": 0, "kept": 0}
    assert tier_of(session, member) == "gold"
    # Later the same year: still not due.
    tiers.review_tiers(session, due + timedelta(days=200))
    assert tier_of(session, member) == "gold"
    # A year later: the next step.
    tiers.review_tiers(session, add_year(due))
    assert tier_of(session, member) == "silver"
    tiers.review_tiers(session, add_year(add_year(due)))
    assert tier_of(session, member) is None
    assert review_date(session, member) is None
    assert history(session, member) == [
        (None, "diamond", "up", "purchase"),
        ("diamond", "gold", "down", "review"),
        ("gold", "silver", "down", "review"),
        ("silver", None, "down", "review"),
    ]


def test_review_keeps_members_who_still_qualify_and_rolls_their_date(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    buy(client, pos, member, store, "9000.00")
    due = review_date(session, member)
    assert due is not None
    counts = tiers.review_tiers(session, due)
    assert counts["kept"] >= 1
    assert tier_of(session, member) == "gold"
    assert review_date(session, member) == add_year(due)


def test_a_missed_review_rolls_to_the_next_anniversary(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    payload, _ = buy(client, pos, member, store, "9000.00")
    refund_all(client, pos, member, store, payload)
    due = review_date(session, member)
    assert due is not None
    # The review did not run for over two years: still one step, next date in the future.
    late = add_year(add_year(due)) + timedelta(days=3)
    tiers.review_tiers(session, late)
    assert tier_of(session, member) == "silver"
    assert review_date(session, member) == add_year(add_year(add_year(due)))


def test_review_date_is_a_year_later_in_the_members_own_timezone(
    client: FlaskClient, auth: KeyFactory, store: str, session: Session
):
    east = make_member(client, auth, store, tz="Pacific/Kiritimati")  # UTC+14
    west = make_member(client, auth, store, tz="Pacific/Pago_Pago")  # UTC-11
    at = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)  # 23 Nov in Kiritimati, 22 Nov in Pago Pago
    for ext in (east, west):
        mid = member_id(session, ext)
        member_stats.apply_purchase(session, mid, at, Decimal("2500.00"))
        change = tiers.apply_purchase(session, mid, at)
        assert change is not None and change["to"] == "silver"
    assert review_date(session, east) == date(2027, 11, 23)
    assert review_date(session, west) == date(2027, 11, 22)
    # Neither qualifies any more; on 22 November only the member whose date it is goes down.
    session.execute(
        text(
            "UPDATE member_stats SET spend_365d = 0, purchases_365d = 0 WHERE member_id = ANY(:ids)"
        ),
        {"ids": [member_id(session, e) for e in (east, west)]},
    )
    tiers.review_tiers(session, date(2027, 11, 22))
    assert tier_of(session, west) is None
    assert tier_of(session, east) == "silver"
    tiers.review_tiers(session, date(2027, 11, 23))
    assert tier_of(session, east) is None


def test_upgrade_on_29_february_is_reviewed_on_28_february(
    client: FlaskClient, member: str, session: Session
):
    mid = member_id(session, member)
    at = datetime(2028, 2, 29, 4, 0, tzinfo=UTC)  # noon in Shanghai
    member_stats.apply_purchase(session, mid, at, Decimal("2500.00"))
    assert tiers.apply_purchase(session, mid, at) is not None
    assert review_date(session, member) == date(2029, 2, 28)


def test_review_upgrades_members_whose_figures_already_qualify(
    client: FlaskClient, member: str, session: Session
):
    # Statistics that arrived without the purchase path (a bulk import): the review catches up.
    mid = member_id(session, member)
    member_stats.apply_purchase(session, mid, datetime.now(UTC), Decimal("9000.00"))
    counts = tiers.review_tiers(session, date.today())
    assert counts["upgraded"] >= 1
    assert tier_of(session, member) == "gold"
    assert history(session, member) == [(None, "gold", "up", "review")]
    assert tiers.review_tiers(session, date.today())["upgraded"] == 0


# --- campaign and manual upgrades -------------------------------------------------------------


def test_upgrade_tier_never_downgrades_and_is_idempotent(member: str, session: Session):
    mid = member_id(session, member)
    first = tiers.upgrade_tier(
        session, mid, "gold", reason="campaign", actor="campaign:7", campaign_id=7
    )
    assert first == {"from": None, "to": "gold", "reason": "campaign", "campaign_id": 7}
    assert tiers.upgrade_tier(session, mid, "gold", reason="campaign", actor="campaign:7") is None
    assert tiers.upgrade_tier(session, mid, "silver", reason="manual", actor="staff") is None
    assert tier_of(session, member) == "gold"
    manual = tiers.upgrade_tier(session, mid, "diamond", reason="manual", actor="key:1:alice")
    assert manual == {"from": "gold", "to": "diamond", "reason": "manual"}
    audited = session.scalar(
        select(func.count()).where(
            AuditEntry.action == "tier.upgraded", AuditEntry.entity_id == str(mid)
        )
    )
    assert audited == 1
    row = session.execute(
        select(TierChange.campaign_id, TierChange.actor)
        .where(TierChange.member_id == mid)
        .order_by(TierChange.id)
    ).first()
    assert row is not None and tuple(row) == (7, "campaign:7")
    with pytest.raises(ValidationFailed) as err:
        tiers.upgrade_tier(session, mid, "platinum", reason="manual", actor="x")
    assert "to_tier" in (err.value.errors or {})


def test_upgrade_tier_sql_is_set_based_and_skips_higher_tiers(
    client: FlaskClient, auth: KeyFactory, store: str, session: Session
):
    members = [make_member(client, auth, store) for _ in range(3)]
    ids = [member_id(session, m) for m in members]
    tiers.upgrade_tier(session, ids[2], "diamond", reason="manual", actor="staff")
    now = datetime(2026, 11, 22, 1, tzinfo=UTC)
    chosen = select(Member.id).where(Member.id.in_(ids))
    assert tiers.upgrade_tier_sql(session, chosen, "gold", 42, now) == 2
    assert [tier_of(session, m) for m in members] == ["gold", "gold", "diamond"]
    assert tiers.upgrade_tier_sql(session, chosen, "gold", 42, now) == 0
    by_campaign = session.scalar(
        select(func.count()).where(TierChange.campaign_id == 42, TierChange.reason == "campaign")
    )
    assert by_campaign == 2
    # Shanghai local date of `now` plus a year.
    assert review_date(session, members[0]) == date(2027, 11, 22)


# --- profile ------------------------------------------------------------------------------------


def test_profile_shows_tier_dates_distance_and_history(
    client: FlaskClient, pos: dict[str, str], member: str, store: str, session: Session
):
    empty = client.get(f"/v1/members/{member}/profile", headers=pos).json["tier"]
    assert empty["current"] is None and empty["history"] == []
    assert empty["next"]["name"] == "silver"
    assert empty["next"]["spend_needed"] == "2000.00"
    assert empty["next"]["purchases_needed"] == 4
    buy(client, pos, member, store, "2500.00")
    buy(client, pos, member, store, "500.00")
    tier = client.get(f"/v1/members/{member}/profile", headers=pos).json["tier"]
    assert tier["current"] == "silver" and tier["rank"] == 1
    assert tier["since"] is not None
    assert tier["review_on"] == review_date(session, member).isoformat()
    assert tier["spend_12m"] == "3000.00" and tier["purchases_12m"] == 2
    assert tier["next"] == {
        "name": "gold",
        "min_spend_12m": "8000.00",
        "min_purchases_12m": 12,
        "spend_needed": "5000.00",
        "purchases_needed": 10,
    }
    assert [(h["from_tier"], h["to_tier"], h["reason"]) for h in tier["history"]] == [
        (None, "silver", "purchase")
    ]
    buy(client, pos, member, store, "40000.00")
    top = client.get(f"/v1/members/{member}/profile", headers=pos).json["tier"]
    assert top["current"] == "diamond" and top["next"] is None
    assert [h["to_tier"] for h in top["history"]] == ["diamond", "silver"]
