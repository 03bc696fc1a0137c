"""Churn models for segmentation: BG/NBD (purchasing and drop-out) and Gamma-Gamma (spend).

Pure numerics: no Flask, no database, no commits. The member base comes in as arrays
summarised in SQL:

- ``x``: number of repeat purchases (purchase *days* after the first one),
- ``t_x``: time of the last purchase, measured from the first purchase (0 when x = 0),
- ``T``: age, the time from the first purchase to the end of the observation window,
- ``m``: mean value of the repeat purchases (ignored where x = 0).

The time unit (days or weeks) is the caller's choice: ``t_x``, ``T`` and the horizon ``t``
must share it, and the fitted ``alpha`` is expressed in it. Formulas: Fader, Hardie & Lee
(2005) "Counting your customers the easy way", Marketing Science 24(2); Fader, Hardie &
Lee (2005) "RFM and CLV: using iso-value curves", JMR 42(4); Fader & Hardie (2013)
"The Gamma-Gamma model of monetary value".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import integrate, optimize, special

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Log-parameters are boxed so exp() can neither overflow nor reach 0; the data is
# rescaled first, so a real optimum sits far inside the box.
_LOG_BOUND = 25.0
# Spacing of the cubic interpolation across the removable singularities a = 1 and
# a + b + x - 1 = 0 of the 2F1 form of expected purchases (long horizons only): the
# cancellation next to a singularity costs ~1e-16/spacing relative precision and the
# interpolation error is O(spacing⁴), so both stay near 1e-12.
_GUARD = 1e-3
# Cap on power-series terms; with the ratio of successive terms at most 1/2 about 60
# are ever needed.
_SERIES_MAX_TERMS = 200


@dataclass(frozen=True)
class BgNbdParams:
    """BG/NBD parameters: λ ~ Gamma(r, rate alpha), drop-out p ~ Beta(a, b)."""

    # log_likelihood, n (the total weight: members) and converged describe a fit;
    # parameters built by hand keep the defaults.
    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float = math.nan
    n: float = 0.0
    converged: bool = False


@dataclass(frozen=True)
class GammaGammaParams:
    """Gamma-Gamma spend parameters p, q and v (the paper's γ)."""

    p: float
    q: float
    v: float
    log_likelihood: float = math.nan
    n: float = 0.0
    converged: bool = False


# --------------------------------------------------------------------------- input checks


def _finite(name: str, values: npt.ArrayLike) -> FloatArray:
    """The values as a float array, rejecting NaN and infinity."""
    arr = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (no NaN or infinity)")
    return arr


def _rfm(
    x: npt.ArrayLike, t_x: npt.ArrayLike, T: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Validated, broadcast member summaries (x, t_x, T)."""
    xa, ta, Ta = np.broadcast_arrays(_finite("x", x), _finite("t_x", t_x), _finite("T", T))
    if np.any(xa < 0) or np.any(xa != np.floor(xa)):
        raise ValueError("x must be a non-negative whole number of repeat purchases")
    if np.any(ta < 0) or np.any(ta > Ta):
        raise ValueError("t_x must satisfy 0 <= t_x <= T")
    return xa, ta, Ta


def _weights(weights: npt.ArrayLike | None, shape: tuple[int, ...]) -> FloatArray:
    """Validated row weights, 1 per row by default."""
    if weights is None:
        return np.ones(shape, dtype=np.float64)
    w = np.broadcast_to(_finite("weights", weights), shape).astype(np.float64)
    if np.any(w < 0):
        raise ValueError("weights must be non-negative")
    return w


def _check_params(**values: float) -> None:
    """Reject model parameters that are not positive and finite."""
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"parameter {name} must be positive and finite, got {value!r}")


def _dot(u: npt.NDArray[Any], v: npt.NDArray[Any]) -> float:
    """Dot product of two long vectors."""
    # einsum rather than BLAS (@): on these 1-D sums BLAS thread start-up dominated, and
    # was 10-50x slower on a busy machine.
    return float(np.einsum("i,i->", u, v))


def _factorise(column: FloatArray) -> tuple[FloatArray, IntArray]:
    """Distinct values of a column (a superset is allowed) and each row's index into them."""
    if column.size == 0:
        return column, np.zeros(0, dtype=np.int64)
    lo, hi = float(column.min()), float(column.max())
    # Whole numbers in a compact range (x always, t_x and T when counted in days) are
    # their own codes: no sort needed. Unused values in between cost one log each.
    if hi - lo <= max(4 * column.size, 4096) and np.all(column == np.floor(column)):
        return np.arange(lo, hi + 1), (column - lo).astype(np.int64)
    order = np.argsort(column)
    ordered = column[order]
    new_value = np.empty(column.size, dtype=bool)
    new_value[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new_value[1:])
    codes = np.empty(column.size, dtype=np.int64)
    codes[order] = np.cumsum(new_value) - 1
    return ordered[new_value], codes


@dataclass(frozen=True)
class _Grouped:
    """Distinct rows: per column (x, t_x, T) the distinct values and each row's code."""

    values: list[FloatArray]
    codes: list[IntArray]
    weights: FloatArray


def _group(columns: list[FloatArray], weights: FloatArray) -> _Grouped:
    """Collapse identical rows and add up their weights."""
    # Members share far fewer (x, t_x, T) combinations than there are members (time is
    # in whole days or weeks), and the likelihood only needs each combination once with
    # its count: this is what keeps a one-million-member fit well under a second.
    if not np.all(weights > 0):
        keep = weights > 0
        columns, weights = [c[keep] for c in columns], weights[keep]
    factors = [_factorise(c) for c in columns]
    values = [f[0] for f in factors]
    if weights.size == 0:
        return _Grouped(values, [f[1] for f in factors], weights)
    sizes = [v.size for v in values]
    if math.prod(sizes) < 2**62 and np.all(weights == 1.0):
        # Fast path for one row per member: sorting the mixed-radix key is enough, the
        # group sizes are the weights and the codes are the key's digits.
        key = np.zeros(weights.size, dtype=np.int64)
        for size, (_, codes) in zip(sizes, factors, strict=True):
            key = key * size + codes
        ordered = np.sort(key)
        starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
        group_keys = ordered[starts]
        counts = np.diff(np.append(starts, weights.size)).astype(np.float64)
        digits = []
        for size in reversed(sizes):
            group_keys, digit = np.divmod(group_keys, size)
            digits.append(digit)
        return _Grouped(values, digits[::-1], counts)
    key = factors[0][1]
    for size, (_, codes) in zip(sizes[1:], factors[1:], strict=True):
        if (int(key.max()) + 1) * size >= 2**62:
            # Re-densify the combined key before it could overflow int64.
            key = np.unique(key, return_inverse=True)[1].astype(np.int64)
        key = key * size + codes
    order = np.argsort(key)
    ordered = key[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    rows = order[starts]
    return _Grouped(
        values=values,
        codes=[f[1][rows] for f in factors],
        weights=np.add.reduceat(weights[order], starts),
    )


# --------------------------------------------------------------------------- BG/NBD


def bgnbd_log_likelihood(
    params: BgNbdParams, x: npt.ArrayLike, t_x: npt.ArrayLike, T: npt.ArrayLike
) -> FloatArray:
    """Per-member BG/NBD log-likelihood (straight from the paper's equation 6)."""
    _check_params(r=params.r, alpha=params.alpha, a=params.a, b=params.b)
    xa, ta, Ta = _rfm(x, t_x, T)
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    head = special.gammaln(r + xa) - special.gammaln(r) + r * np.log(alpha)
    alive = special.betaln(a, b + xa) - special.betaln(a, b) - (r + xa) * np.log(alpha + Ta)
    # The "dropped out after the last purchase" term only exists for x > 0; betaln would
    # be undefined at b + x - 1 <= 0 for x = 0, so evaluate it on a safe dummy and mask.
    has_repeat = xa > 0
    x_safe = np.where(has_repeat, xa, 1.0)
    dead = (
        special.betaln(a + 1, b + x_safe - 1) - special.betaln(a, b) - (r + xa) * np.log(alpha + ta)
    )
    return np.asarray(head + np.logaddexp(alive, np.where(has_repeat, dead, -np.inf)))


class _BgNbdObjective:
    """Mean negative log-likelihood and gradient over log-parameters, on grouped data."""

    def __init__(self, grouped: _Grouped) -> None:
        # Terms that depend on x alone (gamma and beta functions) are evaluated once per
        # distinct x and terms in T or t_x alone once per distinct value; per row there
        # is only the log-odds of "dropped out", which needs both t_x and T.
        (self.ux, self.ut, self.uT), (ix, it, iT) = grouped.values, grouped.codes
        w = grouped.weights
        x = self.ux[ix]
        self.total = float(w.sum())
        self.w_by_x = np.bincount(ix, weights=w, minlength=self.ux.size)
        self.w_by_T = np.bincount(iT, weights=w, minlength=self.uT.size)
        self.wx_by_T = np.bincount(iT, weights=w * x, minlength=self.uT.size)
        # Members with x = 0 have no drop-out term; only the others get per-row work.
        rep = x > 0
        self.ix, self.iT, self.it = ix[rep], iT[rep], it[rep]
        self.x, self.w = x[rep], w[rep]
        self.gap = self.uT[self.iT] - self.ut[self.it]
        self.x_has_rows = self.ux > 0
        self.ux_rep = np.where(self.x_has_rows, self.ux, 1.0)  # b + x - 1 > 0 everywhere

    def __call__(self, theta: FloatArray) -> tuple[float, FloatArray]:
        r, alpha, a, b = (float(v) for v in np.exp(theta))
        ux = self.ux
        # ll = Σ_x W_x [lnΓ(r+x) - lnΓ(r) + r ln α + ln B(a, b+x) - ln B(a, b)]
        #      - Σ_T (r W_T + Σx_T) ln(α+T) + Σ_{x>0} w softplus(d), with
        # d = ln(a/(b+x-1)) + (r+x) ln((α+T)/(α+t_x)), the log-odds of having dropped out;
        # this is ln[A + B] = ln A + ln(1 + B/A) of the paper's two-term likelihood.
        log_aT = np.log(alpha + self.uT)
        inv_aT = 1.0 / (alpha + self.uT)
        inv_at = (1.0 / (alpha + self.ut))[self.it]
        s = r + self.x
        delta = np.log1p(self.gap * inv_at)  # ln((α+T)/(α+t_x)), accurate when T ≈ t_x
        d = (math.log(a) - np.log(b + self.ux_rep - 1))[self.ix] + s * delta
        e = np.exp(-np.abs(d))
        softplus = np.maximum(d, 0.0) + np.log1p(e)
        q = np.where(d >= 0, 1.0, e) / (1.0 + e)  # P(dropped out | row), = expit(d)
        wq = self.w * q

        ll = (
            _dot(
                self.w_by_x,
                special.gammaln(r + ux) + special.betaln(a, b + ux) + r * math.log(alpha),
            )
            - self.total * (special.gammaln(r) + special.betaln(a, b))
            - _dot(r * self.w_by_T + self.wx_by_T, log_aT)
            + _dot(self.w, softplus)
        )

        psi_ab = special.digamma(a + b)
        psi_abx = special.digamma(a + b + ux)
        g_r = (
            _dot(self.w_by_x, special.digamma(r + ux))
            - self.total * (special.digamma(r) - math.log(alpha))
            - _dot(self.w_by_T, log_aT)
            + _dot(wq, delta)
        )
        g_alpha = (
            self.total * r / alpha
            - _dot(r * self.w_by_T + self.wx_by_T, inv_aT)
            - _dot(wq * s, self.gap * inv_at * inv_aT[self.iT])
        )
        g_a = _dot(self.w_by_x, psi_ab - psi_abx) + float(wq.sum()) / a
        g_b = (
            _dot(self.w_by_x, special.digamma(b + ux) - psi_abx)
            + self.total * (psi_ab - special.digamma(b))
            - _dot(wq, (1.0 / (b + self.ux_rep - 1))[self.ix])
        )
        # Chain rule for the log-parametrisation, then scale to a per-member mean so that
        # the optimiser's tolerances mean the same thing for 2,000 or 2,000,000 members.
        grad = np.array([g_r * r, g_alpha * alpha, g_a * a, g_b * b])
        return -float(ll) / self.total, -grad / self.total


def _minimise(
    objective: Callable[[FloatArray], tuple[float, FloatArray]], start: FloatArray
) -> tuple[FloatArray, float, bool]:
    """Minimise over the log-parameter box; returns (theta, value, converged)."""
    bounds = [(-_LOG_BOUND, _LOG_BOUND)] * len(start)
    # SLSQP rather than L-BFGS-B: same iteration count here, but scipy's L-BFGS-B calls
    # into threaded BLAS every iteration, which made small fits 30x slower on a busy host.
    options = {"maxiter": 1000, "ftol": 1e-15}
    res = optimize.minimize(
        objective, start, jac=True, method="SLSQP", bounds=bounds, options=options
    )
    if not _converged(res):
        # A quasi-Newton method can stall far from the optimum on awkward data; a
        # derivative-free pass gets into the basin and a second gradient pass polishes.
        nm = optimize.minimize(
            lambda th: objective(np.clip(th, -_LOG_BOUND, _LOG_BOUND))[0],
            res.x,
            method="Nelder-Mead",
            options={"maxiter": 5000, "xatol": 1e-10, "fatol": 1e-14},
        )
        res = optimize.minimize(
            objective,
            np.clip(nm.x, -_LOG_BOUND, _LOG_BOUND),
            jac=True,
            method="SLSQP",
            bounds=bounds,
            options=options,
        )
    return np.asarray(res.x, dtype=np.float64), float(res.fun), _converged(res)


def _converged(res: optimize.OptimizeResult) -> bool:
    """A stationary point strictly inside the box (a boundary optimum is degenerate data)."""
    # The objective is a per-member mean over log-parameters, so 1e-5 is a tight,
    # scale-free bound on the gradient.
    at_bound = bool(np.any(np.abs(res.x) >= _LOG_BOUND - 1e-6))
    return bool(np.isfinite(res.fun) and np.max(np.abs(res.jac)) < 1e-5 and not at_bound)


def fit_bgnbd(
    x: npt.ArrayLike,
    t_x: npt.ArrayLike,
    T: npt.ArrayLike,
    weights: npt.ArrayLike | None = None,
    initial: BgNbdParams | None = None,
) -> BgNbdParams:
    """Fit BG/NBD by maximum likelihood; weights are member counts per row.

    `initial` (e.g. yesterday's estimates on a base that changed by a day) only sets where
    the optimiser starts: the same maximum is found in about half the iterations.
    """
    xa, ta, Ta = _rfm(x, t_x, T)
    xa, ta, Ta = xa.ravel(), ta.ravel(), Ta.ravel()
    w = _weights(weights, xa.shape)
    # t_x means nothing without a repeat purchase; normalising it to 0 lets those rows
    # group together regardless of how the caller filled it in.
    ta = np.where(xa > 0, ta, 0.0)
    grouped = _group([xa, ta, Ta], w)
    total = float(grouped.weights.sum())
    if total <= 0:
        raise ValueError("no members with positive weight to fit")
    ux, ut, uT = grouped.values
    T_rows = uT[grouped.codes[2]]
    if not np.any(T_rows > 0):
        raise ValueError("every member has T = 0: there is no observed time to fit on")

    # alpha is a rate in the caller's time unit; fitting in units of the mean age keeps
    # the problem equally well scaled for days and weeks. Only alpha and the constant
    # -Σx·log(scale) in the likelihood change with the unit.
    scale = _dot(grouped.weights, T_rows) / total
    scaled = _Grouped([ux, ut / scale, uT / scale], grouped.codes, grouped.weights)
    objective = _BgNbdObjective(scaled)
    start = np.zeros(4)
    if initial is not None:
        guess = np.array([initial.r, initial.alpha / scale, initial.a, initial.b])
        if np.all(np.isfinite(guess)) and np.all(guess > 0):
            start = np.clip(np.log(guess), -_LOG_BOUND + 1, _LOG_BOUND - 1)
    theta, mean_nll, converged = _minimise(objective, start)
    r, alpha_scaled, a, b = (float(v) for v in np.exp(theta))
    sum_x = _dot(grouped.weights, ux[grouped.codes[0]])
    return BgNbdParams(
        r=r,
        alpha=alpha_scaled * scale,
        a=a,
        b=b,
        log_likelihood=-mean_nll * total - sum_x * math.log(scale),
        n=total,
        converged=converged,
    )


def probability_alive(
    params: BgNbdParams, x: npt.ArrayLike, t_x: npt.ArrayLike, T: npt.ArrayLike
) -> FloatArray:
    """P(member still active at T | x, t_x, T); 1 for x = 0 and for T = 0."""
    _check_params(r=params.r, alpha=params.alpha, a=params.a, b=params.b)
    xa, ta, Ta = _rfm(x, t_x, T)
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    has_repeat = (xa > 0) & (Ta > 0)
    x_safe = np.where(has_repeat, xa, 1.0)
    # P = 1 / (1 + a/(b+x-1) · ((alpha+T)/(alpha+t_x))^(r+x)), evaluated in logs (the power
    # overflows for heavy buyers) with log1p for the short-silence case T ≈ t_x.
    log_odds_dead = (
        np.log(a) - np.log(b + x_safe - 1) + (r + x_safe) * np.log1p((Ta - ta) / (alpha + ta))
    )
    return np.asarray(np.where(has_repeat, special.expit(-log_odds_dead), 1.0))


def _given_alive_series(r: float, a: float, b: float, z: FloatArray, x: FloatArray) -> FloatArray:
    """The conditional expectation for a live member as a power series in z (small z)."""
    # With F = 2F1(a-1, β; c; z) = 1 + (a-1)·S, β = a+b-1-r, c = a+b+x-1, the expectation
    # c/(a-1)·[1 - (1-z)^(a-1)·F] equals
    #     c·(-ln(1-z))·exprel((a-1)·ln(1-z)) - (1-z)^(a-1)·Σ_{n≥1} t_n,
    #     t_n = (a)_{n-1} (β)_n / ((c+1)_{n-1} n!) · z^n,
    # which has neither the 0/0 at a = 1 nor the pole at c = 0, and no cancellation
    # for short horizons. |t_{n+1}/t_n| = z·(a+n-1)/(c+n)·|β+n|/(n+1) ≤ z·max(1, (1+|β|)/2)
    # because c+n > a+n-1 > 0, so the caller's z ≤ min(1/2, 1/(1+|β|)) bounds it by 1/2:
    # the terms shrink geometrically from the first, which bounds the rounding error.
    c = a + b + x - 1
    beta = a + b - 1 - r
    log1m = np.log1p(-z)
    total = beta * z
    rows = np.arange(z.size)
    term, z_left, c_left = total.copy(), z, c
    for n in range(1, _SERIES_MAX_TERMS):
        going = np.abs(term) > 1e-17 * np.abs(total[rows])
        if not np.any(going):
            break
        rows, term, z_left, c_left = rows[going], term[going], z_left[going], c_left[going]
        term = term * ((a + n - 1) * (beta + n) / ((c_left + n) * (n + 1)) * z_left)
        total[rows] += term
    first = c * -log1m * special.exprel((a - 1) * log1m)
    return np.asarray(first - np.exp((a - 1) * log1m) * total)


def _given_alive_hyp(
    r: float, a: float, b: float | FloatArray, z: FloatArray, x: FloatArray
) -> FloatArray:
    """(a+b+x-1)/(a-1) · [1 - ((alpha+T)/(alpha+T+t))^(r+x) 2F1(r+x, b+x; a+b+x-1; z)]."""
    # The paper's form has 2F1 parameters r+x and b+x, which grow with x and make scipy
    # lose all precision for heavy buyers. Euler's transformation gives the same product
    # as (1-z)^(a-1) 2F1(a-1, a+b-1-r; a+b+x-1; z), whose parameters do not depend on x
    # but are large when a is (where scipy goes wrong for b ≈ 0). Per row, use the form
    # with the smaller parameters: the series converges fastest and scipy stays accurate.
    c = a + b + x - 1
    paper = np.abs(r + x) + np.abs(b + x) <= abs(a - 1) + np.abs(a + b - 1 - r)
    first = np.where(paper, r + x, a - 1)
    second = np.where(paper, b + x, a + b - 1 - r)
    hyp = special.hyp2f1(first, second, c, z)
    power = np.where(paper, r + x, a - 1)
    # Work with log|(1-z)^power·F| so that a huge F times a tiny power cannot become
    # inf·0, and use -expm1 when F > 0 to keep precision. F < 0 is possible (c < 0, i.e.
    # x = 0 and a + b < 1) and then there is no cancellation.
    with np.errstate(divide="ignore"):
        log_term = power * np.log1p(-z) + np.log(np.abs(hyp))
    bracket = np.where(hyp > 0, -np.expm1(log_term), 1.0 + np.exp(log_term))
    return np.asarray(c / (a - 1) * bracket)


def _across_singularity(
    evaluate: Callable[[float], FloatArray], at: float | FloatArray, width: float
) -> FloatArray:
    """Cubic Lagrange interpolation from offsets ±width, ±2·width to offset `at`."""
    offsets = (-2.0, -1.0, 1.0, 2.0)
    u = np.asarray(at, dtype=np.float64) / width
    total = np.zeros(np.shape(u))
    for k, uk in enumerate(offsets):
        weight = np.ones(np.shape(u))
        for j, uj in enumerate(offsets):
            if j != k:
                weight = weight * (u - uj) / (uk - uj)
        total = total + weight * evaluate(uk * width)
    return total


def _given_alive_hyp_c_guarded(
    r: float, a: float, b: float, z: FloatArray, x: FloatArray
) -> FloatArray:
    """_given_alive_hyp, interpolated across the removable singularity a + b + x - 1 = 0."""
    c = a + b + x - 1
    near_pole = np.abs(c) < _GUARD
    if not np.any(near_pole):
        return _given_alive_hyp(r, a, b, z, x)
    # 2F1 has a pole at c = 0 that the factor c cancels; evaluate at c = ±guard, ±2·guard
    # (moving b, which the formula accepts analytically even below 0) and interpolate.
    out = np.empty(c.shape)
    ok = ~near_pole
    out[ok] = _given_alive_hyp(r, a, b, z[ok], x[ok])
    zp, xp, cp = z[near_pole], x[near_pole], c[near_pole]
    out[near_pole] = _across_singularity(
        lambda offset: _given_alive_hyp(r, a, b - cp + offset, zp, xp), cp, _GUARD
    )
    return out


def _given_alive_quadrature(r: float, a: float, b: float, k: float, x: float) -> float:
    """The conditional expectation for a live member by adaptive quadrature (fallback)."""
    # E[(1 - (1 + p·k)^-(r+x)) / p] for p ~ Beta(a, b+x), k = t/(alpha+T): the paper's
    # expectation with λ integrated out. Slow (one adaptive integral per row), so only
    # used where scipy's 2F1 gives up: large a, b or r together with z close to 1.
    shape_b, s = b + x, r + x
    log_norm = -float(special.betaln(a, shape_b))

    def integrand(p: float) -> float:
        if not 0.0 < p < 1.0:
            return 0.0  # a node rounded onto an end point: measure zero
        gain = -math.expm1(-s * math.log1p(p * k)) / p
        return math.exp((a - 1) * math.log(p) + (shape_b - 1) * math.log1p(-p) + log_norm) * gain

    mean = a / (a + shape_b)
    spread = math.sqrt(mean * (1 - mean) / (a + shape_b + 1))
    # Breakpoints where the integrand changes scale: the bulk of the Beta density and
    # the turn of the gain at p ≈ 1/k.
    marks = (mean - 5 * spread, mean, mean + 5 * spread, 1 / k if k > 0 else 0.5)
    with warnings.catch_warnings():
        # Round-off warnings at the tolerance asked for; the result is checked below.
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        value = integrate.quad(
            integrand,
            0.0,
            1.0,
            points=sorted({q for q in marks if 0 < q < 1}),
            epsabs=0.0,
            epsrel=1e-10,
            limit=500,
        )[0]
    if math.isfinite(value) and value >= 0:
        return float(value)
    # Last resort: the gain at the mean drop-out probability (exact as the Beta collapses).
    return -math.expm1(-s * math.log1p(mean * k)) / mean


def _given_alive(
    r: float, alpha: float, a: float, b: float, t: FloatArray, x: FloatArray, T: FloatArray
) -> FloatArray:
    """Expected purchases in (T, T+t] for a member known to be alive at T."""
    shape = np.broadcast(t, x, T).shape
    t, x, T = (np.broadcast_to(v, shape).ravel() for v in (t, x, T))
    z = t / (alpha + T + t)
    out = np.empty(z.shape)
    # Short horizons (most members, for a 90-day horizon) by the series, which is exact
    # there; the rest by scipy's 2F1, whose value is not small enough for the
    # cancellations next to a = 1 to matter much.
    short = z <= min(0.5, 1.0 / (1.0 + abs(a + b - 1 - r)))
    out[short] = _given_alive_series(r, a, b, z[short], x[short])
    rest = np.flatnonzero(~short)
    if rest.size == 0:
        return out.reshape(shape)
    z_rest, x_rest = z[rest], x[rest]
    # scipy's 2F1 returns NaN or overflows for some large-parameter cases; those rows are
    # caught below, so the floating-point warnings they raise on the way are not news.
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if abs(a - 1.0) >= _GUARD:
            long = _given_alive_hyp_c_guarded(r, a, b, z_rest, x_rest)
        else:
            # Removable singularity at a = 1 (0/0): interpolate from points around it.
            long = _across_singularity(
                lambda offset: _given_alive_hyp_c_guarded(r, 1.0 + offset, b, z_rest, x_rest),
                a - 1.0,
                _GUARD,
            )
    out[rest] = long
    failed = rest[~(np.isfinite(long) & (long >= 0))]
    k = t / (alpha + T)
    cache: dict[tuple[float, float], float] = {}
    for i in failed:
        key = (float(k[i]), float(x[i]))
        if key not in cache:
            cache[key] = _given_alive_quadrature(r, a, b, *key)
        out[i] = cache[key]
    return out.reshape(shape)


def expected_purchases(
    params: BgNbdParams,
    t: npt.ArrayLike,
    x: npt.ArrayLike,
    t_x: npt.ArrayLike,
    T: npt.ArrayLike,
) -> FloatArray:
    """Expected number of purchases in the next t time units, given x, t_x and T."""
    _check_params(r=params.r, alpha=params.alpha, a=params.a, b=params.b)
    xa, ta, Ta = _rfm(x, t_x, T)
    horizon = _finite("t", t)
    if np.any(horizon < 0):
        raise ValueError("t must be non-negative")
    horizon, xa, ta, Ta = np.broadcast_arrays(horizon, xa, ta, Ta)
    given_alive = _given_alive(params.r, params.alpha, params.a, params.b, horizon, xa, Ta)
    value = given_alive * probability_alive(params, xa, ta, Ta)
    # The bracket is a difference of nearly equal terms for tiny horizons; never let
    # rounding produce a negative count.
    return np.asarray(np.maximum(value, 0.0))


# --------------------------------------------------------------------------- Gamma-Gamma


class _GammaGammaObjective:
    """Mean negative log-likelihood of the spend model and its gradient over log-parameters."""

    def __init__(self, x: FloatArray, m: FloatArray, w: FloatArray) -> None:
        # The gamma functions depend on x alone: evaluate them per distinct x.
        self.ux, ix = _factorise(x)
        self.w_by_x = np.bincount(ix, weights=w, minlength=self.ux.size)
        self.mx = m * x
        self.inv_mx = 1.0 / self.mx
        self.w = w
        self.wx = w * x
        self.total = float(w.sum())
        # Parameter-free parts of the likelihood are summed once.
        self.sum_w_log_m = _dot(w, np.log(m))
        self.sum_w_log_mx = _dot(w, np.log(self.mx))

    def __call__(self, theta: FloatArray) -> tuple[float, FloatArray]:
        p, q, v = (float(val) for val in np.exp(theta))
        px = p * self.ux
        # log f(m | x) = lnΓ(px+q) - lnΓ(px) - lnΓ(q) + q ln v + (px-1) ln m + px ln x
        #                - (px+q) ln(v + m x),
        # with ln(v + m x) = ln(m x) + ln(1 + v/(m x)), so that px·ln(m x) cancels exactly
        # instead of as the difference of two large sums.
        log1p_ratio = np.log1p(v * self.inv_mx)
        sum_w_l = _dot(self.w, log1p_ratio)
        sum_wx_l = _dot(self.wx, log1p_ratio)
        ll = (
            _dot(self.w_by_x, special.gammaln(px + q) - special.gammaln(px))
            - self.total * (special.gammaln(q) - q * math.log(v))
            - self.sum_w_log_m
            - p * sum_wx_l
            - q * (self.sum_w_log_mx + sum_w_l)
        )
        psi_pxq = special.digamma(px + q)
        g_p = _dot(self.w_by_x * self.ux, psi_pxq - special.digamma(px)) - sum_wx_l
        g_q = (
            _dot(self.w_by_x, psi_pxq)
            - self.total * (special.digamma(q) - math.log(v))
            - self.sum_w_log_mx
            - sum_w_l
        )
        g_v = self.total * q / v - _dot(p * self.wx + q * self.w, 1.0 / (v + self.mx))
        # Chain rule for the log-parametrisation; per-member mean as for BG/NBD.
        grad = np.array([g_p * p, g_q * q, g_v * v])
        return -float(ll) / self.total, -grad / self.total


def fit_gamma_gamma(
    x: npt.ArrayLike, m: npt.ArrayLike, weights: npt.ArrayLike | None = None
) -> GammaGammaParams:
    """Fit the Gamma-Gamma spend model by maximum likelihood on members with x > 0."""
    xa = _finite("x", x)
    ma = np.asarray(m, dtype=np.float64)
    xa, ma = np.broadcast_arrays(xa, ma)
    xa, ma = xa.ravel(), ma.ravel()
    if np.any(xa < 0) or np.any(xa != np.floor(xa)):
        raise ValueError("x must be a non-negative whole number of repeat purchases")
    w = _weights(weights, xa.shape)
    # Members without repeat purchases carry no spend information (m is undefined for
    # them, often NULL/NaN from SQL), so they are dropped rather than rejected.
    use = (xa > 0) & (w > 0)
    xa, ma, w = xa[use], ma[use], w[use]
    if not np.all(np.isfinite(ma)) or np.any(ma <= 0):
        raise ValueError("m must be positive and finite for members with x > 0")
    if xa.size == 0:
        raise ValueError("no members with repeat purchases to fit the spend model on")

    # v is in money units: fit in units of the mean spend so that cents and euros are
    # equally well scaled; the density picks up a constant -log(scale) per member.
    scale = float(np.average(ma, weights=w))
    objective = _GammaGammaObjective(xa, ma / scale, w)
    theta, mean_nll, converged = _minimise(objective, np.zeros(3))
    p, q, v_scaled = (float(val) for val in np.exp(theta))
    total = float(w.sum())
    log_likelihood = -mean_nll * total - total * math.log(scale)
    return GammaGammaParams(
        p=p, q=q, v=v_scaled * scale, log_likelihood=log_likelihood, n=total, converged=converged
    )


def gamma_gamma_log_likelihood(
    params: GammaGammaParams, x: npt.ArrayLike, m: npt.ArrayLike
) -> FloatArray:
    """Per-member log-density of the observed mean spend m given x > 0 (reference form)."""
    _check_params(p=params.p, q=params.q, v=params.v)
    xa, ma = np.broadcast_arrays(_finite("x", x), _finite("m", m))
    if np.any(xa <= 0) or np.any(ma <= 0):
        raise ValueError("the spend likelihood needs x > 0 and m > 0")
    p, q, v = params.p, params.q, params.v
    px = p * xa
    return np.asarray(
        special.gammaln(px + q)
        - special.gammaln(px)
        - special.gammaln(q)
        + q * np.log(v)
        + (px - 1) * np.log(ma)
        + px * np.log(xa)
        - (px + q) * np.log(v + ma * xa)
    )


def expected_average_value(
    params: GammaGammaParams, x: npt.ArrayLike, m: npt.ArrayLike
) -> FloatArray:
    """Posterior mean spend per purchase; the population mean p·v/(q-1) where x = 0."""
    _check_params(p=params.p, q=params.q, v=params.v)
    xa = _finite("x", x)
    ma = np.asarray(m, dtype=np.float64)
    xa, ma = np.broadcast_arrays(xa, ma)
    if np.any(xa < 0) or np.any(xa != np.floor(xa)):
        raise ValueError("x must be a non-negative whole number of repeat purchases")
    has_repeat = xa > 0
    if not np.all(np.isfinite(ma[has_repeat])) or np.any(ma[has_repeat] < 0):
        raise ValueError("m must be non-negative and finite for members with x > 0")
    p, q, v = params.p, params.q, params.v
    # E[p/ν | data] with ν | data ~ Gamma(px+q, v+mx): (v + m x)·p / (px + q - 1). The
    # posterior mean of 1/ν does not exist when px + q <= 1 (only possible for q <= 1),
    # and the honest answer there is an infinite expected value, never a NaN.
    m_safe = np.where(has_repeat, ma, 0.0)
    shape = p * xa + q - 1
    finite = shape > 0
    value = p * (v + m_safe * xa) / np.where(finite, shape, 1.0)
    return np.asarray(np.where(finite, value, np.inf))
