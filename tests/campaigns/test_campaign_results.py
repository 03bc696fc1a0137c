"""Campaign results against a hand computation; backtest; tier and segment-entry triggers;
scheduled, cron and calendar runs due exactly once."""

from __future__ import annotations

import math
import statistics
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from campaigns.insights import Z95
from campaigns.runs import due_runs, run_campaign
from service.events import record_purchase
from service.models import Member
from tests.campaigns.test_campaigns import (
    activate,
    coupon_template,
    create,
    decisions,
    member,
)
from tests.conftest import KeyFactory, purchase_payload, unique

RUN_AT = datetime(2026, 10, 1, 9, 0, tzinfo=UTC)


def _buy(session: Session, ext: str, store: str, amount: str, day: int) -> None:
    payload = purchase_payload(ext, store, amount=Decimal(amount))
    payload["occurred_at"] = datetime(2026, 10, day, 12, 0, tzinfo=UTC)
    record_purchase(session, payload)


def test_report_matches_a_hand_computation(
    client: FlaskClient, auth: KeyFactory, session: Session, store: str
) -> None:
    marketer, pos = auth("marketer"), auth("pos")
    people = [member(client, marketer, store) for _ in range(40)]
    c = create(
        client,
        marketer,
        trigger={"type": "schedule", "daily_at": "09:00"},
        audience={"stores": [store]},
        actions={"coupon": {"template": coupon_template(session, days=60)}},
        holdout_percent="40",
        budget={"coupons": 100},
        measure_days=20,
    )
    activate(client, marketer, c["id"])
    run_campaign(session, c["id"], run_key="oct", now=RUN_AT, trigger="schedule")
    outcome = {
        d["member"]: d["outcome"]
        for d in (
            {"member": p, "outcome": decisions(client, marketer, p, campaign=c["id"])[0]["outcome"]}
            for p in people
        )
    }
    # Purchases after the decision: inside the 20-day window (days 5, 15) and outside (day 25).
    spend: dict[str, list[str]] = {}
    for i, p in enumerate(people):
        if i % 3 == 0:
            spend[p] = ["100.00", "50.50"]
        elif i % 3 == 1:
            spend[p] = ["30.00"]
    for p, amounts in spend.items():
        for day, amount in zip((5, 15), amounts, strict=False):
            _buy(session, p, store, amount, day)
        _buy(session, p, store, "999.00", 25)  # after the window: never counted
    # One redemption of a treated member's coupon, on an order of 80.
    treated = [p for p in people if outcome[p] == "qualified"]
    code = session.execute(
        text(
            "SELECT c.code FROM coupons c JOIN members m ON m.id = c.member_id "
            "WHERE m.external_id = :m AND c.campaign_id = :c"
        ),
        {"m": treated[0], "c": c["id"]},
    ).scalar_one()
    resp = client.post(
        "/v1/coupons/redemptions",
        json={"code": code, "member_id": treated[0], "store": store, "order_amount": "80.00"},
        headers={**pos, "Idempotency-Key": unique("K")},
    )
    assert resp.status_code in (200, 201), resp.get_json()
    report = client.get(f"/v1/campaigns/{c['id']}/report", headers=marketer).get_json()

    def group(name: str) -> tuple[int, float, list[float]]:
        members = [p for p in people if outcome[p] == name]
        revenue = [float(sum(Decimal(a) for a in spend.get(p, []))) for p in members]
        rate = sum(1 for p in members if p in spend) / len(members)
        return len(members), rate, revenue

    n1, p1, rev1 = group("qualified")
    n0, p0, rev0 = group("suppressed")
    assert report["coupons"]["issued"] == n1
    assert report["coupons"]["redeemed"] == 1
    assert report["coupons"]["redemption_rate"] == round(1 / n1, 6)
    assert report["coupons"]["revenue_of_redeeming_purchases"] == "80.00"
    assert report["decisions"] == {"qualified": n1, "suppressed": {"holdout": n0}}
    up = report["uplift"]
    assert up["treatment"]["members"] == n1 and up["holdout"]["members"] == n0
    assert math.isclose(up["purchase_rate"]["difference"], p1 - p0, abs_tol=1e-6)
    se = math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
    assert math.isclose(up["purchase_rate"]["ci95_low"], p1 - p0 - Z95 * se, abs_tol=1e-6)
    diff = statistics.mean(rev1) - statistics.mean(rev0)
    se_rev = math.sqrt(statistics.variance(rev1) / n1 + statistics.variance(rev0) / n0)
    assert math.isclose(up["revenue_per_member"]["difference"], diff, abs_tol=1e-6)
    assert math.isclose(up["revenue_per_member"]["ci95_high"], diff + Z95 * se_rev, abs_tol=1e-6)


def test_backtest_estimates_issuance_from_past_purchases(
    client: FlaskClient, auth: KeyFactory, session: Session, store: str
) -> None:
    marketer = auth("marketer")
    a, b = member(client, marketer, store), member(client, marketer, store)
    now = datetime.now(UTC)
    for ext, amount in ((a, "150"), (a, "200"), (b, "20"), (b, "120")):
        payload = purchase_payload(ext, store, amount=Decimal(amount))
        payload["occurred_at"] = now.replace(microsecond=0) - (now - now.replace(hour=0))
        record_purchase(session, payload)
    c = create(
        client,
        marketer,
        trigger={"type": "purchase"},
        condition="event.amount >= 100",
        cap={"per": "month"},
        actions={"coupon": {"template": coupon_template(session)}},
        budget={"coupons": 10},
    )
    resp = client.post(f"/v1/campaigns/{c['id']}/backtest", json={"days": 7}, headers=marketer)
    result = resp.get_json()
    assert result["matched"] == 3  # 150, 200, 120
    assert result["qualified"] == 2 and result["cap_reached"] == 1  # a's second is capped
    assert result["face_value"] == "100.00"
    bad = client.post(f"/v1/campaigns/{c['id']}/backtest", json={"days": 0}, headers=marketer)
    assert bad.status_code == 422 and "days" in bad.get_json()["errors"]


def test_tier_upgrade_triggers_the_congratulation_campaign(
    client: FlaskClient, auth: KeyFactory, session: Session, store: str
) -> None:
    marketer, pos = auth("marketer"), auth("pos")
    tiers = session.execute(text("SELECT name, min_spend_12m FROM tiers ORDER BY rank")).all()
    top = tiers[-1]
    c = create(
        client,
        marketer,
        kind="tier_upgrade",
        trigger={"type": "tier_change", "to": top.name},
        actions={"coupon": {"template": coupon_template(session)}},
        budget={"coupons": 5},
    )
    activate(client, marketer, c["id"])
    m = member(client, marketer, store)
    resp = client.post(
        "/v1/events/purchases",
        json=purchase_payload(m, store, amount=str(top.min_spend_12m)),
        headers=pos,
    )
    rewards = resp.get_json()["rewards"]
    assert rewards["tier_change"]["to"] == top.name
    assert [x["campaign"] for x in rewards["coupons"]] == [c["name"]]
    assert decisions(client, marketer, m)[0]["trigger"] == "tier_change"


def test_segment_entry_on_purchase_then_not_again_in_batch(
    client: FlaskClient, auth: KeyFactory, session: Session, store: str
) -> None:
    marketer, pos = auth("marketer"), auth("pos")
    seg = unique("big").lower()
    resp = client.post(
        "/v1/segments", json={"name": seg, "rule": "net_spend >= 500"}, headers=marketer
    )
    assert resp.status_code == 201, resp.get_json()
    c = create(
        client,
        marketer,
        trigger={"type": "segment_entry", "segment": seg},
        actions={"coupon": {"template": coupon_template(session)}},
        budget={"coupons": 5},
    )
    activate(client, marketer, c["id"])
    m = member(client, marketer, store)
    resp = client.post(
        "/v1/events/purchases", json=purchase_payload(m, store, amount="600.00"), headers=pos
    )
    assert [x["campaign"] for x in resp.get_json()["rewards"]["coupons"]] == [c["name"]]
    from campaigns.runs import segment_entry_runs

    member_id = session.scalar(select(Member.id).where(Member.external_id == m))
    for campaign_id, entrants, _ in segment_entry_runs(session, datetime.now(UTC)):
        if campaign_id == c["id"]:
            assert member_id not in set(session.scalars(entrants))


def _scheduled(
    client: FlaskClient, marketer: dict[str, str], session: Session, trigger: dict[str, Any]
) -> int:
    c = create(
        client,
        marketer,
        trigger=trigger,
        actions={"coupon": {"template": coupon_template(session)}},
        budget={"coupons": 5},
    )
    activate(client, marketer, c["id"])
    return int(c["id"])


def test_schedules_are_due_once_in_local_time(
    client: FlaskClient, auth: KeyFactory, session: Session
) -> None:
    marketer = auth("marketer")
    daily = _scheduled(client, marketer, session, {"type": "schedule", "daily_at": "09:00"})
    cron = _scheduled(client, marketer, session, {"type": "schedule", "cron": "30 8 * * 1"})
    # Winter solstice 2026 is 22 December.
    solstice = _scheduled(
        client, marketer, session, {"type": "calendar", "dates": ["冬至"], "at": "10:00"}
    )
    zone = "Asia/Shanghai"
    # Monday 21 Dec 2026, 08:20 Shanghai = 00:20 UTC: nothing is due yet (the last cron
    # fire, a week ago, is past its 24-hour catch-up window).
    early = datetime(2026, 12, 21, 0, 20, tzinfo=UTC)
    assert {d[0] for d in due_runs(session, early, zone)} & {daily, cron, solstice} == set()
    # 09:05 Shanghai: the daily run and Monday's 08:30 cron run are due.
    later = datetime(2026, 12, 21, 1, 5, tzinfo=UTC)
    due = {d[0]: d for d in due_runs(session, later, zone)}
    assert daily in due and cron in due and solstice not in due
    assert due[daily][1] == "2026-12-21"
    run_campaign(session, daily, run_key=due[daily][1], now=later, trigger="schedule")
    assert daily not in {d[0] for d in due_runs(session, later, zone)}  # ran once, not again
    # On the solstice at 10:00 local the calendar campaign is due.
    solstice_day = datetime(2026, 12, 22, 2, 0, tzinfo=UTC)
    assert solstice in {d[0] for d in due_runs(session, solstice_day, zone)}
