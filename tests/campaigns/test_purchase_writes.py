"""The purchase path's campaign writes: decisions, coupons and messages in one statement,
exclusivity decided within one evaluation, and facts read apart from swapped tables."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import text
from sqlalchemy.orm import Session

from campaigns import codes
from service import db
from tests.campaigns.test_campaigns import (
    activate,
    coupon_template,
    create,
    decisions,
    member,
    message_template,
)
from tests.conftest import purchase_payload


def buy(client: FlaskClient, pos: dict[str, str], m: str, store: str) -> dict[str, Any]:
    resp = client.post("/v1/events/purchases", json=purchase_payload(m, store), headers=pos)
    assert resp.status_code == 201, resp.get_json()
    body: dict[str, Any] = resp.get_json()
    return body


def test_a_group_winner_out_of_budget_leaves_the_group_to_the_next_campaign(
    client: FlaskClient, marketer: dict[str, str], pos: dict[str, str], session: Session, store: str
) -> None:
    def winter(priority: int, coupons: int) -> dict[str, Any]:
        return create(
            client,
            marketer,
            trigger={"type": "purchase"},
            actions={"coupon": {"template": coupon_template(session)}},
            priority=priority,
            exclusivity_group="winter",
            budget={"coupons": coupons},
        )

    high, low = winter(10, 1), winter(5, 5)
    activate(client, marketer, high["id"])
    activate(client, marketer, low["id"])
    first, second = member(client, marketer, store), member(client, marketer, store)

    rewards = buy(client, pos, first, store)["rewards"]
    assert [c["campaign"] for c in rewards["coupons"]] == [high["name"]]
    lost = decisions(client, marketer, first, campaign=low["id"])[0]
    assert lost["reason"] == "lost_to_higher_priority"
    assert lost["detail"] == {
        "group": "winter",
        "bucket": lost["detail"]["bucket"],
        "won_by": high["name"],
    }

    # The high one's only coupon is gone: its claim is withdrawn and the low one wins.
    rewards = buy(client, pos, second, store)["rewards"]
    assert [c["campaign"] for c in rewards["coupons"]] == [low["name"]]
    assert decisions(client, marketer, second, campaign=high["id"])[0]["reason"] == (
        "budget_exhausted"
    )
    claims = session.execute(
        text(
            "SELECT x.campaign_id FROM exclusivity_claims x JOIN members m ON m.id = x.member_id"
            " WHERE m.external_id = :m AND x.group_name = 'winter'"
        ),
        {"m": second},
    ).scalars()
    assert list(claims) == [low["id"]]


def test_a_coupon_code_already_taken_is_drawn_again_and_its_message_gets_the_new_coupon(
    client: FlaskClient,
    marketer: dict[str, str],
    pos: dict[str, str],
    session: Session,
    store: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = create(
        client,
        marketer,
        trigger={"type": "purchase"},
        actions={
            "coupon": {"template": coupon_template(session)},
            "message": {"template": message_template(session)},
        },
        budget={"coupons": 10},
    )
    activate(client, marketer, c["id"])
    first = member(client, marketer, store, consent={"sms": True}, phone="+8613800000001")
    second = member(client, marketer, store, consent={"sms": True}, phone="+8613800000002")
    buy(client, pos, first, store)
    taken = session.execute(
        text("SELECT code FROM coupons WHERE campaign_id = :c"), {"c": c["id"]}
    ).scalar_one()
    drawn = iter([taken])
    fresh = codes.new_code
    monkeypatch.setattr(codes, "new_code", lambda: next(drawn, None) or fresh())

    coupons = buy(client, pos, second, store)["rewards"]["coupons"]

    assert next(drawn, None) is None  # the taken code was drawn first
    assert len(coupons) == 1 and coupons[0]["code"] != codes.display(taken)
    row = session.execute(
        text(
            "SELECT k.id, k.code, k.valid_until, o.coupon_id, o.not_after, o.channel"
            " FROM decisions d JOIN members m ON m.id = d.member_id"
            " JOIN coupons k ON k.decision_id = d.id"
            " JOIN outbox_messages o ON o.decision_id = d.id"
            " WHERE m.external_id = :m AND d.campaign_id = :c"
        ),
        {"m": second, "c": c["id"]},
    ).one()
    assert codes.display(row.code) == coupons[0]["code"]
    assert (row.coupon_id, row.not_after, row.channel) == (row.id, row.valid_until, "sms")
    # Budget counted once per coupon issued, the retried one included.
    spent = session.execute(
        text("SELECT issued_coupons FROM campaigns WHERE id = :c"), {"c": c["id"]}
    ).scalar_one()
    assert spent == 2


def test_churn_conditions_read_the_predictions_outside_prepared_statements(
    client: FlaskClient, marketer: dict[str, str], pos: dict[str, str], session: Session, store: str
) -> None:
    c = create(
        client,
        marketer,
        trigger={"type": "purchase"},
        condition="churn.p_alive < 0.5",
        actions={"coupon": {"template": coupon_template(session)}},
        budget={"coupons": 10},
    )
    activate(client, marketer, c["id"])
    fading, loyal, unscored = (member(client, marketer, store) for _ in range(3))
    for ext, p_alive in ((fading, "0.2"), (loyal, "0.9")):
        session.execute(
            text(
                "INSERT INTO member_predictions (member_id, as_of, p_alive)"
                " SELECT id, DATE '2026-10-31', CAST(:p AS numeric) FROM members"
                " WHERE external_id = :m"
                " ON CONFLICT (member_id) DO UPDATE SET p_alive = EXCLUDED.p_alive"
            ),
            {"m": ext, "p": p_alive},
        )

    assert [k["campaign"] for k in buy(client, pos, fading, store)["rewards"]["coupons"]] == [
        c["name"]
    ]
    assert buy(client, pos, loyal, store)["rewards"]["coupons"] == []
    assert buy(client, pos, unscored, store)["rewards"]["coupons"] == []
    failed = decisions(client, marketer, loyal, campaign=c["id"])[0]
    assert failed["reason"] == "condition_failed"
    assert failed["detail"]["explanation"]["conditions"] == [
        "✗ churn.p_alive < 0.5  (actual: '0.90000') ← decisive"
    ]
    missing = decisions(client, marketer, unscored, campaign=c["id"])[0]
    assert "actual: missing" in missing["detail"]["explanation"]["conditions"][0]
    assert not [p.text for p in db._PREPARED.values() if "member_predictions" in p.text]


def test_deleting_a_campaign_or_a_member_takes_their_decisions_along(
    client: FlaskClient, marketer: dict[str, str], pos: dict[str, str], session: Session, store: str
) -> None:
    # Migration 0008 dropped the decisions' foreign keys; triggers keep their cascade.
    kept, dropped = (
        create(
            client,
            marketer,
            trigger={"type": "purchase"},
            condition="event.amount > 10000",
            actions={"coupon": {"template": coupon_template(session)}},
            budget={"coupons": 10},
        )
        for _ in range(2)
    )
    activate(client, marketer, kept["id"])
    activate(client, marketer, dropped["id"])
    buyer = member(client, marketer, store)
    buy(client, pos, buyer, store)

    def count(where: str, **params: Any) -> int:
        return int(
            session.execute(
                text(f"SELECT count(*) FROM decisions WHERE {where}"),
                params,
            ).scalar_one()
        )

    assert count("campaign_id = :c", c=dropped["id"]) == 1
    session.execute(text("DELETE FROM campaigns WHERE id = :c"), {"c": dropped["id"]})
    assert count("campaign_id = :c", c=dropped["id"]) == 0
    assert count("campaign_id = :c", c=kept["id"]) == 1

    # A member without purchases (those keep their member): a decision of their own.
    quiet = session.execute(
        text("SELECT id FROM members WHERE external_id = :m"),
        {"m": member(client, marketer, store)},
    ).scalar_one()
    session.execute(
        text(
            "INSERT INTO decisions (campaign_id, campaign_version, member_id, period, trigger,"
            " outcome, reason, decided_at) VALUES (:c, 1, :m, 'signup', 'signup', 'suppressed',"
            " 'condition_failed', now())"
        ),
        {"c": kept["id"], "m": quiet},
    )
    assert count("member_id = :m", m=quiet) == 1
    session.execute(text("DELETE FROM members WHERE id = :m"), {"m": quiet})
    assert count("member_id = :m", m=quiet) == 0
    assert count("campaign_id = :c", c=kept["id"]) == 1
