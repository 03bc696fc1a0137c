"""Churn scores: BG/NBD probability alive and expected purchases, Gamma-Gamma expected value.

Per member, in days, from member_stats: x = purchase days - 1 (repeat purchase days),
t_x = days from the first to the last purchase day, T = days from the first purchase day
to the as-of date. Many members share the same (x, t_x, T), so the model is fitted and
evaluated on the distinct combinations with member counts as weights, and the results
are joined back to the members in one UPDATE (no per-member Python).
"""

# SQL here is assembled from this module's constants only; every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import logging
import math
from datetime import date
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

from segments import churn
from segments.config import ScoringConfig

log = logging.getLogger(__name__)

_DAY = "CAST(timezone(:tz, s.{col}) AS date)"
X_SQL = "GREATEST(s.purchase_days - 1, 0)"
TX_SQL = (
    f"CASE WHEN s.purchase_days > 1 THEN {_DAY.format(col='last_purchase_at')}"
    f" - {_DAY.format(col='first_purchase_at')} ELSE 0 END"
)
# A purchase after the as-of date (a back-dated run) must not make T < t_x.
T_SQL = (
    f"GREATEST(CAST(:as_of AS date) - {_DAY.format(col='first_purchase_at')},"
    f" {_DAY.format(col='last_purchase_at')} - {_DAY.format(col='first_purchase_at')}, 0)"
)
_FROM = "FROM member_stats s JOIN members mb ON mb.id = s.member_id"
_WHERE = "WHERE mb.status = 'active' AND s.last_purchase_at IS NOT NULL"
_SCORED = f"{_FROM} {_WHERE}"

_COMBOS = f"""
    SELECT {X_SQL} AS x, {TX_SQL} AS t_x, {T_SQL} AS big_t, count(*) AS n {_SCORED}
    GROUP BY 1, 2, 3
"""
# Mean spend per purchase of members with repeat purchases, rounded to the cent so that
# equal values group together.
_SPEND = f"""
    SELECT {X_SQL} AS x, round(s.net_spend / s.purchase_count, 2) AS m, count(*) AS n {_SCORED}
      AND s.purchase_days > 1 AND s.purchase_count > 0 AND s.net_spend > 0
    GROUP BY 1, 2
"""

# Expected spend over the horizon: expected purchases x the Gamma-Gamma posterior mean
# spend per purchase, p (v + m x) / (p x + q - 1) (= churn.expected_average_value; the
# population mean p v / (q - 1) where x = 0).
_WRITE = f"""
    WITH c AS (
        SELECT * FROM unnest(CAST(:xs AS integer[]), CAST(:txs AS integer[]),
                             CAST(:ts AS integer[]), CAST(:ps AS numeric[]),
                             CAST(:es AS numeric[])) AS c(x, t_x, big_t, p_alive, expected)
    ), fresh AS (
        SELECT s.member_id, c.p_alive, c.expected,
               CASE WHEN :gg_ok THEN
                    round(c.expected * CAST(:gp AS double precision)
                          * (CAST(:gv AS double precision)
                             + GREATEST(s.net_spend / NULLIF(s.purchase_count, 0), 0)
                               * {X_SQL} * CAST({X_SQL} > 0 AS integer))
                          / NULLIF(CAST(:gp AS double precision) * {X_SQL}
                                   + CAST(:gq AS double precision) - 1, 0)
                          )::numeric(14, 2)
               END AS expected_value
        {_FROM} JOIN c ON c.x = {X_SQL} AND c.t_x = {TX_SQL} AND c.big_t = {T_SQL}
        {_WHERE}
    )
    UPDATE member_scores sc SET
        p_alive = f.p_alive, expected_purchases_90d = f.expected,
        expected_value = f.expected_value, as_of = :as_of
    FROM member_scores x LEFT JOIN fresh f USING (member_id)
    WHERE sc.member_id = x.member_id
      AND (sc.p_alive, sc.expected_purchases_90d, sc.expected_value)
          IS DISTINCT FROM (f.p_alive, f.expected, f.expected_value)
"""


def member_summary(session: Session, as_of: date, config: ScoringConfig) -> dict[str, Any]:
    """The distinct (x, t_x, T) with member counts, as arrays."""
    # Four arrays in one row: converting hundreds of thousands of result rows to Python
    # tuples costs several times what the query does.
    row = session.execute(
        text(
            "SELECT array_agg(x), array_agg(t_x), array_agg(big_t), array_agg(n)"
            f" FROM ({_COMBOS}) c"
        ),
        {"as_of": as_of, "tz": config.timezone},
    ).one()
    x, t_x, big_t, n = (np.asarray(v or [], dtype=np.float64) for v in row)
    return {"x": x, "t_x": t_x, "T": big_t, "n": n}


def score_churn(session: Session, as_of: date, config: ScoringConfig) -> dict[str, Any]:
    """Fit BG/NBD and Gamma-Gamma on the member base and write the scores back set-based."""
    data = member_summary(session, as_of, config)
    result: dict[str, Any] = {"combinations": len(data["x"]), "members": float(data["n"].sum())}
    try:
        params = churn.fit_bgnbd(data["x"], data["t_x"], data["T"], weights=data["n"])
        p_alive = churn.probability_alive(params, data["x"], data["t_x"], data["T"])
        expected = churn.expected_purchases(
            params, config.churn_horizon_days, data["x"], data["t_x"], data["T"]
        )
    except (ValueError, FloatingPointError) as exc:
        # Too little data to fit (a new deployment): no churn scores rather than no refresh.
        log.warning("BG/NBD not fitted: %s", exc)
        result["bgnbd"] = {"error": str(exc)}
        p_alive = expected = np.full(len(data["x"]), np.nan)
    else:
        result["bgnbd"] = {
            "r": params.r,
            "alpha": params.alpha,
            "a": params.a,
            "b": params.b,
            "log_likelihood": params.log_likelihood,
            "converged": params.converged,
            "time_unit": "days",
        }
    gg = _fit_spend(session, as_of, config)
    result["gamma_gamma"] = gg
    gg_ok = "p" in gg and gg["q"] > 1
    session.execute(
        text(_WRITE),
        {
            "as_of": as_of,
            "tz": config.timezone,
            "xs": data["x"].astype(int).tolist(),
            "txs": data["t_x"].astype(int).tolist(),
            "ts": data["T"].astype(int).tolist(),
            "ps": [None if math.isnan(v) else round(float(v), 5) for v in p_alive],
            "es": [None if math.isnan(v) else round(float(v), 4) for v in expected],
            "gg_ok": gg_ok,
            "gp": gg.get("p", 1.0),
            "gq": gg.get("q", 2.0),
            "gv": gg.get("v", 1.0),
        },
    )
    return result


def _fit_spend(session: Session, as_of: date, config: ScoringConfig) -> dict[str, Any]:
    row = session.execute(
        text(
            "SELECT array_agg(x), array_agg(CAST(m AS double precision)), array_agg(n)"
            f" FROM ({_SPEND}) g"
        ),
        {"as_of": as_of, "tz": config.timezone},
    ).one()
    if not row[0]:
        return {"error": "no members with repeat purchases"}
    x, m, n = (np.asarray(v, dtype=np.float64) for v in row)
    try:
        gg = churn.fit_gamma_gamma(x, m, weights=n)
    except (ValueError, FloatingPointError) as exc:
        log.warning("Gamma-Gamma not fitted: %s", exc)
        return {"error": str(exc)}
    return {"p": gg.p, "q": gg.q, "v": gg.v, "converged": gg.converged}
