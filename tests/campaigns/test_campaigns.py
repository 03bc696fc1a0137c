"""Campaigns end to end: definitions, lifecycle and four eyes, event and batch decisions,
caps, exclusivity, holdouts, budgets, preview, and the member's decisions."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from campaigns import coupons as coupon_service
from campaigns.codes import is_well_formed
from campaigns.models import Campaign, Decision
from campaigns.templates import save_variant
from service.models import AuditEntry, Member
from service.stores import upsert_store
from tests.conftest import KeyFactory, purchase_payload, unique


def coupon_template(session: Session, amount: str = "50.00", days: int = 30) -> str:
    code = unique("TPL")
    coupon_service.create_template(
        session,
        {
            "code": code,
            "name": "Fifty off",
            "kind": "amount",
            "amount_off": Decimal(amount),
            "valid_days": days,
        },
        actor="test",
        default_timezone="Asia/Shanghai",
        currency="CNY",
    )
    session.flush()
    return code


def message_template(session: Session) -> str:
    name = unique("msg").lower()
    save_variant(
        session, name, "sms", "zh-CN", subject="", body="Hi {{ member.name }}", actor="test"
    )
    session.flush()
    return name


def member(client: FlaskClient, marketer: dict[str, str], store: str, **fields: Any) -> str:
    ext = unique("M")
    resp = client.put(f"/v1/members/{ext}", json={"home_store": store, **fields}, headers=marketer)
    assert resp.status_code == 201, resp.get_json()
    return ext


def create(client: FlaskClient, headers: dict[str, str], **definition: Any) -> dict[str, Any]:
    body = {"name": unique("c").lower(), "kind": "coupon", **definition}
    resp = client.post("/v1/campaigns", json=body, headers=headers)
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def activate(client: FlaskClient, headers: dict[str, str], campaign_id: int) -> dict[str, Any]:
    resp = client.post(f"/v1/campaigns/{campaign_id}/activate", json={}, headers=headers)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def decisions(
    client: FlaskClient, headers: dict[str, str], ext: str, **q: Any
) -> list[dict[str, Any]]:
    resp = client.get(f"/v1/members/{ext}/decisions", query_string=q, headers=headers)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()["items"]


PURCHASE_COUPON = {
    "trigger": {"type": "purchase"},
    "condition": "event.amount >= 100",
    "budget": {"value": "1000.00"},
}


def test_bad_definitions_name_each_field(
    client: FlaskClient, marketer: dict[str, str], session: Session
) -> None:
    cases = [
        (
            {
                "trigger": {"type": "schedule", "cron": "not a cron at all"},
                "actions": {"message": {"template": "x"}},
            },
            "trigger.cron",
        ),
        ({"trigger": {"type": "purchase"}, "actions": {}}, "actions._schema"),
        (
            {"trigger": {"type": "purchase"}, "actions": {"coupon": {"template": "NOPE"}}},
            "actions.coupon.template",
        ),
        (
            {
                "trigger": {"type": "segment_entry", "segment": "no-such"},
                "actions": {"coupon": {"template": coupon_template(session)}},
            },
            "trigger.segment",
        ),
        (
            {
                "trigger": {"type": "purchase"},
                "condition": "no_such_field > 3",
                "actions": {"coupon": {"template": coupon_template(session)}},
            },
            "condition",
        ),
        (
            {
                "trigger": {"type": "purchase"},
                "holdout_percent": "80",
                "actions": {"coupon": {"template": coupon_template(session)}},
            },
            "holdout_percent",
        ),
        (
            {
                "trigger": {"type": "calendar", "dates": ["Not A Holiday"]},
                "actions": {"coupon": {"template": coupon_template(session)}},
            },
            "trigger.dates",
        ),
    ]
    names = []
    for definition, field in cases:
        body = {"name": unique("c").lower(), "kind": "coupon", **definition}
        names.append(body["name"])
        resp = client.post("/v1/campaigns", json=body, headers=marketer)
        assert resp.status_code == 422, (field, resp.get_json())
        assert resp.mimetype == "application/problem+json"
        assert field in resp.get_json()["errors"], (field, resp.get_json()["errors"])
    stored = select(func.count()).select_from(Campaign).where(Campaign.name.in_(names))
    assert session.scalar(stored) == 0


def test_four_eyes_approval_and_audited_lifecycle(
    client: FlaskClient, auth: KeyFactory, marketer: dict[str, str], session: Session
) -> None:
    tpl = coupon_template(session)
    # No budget: the cost is unbounded, so approval is required.
    c = create(
        client, marketer, trigger={"type": "purchase"}, actions={"coupon": {"template": tpl}}
    )
    assert c["needs_approval"] is True
    assert activate(client, marketer, c["id"])["status"] == "pending_approval"
    # The author may hold an approver key too: still not allowed to approve their own.
    resp = client.post(f"/v1/campaigns/{c['id']}/approve", json={}, headers=marketer)
    assert resp.status_code == 403
    approver = auth("approver")
    resp = client.post(f"/v1/campaigns/{c['id']}/approve", json={"note": "ok"}, headers=approver)
    assert resp.status_code == 200 and resp.get_json()["status"] == "active"
    # Active campaigns are not edited in place.
    body = {
        "name": c["name"],
        "kind": "coupon",
        "trigger": {"type": "purchase"},
        "actions": {"coupon": {"template": tpl}},
        "priority": 5,
    }
    assert client.put(f"/v1/campaigns/{c['id']}", json=body, headers=marketer).status_code == 409
    assert (
        client.post(f"/v1/campaigns/{c['id']}/pause", json={}, headers=marketer).status_code == 200
    )
    edited = client.put(f"/v1/campaigns/{c['id']}", json=body, headers=marketer).get_json()
    assert edited["version"] == 2 and edited["status"] == "paused"
    # Version 2 was not approved: activating asks again.
    assert activate(client, marketer, c["id"])["status"] == "pending_approval"
    actions = session.scalars(
        select(AuditEntry.action)
        .where(AuditEntry.entity_type == "campaign", AuditEntry.entity_id == str(c["id"]))
        .order_by(AuditEntry.id)
    ).all()
    assert actions == [
        "campaign.created",
        "campaign.submitted",
        "campaign.approved",
        "campaign.paused",
        "campaign.versioned",
        "campaign.submitted",
    ]
    versions = client.get(f"/v1/campaigns/{c['id']}/versions", headers=marketer).get_json()["items"]
    assert [v["version"] for v in versions] == [1, 2]


def test_small_budget_activates_without_approval(
    client: FlaskClient, marketer: dict[str, str], session: Session
) -> None:
    c = create(
        client,
        marketer,
        actions={"coupon": {"template": coupon_template(session)}},
        **PURCHASE_COUPON,
    )
    assert c["needs_approval"] is False
    assert activate(client, marketer, c["id"])["status"] == "active"


def test_purchase_issues_coupon_to_the_till_and_records_why_not(
    client: FlaskClient, marketer: dict[str, str], pos: dict[str, str], session: Session, store: str
) -> None:
    c = create(
        client,
        marketer,
        actions={"coupon": {"template": coupon_template(session)}},
        **PURCHASE_COUPON,
    )
    activate(client, marketer, c["id"])
    m = member(client, marketer, store)
    resp = client.post(
        "/v1/events/purchases", json=purchase_payload(m, store, amount="150.00"), headers=pos
    )
    assert resp.status_code == 201
    rewards = resp.get_json()["rewards"]
    assert len(rewards["coupons"]) == 1 and rewards["coupons"][0]["campaign"] == c["name"]
    code = rewards["coupons"][0]["code"]
    assert coupon_service.get_coupon(session, code)["status"] == "issued"
    # A small purchase: no coupon, and the decision says which condition failed.
    resp = client.post(
        "/v1/events/purchases", json=purchase_payload(m, store, amount="20.00"), headers=pos
    )
    assert resp.get_json()["rewards"]["coupons"] == []
    found = decisions(client, marketer, m, campaign=c["id"])
    assert [d["outcome"] for d in found] == ["suppressed", "qualified"]
    failed = found[0]
    assert failed["reason"] == "condition_failed"
    assert failed["campaign"]["version"] == 1
    trace = failed["detail"]["explanation"]
    assert trace["outcome"] is False and "event.amount" in trace["rule_text"]
    # Replaying the first purchase returns the same coupon and issues nothing new.
    assert session.scalar(select(Campaign.issued_coupons).where(Campaign.id == c["id"])) == 1


def test_cap_once_per_year_and_not_in_audience(
    client: FlaskClient, marketer: dict[str, str], pos: dict[str, str], session: Session, store: str
) -> None:
    other_store = unique("S")
    upsert_store(session, other_store, "Other", "West", actor="test")
    session.flush()
    c = create(
        client,
        marketer,
        actions={"coupon": {"template": coupon_template(session)}},
        cap={"per": "year"},
        audience={"stores": [store]},
        **PURCHASE_COUPON,
    )
    activate(client, marketer, c["id"])
    inside = member(client, marketer, store)
    outside = member(client, marketer, other_store)
    for _ in range(2):
        client.post(
            "/v1/events/purchases", json=purchase_payload(inside, store, amount="150"), headers=pos
        )
        client.post(
            "/v1/events/purchases", json=purchase_payload(outside, store, amount="150"), headers=pos
        )
    assert [d["reason"] for d in decisions(client, marketer, inside)] == ["cap_reached", None]
    assert {d["reason"] for d in decisions(client, marketer, outside)} == {"not_in_audience"}


def test_exclusivity_group_highest_priority_wins(
    client: FlaskClient, marketer: dict[str, str], pos: dict[str, str], session: Session, store: str
) -> None:
    low = create(
        client,
        marketer,
        actions={"coupon": {"template": coupon_template(session)}},
        priority=5,
        exclusivity_group="autumn",
        **PURCHASE_COUPON,
    )
    high = create(
        client,
        marketer,
        actions={"coupon": {"template": coupon_template(session)}},
        priority=10,
        exclusivity_group="autumn",
        **PURCHASE_COUPON,
    )
    activate(client, marketer, low["id"])
    activate(client, marketer, high["id"])
    m = member(client, marketer, store)
    resp = client.post(
        "/v1/events/purchases", json=purchase_payload(m, store, amount="150"), headers=pos
    )
    assert [c["campaign"] for c in resp.get_json()["rewards"]["coupons"]] == [high["name"]]
    lost = decisions(client, marketer, m, campaign=low["id"])[0]
    assert lost["reason"] == "lost_to_higher_priority"
    assert lost["detail"]["won_by"] == high["name"]


def test_message_only_campaign_needs_consent(
    client: FlaskClient, marketer: dict[str, str], pos: dict[str, str], session: Session, store: str
) -> None:
    c = create(
        client,
        marketer,
        kind="custom",
        trigger={"type": "purchase"},
        actions={"message": {"template": message_template(session)}},
    )
    activate(client, marketer, c["id"])
    silent = member(client, marketer, store)
    reachable = member(client, marketer, store, consent={"sms": True}, phone="+8613800000000")
    client.post("/v1/events/purchases", json=purchase_payload(silent, store), headers=pos)
    client.post("/v1/events/purchases", json=purchase_payload(reachable, store), headers=pos)
    assert decisions(client, marketer, silent)[0]["reason"] == "no_consent"
    ok = decisions(client, marketer, reachable)[0]
    assert ok["outcome"] == "qualified" and ok["detail"]["channel"] == "sms"
    rows = session.execute(
        text("SELECT channel, decision_id FROM outbox_messages WHERE campaign_id = :c"),
        {"c": c["id"]},
    ).all()
    assert [r.channel for r in rows] == ["sms"] and rows[0].decision_id == ok["id"]


def test_signup_campaign_welcomes_new_members_once(
    client: FlaskClient, marketer: dict[str, str], session: Session, store: str
) -> None:
    c = create(
        client,
        marketer,
        trigger={"type": "signup"},
        actions={"coupon": {"template": coupon_template(session)}},
        budget={"coupons": 10},
    )
    activate(client, marketer, c["id"])
    m = member(client, marketer, store)
    # An update is not a sign-up.
    assert client.put(f"/v1/members/{m}", json={"name": "Li"}, headers=marketer).status_code == 200
    found = decisions(client, marketer, m)
    assert [(d["trigger"], d["outcome"]) for d in found] == [("signup", "qualified")]
    profile = client.get(f"/v1/members/{m}/profile", headers=marketer).get_json()
    assert len(profile["coupons"]) == 1


def _scheduled(
    session: Session, client: FlaskClient, marketer: dict[str, str], store: str, **extra: Any
) -> dict[str, Any]:
    return create(
        client,
        marketer,
        trigger={"type": "schedule", "daily_at": "09:00"},
        audience={"stores": [store]},
        actions={
            "coupon": {"template": coupon_template(session)},
            "message": {"template": message_template(session)},
        },
        **extra,
    )


def test_batch_run_is_set_based_capped_budgeted_and_idempotent(
    client: FlaskClient, marketer: dict[str, str], session: Session, store: str
) -> None:
    members = [member(client, marketer, store, consent={"sms": True}) for _ in range(12)]
    c = _scheduled(session, client, marketer, store, budget={"coupons": 10}, cap={"per": "year"})
    activate(client, marketer, c["id"])
    preview = client.post(f"/v1/campaigns/{c['id']}/preview", headers=marketer).get_json()
    assert (
        preview["audience_size"] == 12
        and preview["coupons"] == 10
        and preview["budget_hit"] is True
    )
    assert preview["face_value"] == "500.00"
    written = select(func.count()).select_from(Decision).where(Decision.campaign_id == c["id"])
    assert session.scalar(written) == 0  # preview writes nothing
    run = client.post(
        f"/v1/campaigns/{c['id']}/runs", json={"run_key": "r1"}, headers=marketer
    ).get_json()
    assert run["qualified"] == 10 and run["coupons"] == 10 and run["messages"] == 10
    assert run["reason_budget_exhausted"] == 2
    again = client.post(
        f"/v1/campaigns/{c['id']}/runs", json={"run_key": "r1"}, headers=marketer
    ).get_json()
    assert again["replayed"] is True and again["qualified"] == 10
    later = client.post(
        f"/v1/campaigns/{c['id']}/runs", json={"run_key": "r2"}, headers=marketer
    ).get_json()
    # Same year: the 10 who got one are capped; the 2 others find the budget spent.
    assert later["qualified"] == 0 and later["reason_cap_reached"] == 10
    assert later["reason_budget_exhausted"] == 2
    row = session.get(Campaign, c["id"])
    session.refresh(row)
    assert row.issued_coupons == 10 and row.issued_value == Decimal("500.00")
    coupons = session.execute(
        text("SELECT count(*), count(DISTINCT member_id) FROM coupons WHERE campaign_id = :c"),
        {"c": c["id"]},
    ).one()
    assert tuple(coupons) == (10, 10)
    issued = session.execute(
        text(
            "SELECT c.code, c.member_id = d.member_id AND d.outcome = 'qualified'"
            " FROM coupons c JOIN decisions d ON d.id = c.decision_id WHERE c.campaign_id = :c"
        ),
        {"c": c["id"]},
    ).all()
    # Each coupon is its own decision's, with a distinct code that passes the check.
    assert len(issued) == 10 and all(mine for _, mine in issued)
    assert len({code for code, _ in issued}) == 10
    assert all(is_well_formed(code) for code, _ in issued)
    explained = decisions(client, marketer, members[-1], campaign=c["id"])
    assert explained[0]["reason"] == "budget_exhausted"


def test_holdout_is_stored_before_issue_and_stable(
    client: FlaskClient, marketer: dict[str, str], session: Session, store: str
) -> None:
    for _ in range(40):
        member(client, marketer, store)
    c = _scheduled(session, client, marketer, store, holdout_percent="50", budget={"coupons": 100})
    activate(client, marketer, c["id"])
    first = client.post(
        f"/v1/campaigns/{c['id']}/runs", json={"run_key": "a"}, headers=marketer
    ).get_json()
    second = client.post(
        f"/v1/campaigns/{c['id']}/runs", json={"run_key": "b"}, headers=marketer
    ).get_json()
    assert 5 <= first["reason_holdout"] <= 35
    assert first["reason_holdout"] == second["reason_holdout"]
    held = session.execute(
        text(
            "SELECT count(*) FROM decisions d JOIN coupons c ON c.member_id = d.member_id "
            "AND c.campaign_id = d.campaign_id WHERE d.campaign_id = :c AND d.reason = 'holdout'"
        ),
        {"c": c["id"]},
    ).scalar()
    assert held == 0  # no holdout member ever got a coupon


def test_ready_made_templates_are_valid_definitions(
    client: FlaskClient, marketer: dict[str, str], session: Session
) -> None:
    items = client.get("/v1/campaigns/templates", headers=marketer).get_json()["items"]
    assert {i["template"] for i in items} == {
        "birthday_coupon",
        "win_back",
        "tier_congratulation",
        "holiday_promotion",
    }
    from campaigns.definition import load_definition

    for item in items:
        load_definition(item["example"])  # shape-valid as shipped


def test_member_decisions_unknown_member_is_404(
    client: FlaskClient, marketer: dict[str, str]
) -> None:
    resp = client.get("/v1/members/NOPE-1/decisions", headers=marketer)
    assert resp.status_code == 404 and resp.mimetype == "application/problem+json"


def test_birthday_campaign_29_february_in_member_timezone(
    client: FlaskClient, marketer: dict[str, str], session: Session, store: str
) -> None:
    from campaigns.ready_made import birthday_coupon
    from campaigns.runs import run_campaign

    leap = member(client, marketer, store, birth_date="2000-02-29", timezone="Pacific/Auckland")
    march = member(client, marketer, store, birth_date="1990-03-10", timezone="America/Los_Angeles")
    definition = birthday_coupon(
        unique("bday").lower(), coupon_template=coupon_template(session), budget_value="500"
    )
    definition["audience"] = {"stores": [store]}
    c = client.post("/v1/campaigns", json=definition, headers=marketer).get_json()
    activate(client, marketer, c["id"])
    # 2027 is not a leap year: the 29 Feb birthday is kept on 28 Feb (documented policy).
    now = datetime(2027, 2, 21, 12, 0, tzinfo=UTC)
    counts = run_campaign(session, c["id"], run_key="2027-02-21", now=now, trigger="schedule")
    assert counts["qualified"] == 1
    got = {d["outcome"] for d in decisions(client, marketer, leap)}
    assert got == {"qualified"}
    assert decisions(client, marketer, march)[0]["reason"] == "condition_failed"
    # A week later the same year: capped (once a year), not a second coupon.
    later = run_campaign(
        session,
        c["id"],
        run_key="2027-02-27",
        now=datetime(2027, 2, 27, 12, tzinfo=UTC),
        trigger="schedule",
    )
    assert later["qualified"] == 0 and later["reason_cap_reached"] == 1


def test_replayed_purchase_returns_the_same_coupon_and_issues_nothing(
    client: FlaskClient, marketer: dict[str, str], pos: dict[str, str], session: Session, store: str
) -> None:
    c = create(
        client,
        marketer,
        actions={"coupon": {"template": coupon_template(session)}},
        **PURCHASE_COUPON,
    )
    activate(client, marketer, c["id"])
    m = member(client, marketer, store)
    payload = purchase_payload(m, store, amount="300.00")
    first = client.post("/v1/events/purchases", json=payload, headers=pos)
    second = client.post("/v1/events/purchases", json=payload, headers=pos)
    assert second.headers.get("Idempotent-Replayed") == "true"
    assert second.data == first.data  # the same code printed again, byte for byte
    issued = session.execute(
        text("SELECT count(*) FROM coupons WHERE campaign_id = :c"), {"c": c["id"]}
    ).scalar()
    assert issued == 1 and len(decisions(client, marketer, m)) == 1


def test_tier_action_upgrades_in_a_purchase_and_in_a_batch(
    client: FlaskClient, marketer: dict[str, str], pos: dict[str, str], session: Session, store: str
) -> None:
    event = create(
        client,
        marketer,
        kind="tier_upgrade",
        trigger={"type": "purchase"},
        condition='event.channel = "ecom"',
        actions={"tier": {"to": "gold"}},
    )
    activate(client, marketer, event["id"])
    online = member(client, marketer, store)
    resp = client.post(
        "/v1/events/purchases",
        json=purchase_payload(online, store, amount="10.00", channel="ecom"),
        headers=pos,
    )
    assert resp.get_json()["rewards"]["tier_change"]["to"] == "gold"
    client.post(f"/v1/campaigns/{event['id']}/end", json={}, headers=marketer)
    batch = create(
        client,
        marketer,
        kind="tier_upgrade",
        trigger={"type": "schedule", "daily_at": "08:00"},
        audience={"stores": [store]},
        actions={"tier": {"to": "silver"}},
    )
    activate(client, marketer, batch["id"])
    others = [member(client, marketer, store) for _ in range(3)]
    run = client.post(f"/v1/campaigns/{batch['id']}/runs", json={}, headers=marketer).get_json()
    # Everyone in the store qualifies; the gold member is never lowered to silver.
    assert run["qualified"] == 4 and run["tier_upgrades"] == 3
    tiers = dict(
        session.execute(
            select(Member.external_id, Member.tier).where(Member.external_id.in_([online, *others]))
        ).all()
    )
    assert tiers == {online: "gold", **dict.fromkeys(others, "silver")}


def test_batch_run_issues_nothing_from_an_archived_template(
    client: FlaskClient, marketer: dict[str, str], session: Session, store: str
) -> None:
    for _ in range(3):
        member(client, marketer, store)
    tpl = coupon_template(session)
    c = create(
        client,
        marketer,
        trigger={"type": "schedule", "daily_at": "09:00"},
        audience={"stores": [store]},
        actions={"coupon": {"template": tpl}},
        budget={"coupons": 10},
    )
    activate(client, marketer, c["id"])
    coupon_service.archive_template(session, tpl, actor="test")
    session.flush()
    run = client.post(f"/v1/campaigns/{c['id']}/runs", json={}, headers=marketer).get_json()
    assert run["qualified"] == 0 and run["coupons"] == 0
    assert run["reason_offer_unavailable"] == 3
