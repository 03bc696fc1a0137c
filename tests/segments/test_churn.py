"""Churn models: the published CDNOW estimates, model properties, and independent cross-checks."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, optimize, special

from segments.churn import (
    BgNbdParams,
    GammaGammaParams,
    _BgNbdObjective,
    _group,
    bgnbd_log_likelihood,
    expected_average_value,
    expected_purchases,
    fit_bgnbd,
    fit_gamma_gamma,
    gamma_gamma_log_likelihood,
    probability_alive,
)

ROOT = Path(__file__).resolve().parents[2]
# The CDNOW sample (lifetimes' copy, MIT) is vendored with the tests; see its README.
CDNOW = ROOT / "tests" / "data" / "cdnow"
CALIBRATION_END = date(1997, 9, 30)

# A realistic parameter set (close to CDNOW's, time in weeks) for property checks.
WEEKLY = BgNbdParams(r=0.243, alpha=4.414, a=0.793, b=2.426)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Summary:
    x: np.ndarray
    t_x: np.ndarray
    T: np.ndarray


@dataclass(frozen=True)
class Spend:
    ids: np.ndarray
    x: np.ndarray
    t_x: np.ndarray
    T: np.ndarray
    m: np.ndarray  # mean value of the repeat purchase days; NaN where x = 0


def _need(path: Path) -> Path:
    # Vendored data: a missing file is a broken checkout, not a reason to skip.
    if not path.exists():
        raise FileNotFoundError(path)
    return path


@pytest.fixture(scope="module")
def cdnow() -> Summary:
    data = np.genfromtxt(_need(CDNOW / "cdnow_customers_summary.csv"), delimiter=",", names=True)
    return Summary(x=data["frequency"], t_x=data["recency"], T=data["T"])


@pytest.fixture(scope="module")
def cdnow_spend() -> Spend:
    """Calibration-period summary built from the raw transactions (lifetimes' convention)."""
    # Several transactions on one day are one purchase with the summed value; the first
    # purchase day is the acquisition and is not counted (nor its value used).
    by_day: dict[int, dict[date, float]] = defaultdict(lambda: defaultdict(float))
    for line in _need(CDNOW / "CDNOW_sample.txt").read_text().splitlines():
        _, sample_id, day, _, value = line.split()
        when = date(int(day[:4]), int(day[4:6]), int(day[6:]))
        if when <= CALIBRATION_END:
            by_day[int(sample_id)][when] += float(value)
    ids, xs, t_xs, Ts, ms = [], [], [], [], []
    for customer, days in sorted(by_day.items()):
        ordered = sorted(days)
        repeat = [days[d] for d in ordered[1:]]
        ids.append(customer)
        xs.append(len(repeat))
        t_xs.append((ordered[-1] - ordered[0]).days / 7)
        Ts.append((CALIBRATION_END - ordered[0]).days / 7)
        ms.append(float(np.mean(repeat)) if repeat else math.nan)
    return Spend(*(np.array(v, dtype=float) for v in (ids, xs, t_xs, Ts, ms)))


def simulate_bgnbd(
    rng: np.random.Generator, params: BgNbdParams, T: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Purchase histories from the BG/NBD story: Poisson(λ) purchases, drop-out p after each."""
    n = T.size
    lam = rng.gamma(params.r, 1.0 / params.alpha, n)
    p = rng.beta(params.a, params.b, n)
    x, t_x, now = np.zeros(n), np.zeros(n), np.zeros(n)
    active = np.arange(n)
    while active.size:
        now[active] += rng.exponential(1.0, active.size) / lam[active]
        active = active[now[active] <= T[active]]
        x[active] += 1
        t_x[active] = now[active]
        active = active[rng.random(active.size) >= p[active]]
    return x, t_x


# --------------------------------------------------------------------------- BG/NBD: CDNOW


def test_bgnbd_reproduces_the_published_cdnow_estimates(cdnow: Summary):
    params = fit_bgnbd(cdnow.x, cdnow.t_x, cdnow.T)
    # Fader, Hardie & Lee (2005), "Counting your customers the easy way", section 5.
    assert params.converged
    assert params.n == 2357
    assert round(params.r, 3) == 0.243
    assert round(params.alpha, 3) == 4.414
    assert round(params.a, 3) == 0.793
    assert round(params.b, 3) == 2.426
    assert round(params.log_likelihood, 1) == -9582.4


@pytest.mark.parametrize("factor", [0.5, 0.97, 1.0, 3.0])
def test_a_fit_started_from_earlier_estimates_finds_the_same_maximum(cdnow: Summary, factor: float):
    # The daily refresh starts from yesterday's estimates; the answer must not depend on it.
    cold = fit_bgnbd(cdnow.x, cdnow.t_x, cdnow.T)
    start = BgNbdParams(
        r=cold.r * factor, alpha=cold.alpha / factor, a=cold.a * factor, b=cold.b * factor
    )
    warm = fit_bgnbd(cdnow.x, cdnow.t_x, cdnow.T, initial=start)
    assert warm.converged
    for name in ("r", "alpha", "a", "b"):
        assert getattr(warm, name) == pytest.approx(getattr(cold, name), rel=1e-5), name
    assert warm.log_likelihood == pytest.approx(cold.log_likelihood, abs=1e-6)


def test_fitted_log_likelihood_is_the_direct_formula_at_a_maximum(cdnow: Summary):
    params = fit_bgnbd(cdnow.x, cdnow.t_x, cdnow.T)
    direct = bgnbd_log_likelihood(params, cdnow.x, cdnow.t_x, cdnow.T).sum()
    assert params.log_likelihood == pytest.approx(direct, rel=1e-12)
    # Moving any parameter by 0.1% in either direction lowers the likelihood.
    base = np.array([params.r, params.alpha, params.a, params.b])
    for i in range(4):
        for step in (0.999, 1.001):
            moved = base.copy()
            moved[i] *= step
            other = bgnbd_log_likelihood(BgNbdParams(*moved), cdnow.x, cdnow.t_x, cdnow.T)
            assert other.sum() < direct


def test_transactions_rebuild_the_published_calibration_summary(cdnow: Summary, cdnow_spend: Spend):
    # Confirms the per-day convention used for the spend data below.
    assert np.array_equal(cdnow_spend.x, cdnow.x)
    assert np.allclose(cdnow_spend.t_x, cdnow.t_x, atol=0.005)
    assert np.allclose(cdnow_spend.T, cdnow.T, atol=0.005)


def test_weights_on_distinct_rows_equal_the_expanded_member_base(cdnow: Summary):
    rows = np.column_stack([cdnow.x, cdnow.t_x, cdnow.T])
    distinct, counts = np.unique(rows, axis=0, return_counts=True)
    assert len(distinct) < len(rows)  # the test means something only if rows repeat
    x, t_x, T = distinct[:, 0], distinct[:, 1], distinct[:, 2]
    expanded = fit_bgnbd(cdnow.x, cdnow.t_x, cdnow.T)
    weighted = fit_bgnbd(x, t_x, T, weights=counts)
    for name in ("r", "alpha", "a", "b", "log_likelihood", "n"):
        assert getattr(weighted, name) == pytest.approx(getattr(expanded, name), rel=1e-9)
    direct = (counts * bgnbd_log_likelihood(weighted, x, t_x, T)).sum()
    assert weighted.log_likelihood == pytest.approx(direct, rel=1e-12)
    # Scaling all weights scales the likelihood and leaves the estimates alone; rows with
    # weight 0 do not count.
    scaled = fit_bgnbd(
        np.append(x, 50.0),
        np.append(t_x, 1.0),
        np.append(T, 60.0),
        weights=np.append(counts * 2.5, 0.0),
    )
    assert scaled.r == pytest.approx(expanded.r, rel=1e-6)
    assert scaled.b == pytest.approx(expanded.b, rel=1e-6)
    assert scaled.log_likelihood == pytest.approx(2.5 * expanded.log_likelihood, rel=1e-9)
    assert scaled.n == pytest.approx(2.5 * 2357)


def test_the_time_unit_only_rescales_alpha(cdnow: Summary):
    weeks = fit_bgnbd(cdnow.x, cdnow.t_x, cdnow.T)
    days = fit_bgnbd(cdnow.x, cdnow.t_x * 7, cdnow.T * 7)
    assert days.alpha == pytest.approx(7 * weeks.alpha, rel=1e-6)
    for name in ("r", "a", "b"):
        assert getattr(days, name) == pytest.approx(getattr(weeks, name), rel=1e-6)
    # The likelihood is a density in time: it shifts by -Σx·ln 7.
    shift = -cdnow.x.sum() * math.log(7)
    assert days.log_likelihood == pytest.approx(weeks.log_likelihood + shift, rel=1e-9)
    # Predictions are the same when asked in the matching unit.
    assert np.allclose(
        expected_purchases(days, 13 * 7, cdnow.x, cdnow.t_x * 7, cdnow.T * 7),
        expected_purchases(weeks, 13, cdnow.x, cdnow.t_x, cdnow.T),
        rtol=1e-5,
    )


def test_grouped_likelihood_and_gradient_match_the_direct_formula():
    # The fit's fast objective rearranges the likelihood per distinct x, T and t_x; it must
    # equal the paper's per-member formula, and its analytic gradient the numerical one.
    rng = np.random.default_rng(4)
    x = rng.integers(0, 30, 400).astype(float)
    T = rng.choice([5.0, 10.5, 26.0, 39.0], 400)
    t_x = np.where(x > 0, np.round(rng.uniform(0, 1, 400) * T, 1), 0.0)
    w = rng.integers(1, 5, 400).astype(float)
    objective = _BgNbdObjective(_group([x, t_x, T], w))
    for theta in (np.zeros(4), np.log([0.3, 5.0, 0.8, 2.5]), np.log([3.0, 0.2, 1.7, 0.4])):
        direct = -(w * bgnbd_log_likelihood(BgNbdParams(*np.exp(theta)), x, t_x, T)).sum()
        assert objective(theta)[0] * w.sum() == pytest.approx(direct, rel=1e-12)
        error = optimize.check_grad(lambda th: objective(th)[0], lambda th: objective(th)[1], theta)
        assert error < 1e-5


def test_a_simulated_member_base_gives_back_its_parameters():
    truth = BgNbdParams(r=0.5, alpha=8.0, a=0.7, b=2.5)
    rng = np.random.default_rng(2024)
    T = rng.uniform(26, 104, 50_000)
    x, t_x = simulate_bgnbd(rng, truth, T)
    fitted = fit_bgnbd(x, t_x, T)
    assert fitted.converged
    assert fitted.r == pytest.approx(truth.r, rel=0.05)
    assert fitted.alpha == pytest.approx(truth.alpha, rel=0.05)
    assert fitted.a == pytest.approx(truth.a, rel=0.15)
    assert fitted.b == pytest.approx(truth.b, rel=0.15)
    at_truth = bgnbd_log_likelihood(truth, x, t_x, T).sum()
    assert fitted.log_likelihood >= at_truth


def test_a_million_members_in_days_fit_quickly():
    truth = BgNbdParams(r=0.25, alpha=30.0, a=0.8, b=2.5)
    rng = np.random.default_rng(7)
    T = rng.integers(1, 3 * 365, 1_000_000).astype(float)
    x, t_x = simulate_bgnbd(rng, truth, T)
    t_x = np.floor(t_x)  # whole days, as SQL computes them
    started = time.perf_counter()
    fitted = fit_bgnbd(x, t_x, T)
    elapsed = time.perf_counter() - started
    assert fitted.converged
    assert fitted.r == pytest.approx(truth.r, rel=0.05)
    # Typically ~0.3 s of CPU; the bound only catches losing the grouping or the
    # analytic gradient (either costs 5-10x), not a busy test machine.
    assert elapsed < 5.0


# --------------------------------------------------------------------------- BG/NBD: predictions


def test_probability_alive_matches_the_likelihood_decomposition():
    # P(alive) is the share of the "still active at T" term in the paper's likelihood.
    x = np.array([1.0, 2.0, 5.0, 30.0, 200.0])
    t_x = np.array([3.0, 30.0, 10.0, 38.0, 35.0])
    T = np.full(5, 39.0)
    r, alpha, a, b = WEEKLY.r, WEEKLY.alpha, WEEKLY.a, WEEKLY.b
    alive = special.betaln(a, b + x) - (r + x) * np.log(alpha + T)
    dead = special.betaln(a + 1, b + x - 1) - (r + x) * np.log(alpha + t_x)
    expected = np.exp(alive - np.logaddexp(alive, dead))
    assert np.allclose(probability_alive(WEEKLY, x, t_x, T), expected, rtol=1e-12)


def test_probability_alive_is_one_without_repeat_purchases_or_age():
    assert np.all(probability_alive(WEEKLY, [0, 0], [0, 0], [0, 50]) == 1.0)
    assert probability_alive(WEEKLY, 0, 0, 0) == 1.0


def test_probability_alive_falls_with_longer_silence():
    T = np.linspace(10, 400, 60)
    for x in (1, 3, 20):
        p = probability_alive(WEEKLY, np.full_like(T, x), np.full_like(T, 10.0), T)
        assert p[0] == pytest.approx(1 / (1 + WEEKLY.a / (WEEKLY.b + x - 1)))
        assert np.all(np.diff(p) < 0)
    # ... and more purchases in the same window mean a stronger signal either way.
    assert probability_alive(WEEKLY, 20, 5, 39) < probability_alive(WEEKLY, 2, 5, 39)


def _expected_by_quadrature(p: BgNbdParams, t: float, x: float, t_x: float, T: float) -> float:
    """E[Y(t) | x, t_x, T] integrated from the model's definition, not from 2F1."""
    # Alive at T with probability P(alive); then λ | data ~ Gamma(r+x, alpha+T) and
    # p | data ~ Beta(a, b+x), and E[Y(t) | λ, p] = (1 - exp(-λpt))/p. Integrating λ
    # analytically leaves a Beta expectation of (1 - (1 + p·t/(alpha+T))^-(r+x))/p.
    k, s = t / (p.alpha + T), p.r + x

    def gain(q: float) -> float:
        return -math.expm1(-s * math.log1p(q * k)) / q if q > 0 else s * k

    value = integrate.quad(
        gain, 0, 1, weight="alg", wvar=(p.a - 1, p.b + x - 1), epsabs=0, epsrel=1e-11, limit=200
    )[0]
    alive = float(probability_alive(p, x, t_x, T))
    return alive * value / math.exp(special.betaln(p.a, p.b + x))


@pytest.mark.parametrize(
    "params",
    [
        WEEKLY,
        BgNbdParams(r=2.0, alpha=30.0, a=3.5, b=9.0),  # a > 1, days
        BgNbdParams(r=0.5, alpha=10.0, a=1.0, b=2.0),  # a = 1: removable 0/0
        BgNbdParams(r=0.7, alpha=3.0, a=0.3, b=0.5),  # a + b < 1: 2F1 with c < 0 at x = 0
        BgNbdParams(r=0.7, alpha=3.0, a=0.4, b=0.6),  # a + b = 1: 2F1 pole at x = 0
    ],
)
@pytest.mark.parametrize("t", [0.5, 13.0, 90.0, 2000.0])
def test_expected_purchases_match_numerical_integration(params: BgNbdParams, t: float):
    members = [(0, 0.0, 0.0), (0, 0.0, 39.0), (1, 2.0, 39.0), (7, 30.0, 39.0), (150, 38.0, 39.0)]
    for x, t_x, T in members:
        got = float(expected_purchases(params, t, x, t_x, T))
        assert got == pytest.approx(_expected_by_quadrature(params, t, x, t_x, T), rel=1e-7)


def test_expected_purchases_for_x_zero_is_the_published_unconditional_formula():
    # With no repeat purchase the member is surely alive and only λ's posterior moves
    # (alpha -> alpha + T), so E[Y(t)] is the paper's E[X(t)] (eq. 9) with alpha + T,
    # evaluated here in its untransformed 2F1 form.
    r, a, b = WEEKLY.r, WEEKLY.a, WEEKLY.b
    for T in (0.0, 10.0, 39.0):
        for t in (1.0, 13.0, 52.0, 200.0):
            alpha = WEEKLY.alpha + T
            z = t / (alpha + t)
            published = (
                (a + b - 1)
                / (a - 1)
                * (1 - (alpha / (alpha + t)) ** r * special.hyp2f1(r, b, a + b - 1, z))
            )
            assert float(expected_purchases(WEEKLY, t, 0, 0, T)) == pytest.approx(
                published, rel=1e-10
            )


def test_expected_purchases_for_short_horizons_approach_the_purchase_rate():
    # For t -> 0: P(alive) · E[λ | data] · t = P(alive) · (r+x)/(alpha+T) · t.
    x, t_x, T, t = 4.0, 20.0, 39.0, 1e-6
    rate = (WEEKLY.r + x) / (WEEKLY.alpha + T)
    limit = float(probability_alive(WEEKLY, x, t_x, T)) * rate * t
    assert float(expected_purchases(WEEKLY, t, x, t_x, T)) == pytest.approx(limit, rel=1e-5)
    assert float(expected_purchases(WEEKLY, 0.0, x, t_x, T)) == 0.0


def test_expected_purchases_where_scipy_hyp2f1_gives_up():
    # scipy's 2F1 returns NaN here (large b, horizon far beyond alpha + T); the adaptive
    # quadrature fallback takes over. Reference value: mpmath at 50 digits.
    params = BgNbdParams(
        r=0.015287895636341671,
        alpha=0.010977196793766469,
        a=0.05452142878643559,
        b=375.1534699938018,
    )
    got = float(expected_purchases(params, 5676.925598123501, 0, 0, 0.10443168390454141))
    assert got == pytest.approx(624.8280926774277, rel=1e-8)


def test_edge_cases_return_numbers():
    huge = np.array([0, 1e7, 1e7, 5e5])
    t_x = np.array([0, 100.0, 1.0, 99.0])
    T = np.array([0, 100.0, 100.0, 100.0])
    for params in (WEEKLY, BgNbdParams(1e-3, 1e-3, 1e3, 1e-3), BgNbdParams(50, 1e4, 1e-4, 1e4)):
        alive = probability_alive(params, huge, t_x, T)
        purchases = expected_purchases(params, 1e4, huge, t_x, T)
        assert np.all(np.isfinite(alive)) and np.all((alive >= 0) & (alive <= 1))
        assert np.all(np.isfinite(purchases)) and np.all(purchases >= 0)


positive = st.floats(min_value=0.01, max_value=50.0)


@st.composite
def members(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rows = draw(
        st.lists(
            st.tuples(
                st.integers(0, 10**6),
                st.floats(0.0, 1.0),
                st.floats(0.0, 1e4),
                st.floats(0.0, 1e4),
            ),
            min_size=1,
            max_size=20,
        )
    )
    x, share, T, t = (np.array(col, dtype=float) for col in zip(*rows, strict=True))
    x = np.where(T > 0, x, 0.0)
    return x, np.where(x > 0, share * T, 0.0), T, t


@settings(max_examples=300, deadline=None)
@given(r=positive, alpha=positive, a=positive, b=positive, data=members())
def test_predictions_are_probabilities_and_finite_counts(
    r: float,
    alpha: float,
    a: float,
    b: float,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
):
    x, t_x, T, t = data
    params = BgNbdParams(r, alpha, a, b)
    alive = probability_alive(params, x, t_x, T)
    purchases = expected_purchases(params, t, x, t_x, T)
    assert np.all(np.isfinite(alive)) and np.all((alive >= 0) & (alive <= 1))
    assert np.all(np.isfinite(purchases)) and np.all(purchases >= 0)


@pytest.mark.parametrize(
    ("x", "t_x", "T"),
    [(-1, 0, 5), (1.5, 1, 5), (2, 6, 5), (2, -1, 5), (math.nan, 0, 5), (1, 1, math.inf)],
)
def test_invalid_member_summaries_are_rejected(x: float, t_x: float, T: float):
    with pytest.raises(ValueError, match=r"x|t_x|T"):
        probability_alive(WEEKLY, x, t_x, T)
    with pytest.raises(ValueError, match=r"x|t_x|T"):
        fit_bgnbd([x, 0], [t_x, 0], [T, 5])


def test_fitting_needs_members_with_observed_time():
    with pytest.raises(ValueError, match="T = 0"):
        fit_bgnbd([0, 0], [0, 0], [0, 0])
    with pytest.raises(ValueError, match="positive weight"):
        fit_bgnbd([1, 0], [1, 0], [2, 3], weights=[0, 0])


# --------------------------------------------------------------------------- Gamma-Gamma


def test_gamma_gamma_reproduces_the_published_cdnow_estimates(cdnow_spend: Spend):
    # Published on CDNOW (946 customers with repeat purchases in the calibration period):
    # p = 6.25, q = 3.74, gamma = 15.44.
    params = fit_gamma_gamma(cdnow_spend.x, cdnow_spend.m)
    assert params.converged
    assert params.n == 946
    assert round(params.p, 2) == 6.25
    assert round(params.q, 2) == 3.74
    assert round(params.v, 2) == 15.44
    # The implied population mean spend p·gamma/(q-1) agrees with the sample mean.
    repeaters = cdnow_spend.x > 0
    sample_mean = float(np.mean(cdnow_spend.m[repeaters]))
    assert params.p * params.v / (params.q - 1) == pytest.approx(sample_mean, rel=0.01)


def test_gamma_gamma_fit_is_the_maximum_of_the_direct_formula(cdnow_spend: Spend):
    params = fit_gamma_gamma(cdnow_spend.x, cdnow_spend.m)
    repeaters = cdnow_spend.x > 0
    x, m = cdnow_spend.x[repeaters], cdnow_spend.m[repeaters]
    direct = gamma_gamma_log_likelihood(params, x, m).sum()
    assert params.log_likelihood == pytest.approx(direct, rel=1e-12)
    base = np.array([params.p, params.q, params.v])
    for i in range(3):
        for step in (0.999, 1.001):
            moved = base.copy()
            moved[i] *= step
            assert gamma_gamma_log_likelihood(GammaGammaParams(*moved), x, m).sum() < direct


def test_gamma_gamma_weights_and_currency_units(cdnow_spend: Spend):
    x, m = cdnow_spend.x, cdnow_spend.m
    plain = fit_gamma_gamma(x, m)
    doubled = fit_gamma_gamma(np.append(x, x), np.append(m, m))
    weighted = fit_gamma_gamma(x, m, weights=np.full(x.size, 2.0))
    for name in ("p", "q", "v"):
        assert getattr(weighted, name) == pytest.approx(getattr(plain, name), rel=1e-6)
        assert getattr(doubled, name) == pytest.approx(getattr(plain, name), rel=1e-6)
    assert weighted.log_likelihood == pytest.approx(doubled.log_likelihood, rel=1e-9)
    cents = fit_gamma_gamma(x, m * 100)
    assert cents.v == pytest.approx(100 * plain.v, rel=1e-6)
    assert cents.p == pytest.approx(plain.p, rel=1e-6)


def test_gamma_gamma_recovers_simulated_parameters():
    p, q, v = 6.0, 4.0, 15.0
    rng = np.random.default_rng(11)
    x = rng.integers(1, 10, 50_000).astype(float)
    nu = rng.gamma(q, 1 / v, x.size)  # per-member scale of spend
    m = rng.gamma(p * x, 1 / nu) / x  # mean of x Gamma(p, nu) transaction values
    fitted = fit_gamma_gamma(x, m)
    assert fitted.converged
    assert fitted.p == pytest.approx(p, rel=0.1)
    assert fitted.q == pytest.approx(q, rel=0.1)
    assert fitted.v == pytest.approx(v, rel=0.1)


def test_expected_average_value_shrinks_towards_the_population_mean():
    params = GammaGammaParams(p=6.25, q=3.74, v=15.44)
    population = params.p * params.v / (params.q - 1)
    x = np.array([0.0, 1.0, 5.0, 1e6])
    m = np.array([math.nan, 80.0, 80.0, 80.0])  # m is unused (and NULL in SQL) at x = 0
    value = expected_average_value(params, x, m)
    weight = params.p * x / (params.p * x + params.q - 1)
    assert np.allclose(value, (1 - weight) * population + weight * np.nan_to_num(m))
    assert value[0] == pytest.approx(population)
    assert population < value[1] < value[2] < value[3] < 80.0 + 1e-3
    # No finite population mean when q <= 1: infinite, never NaN.
    assert expected_average_value(GammaGammaParams(2.0, 0.5, 10.0), 0, math.nan) == math.inf


def test_gamma_gamma_rejects_unusable_spend():
    with pytest.raises(ValueError, match="m must be positive"):
        fit_gamma_gamma([1, 2], [10.0, 0.0])
    with pytest.raises(ValueError, match="repeat purchases"):
        fit_gamma_gamma([0, 0], [math.nan, math.nan])
