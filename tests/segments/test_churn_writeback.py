"""Churn scores written per member equal the models evaluated on that member's own history."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

from segments import churn
from segments.config import ScoringConfig
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
