"""Churn scores written per member equal the models evaluated on that member's own history."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from rules import compile_py, member_query, parse_rule
from segments import churn, custom, predict, refresh
from segments.config import ScoringConfig
from service import db
from service.vocabulary import default_vocabulary, load_member_facts
from tests.conftest import KeyFactory, purchase_payload, unique
from tests.segments.conftest import add_member, add_purchase
from tests.segments.test_scores import AS_OF, run, scores
from tests.segments.test_stats import local


def test_each_members_churn_scores_match_the_fitted_models(
    session: Session, shop: int, isolated: None, uow: Any, scoring: ScoringConfig
) -> None:
    history: dict[int, list[tuple[Any, Decimal]]] = {}
    for k in range(80):
        m = add_member(session, shop)
        first = AS_OF - timedelta(days=330 - 3 * k)
        days = [first + timedelta(days=j * (5 + k % 17)) for j in range(k % 7 + 1)]
        history[m] = []
        for j, day in enumerate(days):
            if day >= AS_OF:
                break
            amount = Decimal(f"{15 + (k * 7 + j * 3) % 90}.50")
            add_purchase(session, m, shop, local(day), amount)
            if j == 1:  # two purchases on one day count as one purchase day
                add_purchase(session, m, shop, local(day, 18), amount)
                history[m].append((day, amount))
            history[m].append((day, amount))
    gone = add_member(session, shop)
    add_purchase(session, gone, shop, local(AS_OF - timedelta(days=40)), "30")
    add_purchase(session, gone, shop, local(AS_OF - timedelta(days=10)), "30")
    run(uow, scoring)
    assert scores(session, [gone])[gone]["p_alive"] is not None

    params = session.scalar(
        text("SELECT churn_params FROM score_runs WHERE as_of = :d"), {"d": AS_OF}
    )
    bg = churn.BgNbdParams(
        **{k: params["bgnbd"][k] for k in ("r", "alpha", "a", "b")},
        log_likelihood=0.0,
        n=0,
        converged=True,
    )
    gg = params["gamma_gamma"]
    got = scores(session, list(history))
    for m, bought in history.items():
        if not bought:
            continue
        days = sorted({d for d, _ in bought})
        x, t_x, big_t = len(days) - 1, (days[-1] - days[0]).days, (AS_OF - days[0]).days
        p = churn.probability_alive(bg, np.array([x]), np.array([t_x]), np.array([big_t]))[0]
        e = churn.expected_purchases(
            bg, scoring.churn_horizon_days, np.array([x]), np.array([t_x]), np.array([big_t])
        )[0]
        assert abs(float(got[m]["p_alive"]) - p) <= 1e-5, m
        assert abs(float(got[m]["expected_purchases_90d"]) - e) <= 1e-4, m
        mean = float(sum(a for _, a in bought)) / len(bought)
        value = e * gg["p"] * (gg["v"] + mean * x) / (gg["p"] * x + gg["q"] - 1)
        assert abs(float(got[m]["expected_value"]) - value) <= 0.01 + 1e-6 * value, m

    # A re-run of the date rewrites nothing; an erased member then keeps no scores.
    before = scores(session, list(history))
    run(uow, scoring)
    assert scores(session, list(history)) == before
    session.execute(text("UPDATE members SET status = 'erased' WHERE id = :m"), {"m": gone})
    run(uow, scoring)
    assert gone not in scores(session, [gone])


def _population(session: Session, shop: int, n: int = 60) -> list[int]:
    """Members with 1-6 purchase days over the year before AS_OF: enough to fit BG/NBD."""
    ids = []
    for k in range(n):
        m = add_member(session, shop)
        ids.append(m)
        first = AS_OF - timedelta(days=300 - k)
        for j in range(k % 6 + 1):
            day = first + timedelta(days=j * (7 + k % 13))
            add_purchase(session, m, shop, local(day), f"{20 + k}.00")
    return ids


def test_the_churn_step_replaces_member_predictions_and_leaves_member_scores_alone(
    session: Session, shop: int, isolated: None, uow: Any, scoring: ScoringConfig
) -> None:
    ids = _population(session, shop)
    never = add_member(session, shop)
    run(uow, scoring)
    # Every tuple version of the members' score rows: an UPDATE, even a HOT one, makes a
    # new version at a new ctid (all of this test's writes share one xmin).
    versions = text(
        "SELECT member_id, ctid::text FROM member_scores WHERE member_id = ANY(:ids) ORDER BY 1"
    )
    before = session.execute(versions, {"ids": [*ids, never]}).all()
    assert len(before) == len(ids) + 1
    old = session.scalar(text("SELECT 'member_predictions'::regclass::oid"))
    first = scores(session, ids)

    # The next day: T grows by one for everyone, so nearly every prediction changes.
    nextday = AS_OF + timedelta(days=1)
    out = refresh.run_refresh(uow, nextday, config=scoring, steps=["windows", "churn"])
    assert out["steps"]["churn"]["combinations"] > 0
    assert session.execute(versions, {"ids": [*ids, never]}).all() == before
    assert session.scalar(text("SELECT 'member_predictions'::regclass::oid")) != old
    second = scores(session, ids)
    changed = [m for m in ids if second[m]["p_alive"] != first[m]["p_alive"]]
    assert len(changed) > len(ids) // 2
    rows = session.execute(
        text("SELECT member_id, as_of FROM member_predictions WHERE member_id = ANY(:ids)"),
        {"ids": [*ids, never]},
    ).all()
    assert {m for m, _ in rows} == set(ids)  # never bought: no row
    assert {d for _, d in rows} == {nextday}
    # The swapped-in table is the migration's: same columns, types, key and key name.
    shape = text(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull"
        " FROM pg_attribute a WHERE a.attrelid = 'member_predictions'::regclass"
        " AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
    )
    assert session.execute(shape).all() == [
        ("member_id", "bigint", True),
        ("as_of", "date", True),
        ("p_alive", "numeric(6,5)", False),
        ("expected_purchases_90d", "numeric(10,4)", False),
        ("expected_value", "numeric(14,2)", False),
    ]
    keys = session.execute(
        text(
            "SELECT conname, contype, conindid::regclass::text FROM pg_constraint"
            " WHERE conrelid = 'member_predictions'::regclass"
        )
    ).all()
    assert keys == [("pk_member_predictions", "p", "pk_member_predictions")]
    assert session.scalar(text("SELECT to_regclass('member_predictions_new')")) is None
    assert session.scalar(
        text("SELECT reltuples FROM pg_class WHERE oid = 'member_predictions'::regclass")
    ) == len(ids)  # analysed before the swap

    # A re-run of the date builds the same predictions again.
    refresh.run_refresh(uow, nextday, config=scoring, steps=["windows", "churn"])
    assert scores(session, ids) == second


def test_the_swap_waits_for_readers_only_briefly_and_retries(
    session: Session, shop: int, isolated: None, scoring: ScoringConfig, engine: Engine
) -> None:
    _population(session, shop, 30)
    # Another transaction reading member_predictions holds its lock until it ends.
    with engine.connect() as reader:
        reader.execute(text("SELECT count(*) FROM member_predictions"))
        predict.build_predictions(session, AS_OF, scoring)
        started = time.monotonic()
        with pytest.raises(predict.SwapTimeout):
            predict.swap_predictions(session, attempts=3, pause_seconds=0.05)
        # Three waits of lock_timeout (100 ms) and the pauses, then it gives up.
        assert time.monotonic() - started < 5
        reader.rollback()
    # The failed attempts left the built table in place; once the reader is gone it swaps.
    predict.swap_predictions(session, attempts=3, pause_seconds=0.05)
    assert session.scalar(text("SELECT count(*) FROM member_predictions")) == 30


def test_purchases_before_and_after_a_churn_run_on_the_same_connection(
    client: FlaskClient,
    auth: KeyFactory,
    store: str,
    session: Session,
    connection: Connection,
    isolated: None,
    uow: Any,
    scoring: ScoringConfig,
) -> None:
    """The purchase path's prepared statements and facts survive the table swap."""
    custom.forget_catalogue()
    shop = int(session.scalar(text("SELECT id FROM stores WHERE code = :c"), {"c": store}))
    _population(session, shop)
    staff, pos = auth("marketer"), auth("pos")
    tag = "churn" + uuid.uuid4().hex[:8]
    member = unique("M")
    put = client.put(
        f"/v1/members/{member}", json={"home_store": store, "tags": [tag]}, headers=staff
    )
    assert put.status_code == 201, put.get_json()
    # Purchase-sensitive (purchase_count), so each purchase re-evaluates it from the facts.
    seg = client.post(
        "/v1/segments",
        json={
            "name": tag,
            "rule": f'tags contains "{tag}" and purchase_count >= 1 and churn.p_alive >= 0',
        },
        headers=staff,
    )
    assert seg.status_code == 201, seg.get_json()
    members = f"/v1/segments/{seg.get_json()['id']}/members"

    def buy(day: int) -> None:
        when = local(AS_OF - timedelta(days=day)).isoformat()
        resp = client.post(
            "/v1/events/purchases",
            json=purchase_payload(member, store, occurred_at=when),
            headers=pos,
        )
        assert resp.status_code == 201, resp.get_json()

    info = connection.connection.info

    def marks() -> dict[str, tuple[float, ...]]:
        # name -> (when prepared, executions since): changes whenever the statement runs.
        return {name: tuple(entry) for name, entry in info.get("patron_prepared", {}).items()}

    ready = marks()
    buy(20)
    assert client.get(members, headers=staff).get_json()["items"] == []  # no prediction yet
    after_first = marks()
    used = {name for name, mark in after_first.items() if ready.get(name) != mark}
    assert used  # the purchase ran prepared statements on this connection

    refresh.run_refresh(uow, AS_OF, config=scoring, steps=["windows", "churn"])
    buy(10)
    # The facts of the second purchase read the swapped-in table.
    assert [i["member_id"] for i in client.get(members, headers=staff).get_json()["items"]] == [
        member
    ]
    # The same prepared statements ran again, none reading member_predictions: a prepared
    # EXECUTE that waited for the swap would read the new table with a snapshot taken
    # before it, i.e. empty (plain statements take theirs after the lock).
    after_second = marks()
    assert all(after_second[name] != after_first[name] for name in used)
    assert not [p.text for p in db._PREPARED.values() if "member_predictions" in p.text]


def test_churn_fields_agree_in_sql_and_python(
    session: Session, shop: int, isolated: None, uow: Any, scoring: ScoringConfig
) -> None:
    ids = _population(session, shop)
    never = add_member(session, shop)
    run(uow, scoring)
    # Churn may run before a new member's first lifecycle row exists: the predictions join
    # members, not member_scores.
    session.execute(text("DELETE FROM member_scores WHERE member_id = :m"), {"m": ids[7]})
    members = [*ids, never]
    vocab = default_vocabulary()
    facts = load_member_facts(session, members)
    got = scores(session, ids)
    assert facts[ids[7]]["churn_p_alive"] is not None and ids[7] not in got
    assert all(facts[m]["churn_p_alive"] == got[m]["p_alive"] for m in got)
    assert facts[never]["churn_expected_value"] is None
    now = datetime(2026, 7, 1, tzinfo=UTC)

    @settings(max_examples=40, deadline=None)
    @given(
        field=st.sampled_from(
            ["churn.p_alive", "churn.expected_purchases_90d", "churn.expected_value"]
        ),
        op=st.sampled_from(["<", ">=", "="]),
        value=st.decimals(min_value=0, max_value=3, places=2),
        negate=st.booleans(),
    )
    def agree(field: str, op: str, value: Decimal, negate: bool) -> None:
        source = f"{field} {op} {value}"
        rule = parse_rule(f"not ({source})" if negate else source, vocab)
        query = member_query(rule, vocab, now).where(text("members.id = ANY(:i)"))
        in_sql = set(session.scalars(query, {"i": members}))
        check = compile_py(rule, vocab).at(now)
        assert in_sql == {m for m in members if check(facts[m])}, source

    agree()
    missing = parse_rule("churn.p_alive is not set", vocab)
    query = member_query(missing, vocab, now).where(text("members.id = ANY(:i)"))
    assert set(session.scalars(query, {"i": members})) == {never}


def test_churn_inputs_read_by_copy_equal_a_group_by_in_sql(
    session: Session, shop: int, isolated: None, scoring: ScoringConfig
) -> None:
    # member_summary groups the per-member keys in numpy after a binary COPY; the counts
    # per (x, t_x, T) must be what PostgreSQL's own GROUP BY gives.
    for k in range(30):
        m = add_member(session, shop)
        for j in range(k % 4 + 1):
            add_purchase(session, m, shop, local(AS_OF - timedelta(days=200 - 37 * j - k)), "25")
    data = predict.member_summary(session, AS_OF, scoring)
    mine = sorted(zip(data["x"], data["t_x"], data["T"], data["n"], strict=True))
    theirs = sorted(
        tuple(float(v) for v in row)
        for row in session.execute(
            text("SELECT x, t_x, big_t, count(*) FROM patron_churn_keys GROUP BY 1, 2, 3")
        )
    )
    assert mine == theirs and sum(n for *_, n in mine) == 30
    # Rows that would break the fixed-width reading are refused, not misread.
    with pytest.raises(RuntimeError):
        predict._copy_out(session, "SELECT CAST(NULL AS integer)", [("x", ">i4")])
