"""Churn scores: BG/NBD probability alive and expected purchases, Gamma-Gamma expected value.

Per member, in days, from member_stats: x = purchase days - 1 (repeat purchase days),
t_x = days from the first to the last purchase day, T = days from the first purchase day
to the as-of date. Many members share the same (x, t_x, T), so the model is fitted and
evaluated on the distinct combinations with member counts as weights, and the results
are joined back to the members set-based into a new `member_predictions` table that
replaces the previous one (no per-member Python, no update of member_scores).
"""

# SQL here is assembled from this module's constants only; every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import io
import logging
import time
from datetime import date
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from segments import churn, stats
from segments.config import ScoringConfig

log = logging.getLogger(__name__)

# (x, t_x, T) packed into one integer: a one-column join the planner estimates well (with
# three columns it assumes independence, underestimates ~60x and picks nested loops).
# Days stay below 2^20 (2,870 years) and x below 2^23.
_COMBO = "(CAST(x AS bigint) << 40) | (CAST(t_x AS bigint) << 20) | big_t"

# Per member, once per run: the churn inputs in days, from local first / last purchase days
# (one time zone conversion each, not one per use) and the mean spend per purchase. The
# statements below (the distinct combinations, the spend summary, the build) read this
# small table instead of recomputing the expressions over member_stats three times.
_KEYS = f"""
    CREATE TEMPORARY TABLE patron_churn_keys ON COMMIT DROP AS
    SELECT *, {_COMBO} AS combo FROM (
    SELECT member_id,
           GREATEST(purchase_days - 1, 0) AS x,
           CASE WHEN purchase_days > 1 THEN last_day - first_day ELSE 0 END AS t_x,
           -- A purchase after the as-of date (a back-dated run) must not make T < t_x.
           GREATEST(CAST(:as_of AS date) - first_day, last_day - first_day, 0) AS big_t,
           -- Only the build's double precision arithmetic reads it: no numeric division.
           GREATEST(CAST(net_spend AS double precision) / NULLIF(purchase_count, 0), 0)
               AS mean_spend,
           -- Mean spend per purchase of members with repeat purchases, rounded to the
           -- cent so that equal values group together (the Gamma-Gamma fit's input).
           CASE WHEN purchase_days > 1 AND purchase_count > 0 AND net_spend > 0
                THEN round(net_spend / purchase_count, 2) END AS fit_spend
    FROM (
        -- Local days by a plain cast under the business zone as the TimeZone setting
        -- (_prepare_keys): timezone() with a zone name looks it up on every call.
        -- Erased members are few: an anti-join with them (the partial index of members
        -- not active) instead of reading every member row.
        SELECT s.member_id, s.purchase_days, s.purchase_count, s.net_spend,
               CAST(s.first_purchase_at AS date) AS first_day,
               CAST(s.last_purchase_at AS date) AS last_day
        FROM member_stats s
        WHERE s.last_purchase_at IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM members mb
                          WHERE mb.id = s.member_id AND mb.status <> 'active')
    ) d
    ) k
"""

_KEY_COLUMNS = (
    "SELECT CAST(x AS integer), CAST(t_x AS integer), CAST(big_t AS integer) FROM patron_churn_keys"
)
# Rounded to the cent in numeric, so equal spends are equal doubles too.
_SPEND_COLUMNS = (
    "SELECT CAST(x AS integer), CAST(fit_spend AS double precision) FROM patron_churn_keys"
    " WHERE fit_spend IS NOT NULL"
)

# Serialises churn runs (they build the same `member_predictions_new`); nothing else takes it.
_CHURN_LOCK = 7_264_002

# The whole table anew each run: T grows by a day for every member, so ~90 % of the rows
# change daily, and updating them in place rewrote most of the table plus its index entries
# (~190 MB of WAL at 810k members) while holding row locks. Rows go into a table with no
# index; the primary key is built once, after the fill. The columns are cast to the
# model's types (`MemberPrediction`, the same order): CREATE TABLE AS takes the types of the
# expressions, and a CASE without ELSE loses the typmod.
#
# Expected spend over the horizon: expected purchases x the Gamma-Gamma posterior mean
# spend per purchase, p (v + m x) / (p x + q - 1) (= churn.expected_average_value; the
# population mean p v / (q - 1) where x = 0).
_BUILD = """
    CREATE TABLE member_predictions_new AS
    SELECT CAST(k.member_id AS bigint) AS member_id,
           CAST(:as_of AS date) AS as_of,
           -- The model's NaN (not fitted) is no score.
           CAST(NULLIF(c.p_alive, 'NaN') AS numeric(6, 5)) AS p_alive,
           CAST(NULLIF(c.expected, 'NaN') AS numeric(10, 4)) AS expected_purchases_90d,
           -- Computed in double precision; the cast to numeric(14, 2) rounds to the cent
           -- (half away from zero, as round(numeric, 2) would).
           CAST(CASE WHEN :gg_ok THEN
                NULLIF(c.expected, 'NaN') * CAST(:gp AS double precision)
                * (CAST(:gv AS double precision) + k.mean_spend * k.x * CAST(k.x > 0 AS integer))
                / NULLIF(CAST(:gp AS double precision) * k.x + CAST(:gq AS double precision) - 1, 0)
                END AS numeric(14, 2)) AS expected_value
    FROM patron_churn_keys k JOIN patron_churn_predictions c ON c.combo = k.combo
"""
# One ALTER: the NOT NULL checks share one pass over the rows, the index build another.
_INDEX = """
    ALTER TABLE member_predictions_new
        ALTER COLUMN as_of SET NOT NULL,
        ADD CONSTRAINT pk_member_predictions_new PRIMARY KEY (member_id)
"""
_SWAP = (
    "DROP TABLE member_predictions",
    "ALTER TABLE member_predictions_new RENAME TO member_predictions",
    "ALTER TABLE member_predictions RENAME CONSTRAINT pk_member_predictions_new"
    " TO pk_member_predictions",
)

# The swap needs an exclusive lock on member_predictions. While it waits, every new reader
# (a purchase loading its facts) queues behind it, so it never waits long: a reader that
# holds the table for minutes (a batch campaign run, a pg_dump) makes it give up, let the
# queue drain and try again a moment later.
SWAP_LOCK_TIMEOUT = "100ms"
SWAP_ATTEMPTS = 600
SWAP_PAUSE_SECONDS = 1.0


class SwapTimeout(RuntimeError):
    """member_predictions stayed in use by other transactions for every swap attempt."""


def _prepare_keys(session: Session, as_of: date, config: ScoringConfig) -> None:
    session.execute(text("DROP TABLE IF EXISTS pg_temp.patron_churn_keys"))
    old = stats.set_local(session, {"TimeZone": config.timezone})
    session.execute(text(_KEYS), {"as_of": as_of})
    stats.set_local(session, old)
    session.execute(text("ANALYZE patron_churn_keys"))


def _copy_out(session: Session, query: str, fields: list[tuple[str, str]]) -> np.ndarray:
    """The rows of `query` (fixed-width, never NULL) as a numpy record array, by binary COPY.

    Hundreds of thousands of rows as Python objects (or as array_agg results converted to
    Python lists) cost several times the query; COPY's binary rows are read in one go.
    """
    buffer = io.BytesIO()
    cursor = session.connection().connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    cursor.copy_expert(f"COPY ({query}) TO STDOUT (FORMAT binary)", buffer)
    raw = buffer.getvalue()
    # The header (signature, flags, extension length) and its extension; -1 at the end.
    start = len(_COPY_SIGNATURE) + int.from_bytes(raw[15:19], "big")
    layout: list[tuple[str, str]] = [("_fields", ">i2")]
    for name, kind in fields:
        layout += [(f"_{name}_len", ">i4"), (name, kind)]
    dtype = np.dtype(layout)
    if (len(raw) - start - 2) % dtype.itemsize:
        raise RuntimeError(f"COPY rows of {query!r} are not {dtype.itemsize} bytes each")
    rows = np.frombuffer(raw[start:-2], dtype=dtype)
    for name, kind in fields:
        # A NULL (length -1) or another column type would shift every later row.
        if np.any(rows[f"_{name}_len"] != np.dtype(kind).itemsize):
            raise RuntimeError(f"column {name} of {query!r} is not {kind} in every row")
    return rows


def member_summary(session: Session, as_of: date, config: ScoringConfig) -> dict[str, Any]:
    """The distinct (x, t_x, T) with member counts, as arrays."""
    _prepare_keys(session, as_of, config)
    # Grouped here rather than by a GROUP BY: most of the 800k members have a combination
    # of their own (T is their age in days), and hashing that many groups in PostgreSQL
    # and shipping them as arrays took ~2x reading the keys and np.unique.
    keys = _copy_out(session, _KEY_COLUMNS, [("x", ">i4"), ("t_x", ">i4"), ("T", ">i4")])
    combo = (
        (keys["x"].astype(np.int64) << 40)
        | (keys["t_x"].astype(np.int64) << 20)
        | keys["T"].astype(np.int64)
    )
    unique, counts = np.unique(combo, return_counts=True)
    return {
        "x": (unique >> 40).astype(np.float64),
        "t_x": ((unique >> 20) & 0xFFFFF).astype(np.float64),
        "T": (unique & 0xFFFFF).astype(np.float64),
        "n": counts.astype(np.float64),
    }


def score_churn(session: Session, as_of: date, config: ScoringConfig) -> dict[str, Any]:
    """Fit the models, build the predictions and swap them in (see `build_predictions`)."""
    result = build_predictions(session, as_of, config)
    swap_predictions(session)
    return result


def build_predictions(session: Session, as_of: date, config: ScoringConfig) -> dict[str, Any]:
    """Fit BG/NBD and Gamma-Gamma on the member base and build `member_predictions_new`.

    Readers still see the previous predictions: `swap_predictions` replaces them, and should
    be the last thing before the commit (its lock is held until then). Active members with
    a purchase get a row; members without one (never bought, erased) get none.
    """
    session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _CHURN_LOCK})
    data = member_summary(session, as_of, config)
    result: dict[str, Any] = {"combinations": len(data["x"]), "members": float(data["n"].sum())}
    try:
        params = churn.fit_bgnbd(
            data["x"],
            data["t_x"],
            data["T"],
            weights=data["n"],
            initial=_previous_fit(session, as_of),
        )
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
    _load_predictions(session, data, p_alive, expected)
    session.execute(text("SET LOCAL work_mem = '128MB'"))
    session.execute(text("SET LOCAL jit = off"))
    session.execute(text("DROP TABLE IF EXISTS member_predictions_new"))
    session.execute(
        text(_BUILD),
        {
            "as_of": as_of,
            "gg_ok": gg_ok,
            "gp": gg.get("p", 1.0),
            "gq": gg.get("q", 2.0),
            "gv": gg.get("v", 1.0),
        },
    )
    session.execute(text(_INDEX))
    # Statistics before readers see it: rules compare these columns, and autovacuum would
    # only get to a new table some time later.
    session.execute(text("ANALYZE member_predictions_new"))
    session.execute(text("DROP TABLE patron_churn_keys"))
    session.execute(text("DROP TABLE patron_churn_predictions"))
    return result


def _previous_fit(session: Session, as_of: date) -> churn.BgNbdParams | None:
    """The latest earlier run's BG/NBD estimates (where the fit starts), if any."""
    fitted = session.scalar(
        text(
            "SELECT churn_params -> 'bgnbd' FROM score_runs"
            " WHERE as_of < :d AND churn_params -> 'bgnbd' ? 'r'"
            " ORDER BY as_of DESC LIMIT 1"
        ),
        {"d": as_of},
    )
    if not fitted:
        return None
    try:
        r, alpha, a, b = (float(fitted[k]) for k in ("r", "alpha", "a", "b"))
    except (KeyError, TypeError, ValueError):
        return None
    return churn.BgNbdParams(r=r, alpha=alpha, a=a, b=b)


def swap_predictions(
    session: Session,
    *,
    attempts: int = SWAP_ATTEMPTS,
    pause_seconds: float = SWAP_PAUSE_SECONDS,
) -> None:
    """Replace member_predictions by member_predictions_new (built in this transaction).

    Readers wait only from here to the commit. A plain READ COMMITTED statement that
    waited sees the new rows (it takes its snapshot after its locks). A server-side
    prepared statement (`service.db.execute_prepared`) that waited does not: EXECUTE takes
    its snapshot before re-planning, and it read the new table as empty (PostgreSQL 15).
    So no prepared statement may read member_predictions (tests/segments/
    test_churn_writeback.py checks the purchase path), nor a REPEATABLE READ transaction.
    """
    for attempt in range(attempts):
        try:
            with session.begin_nested():
                session.execute(text(f"SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT}'"))
                session.execute(text("LOCK TABLE member_predictions IN ACCESS EXCLUSIVE MODE"))
                session.execute(text("SET LOCAL lock_timeout = DEFAULT"))
                for statement in _SWAP:
                    session.execute(text(statement))
            return
        except OperationalError as exc:
            if getattr(exc.orig, "pgcode", None) != "55P03":  # lock_not_available
                raise
            log.info("member_predictions in use; swap attempt %d of %d", attempt + 1, attempts)
            time.sleep(pause_seconds)
    raise SwapTimeout(
        f"member_predictions was in use by other transactions for {attempts} attempts;"
        " the previous predictions stay"
    )


# COPY's binary format (a signature, flags and an extension length, then per row the
# number of fields and each field's length and big-endian value, then -1): the rows are
# laid out by numpy in one go instead of formatting hundreds of thousands of lines.
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
_COPY_ROW = np.dtype(
    [
        ("fields", ">i2"),
        ("combo_len", ">i4"),
        ("combo", ">i8"),
        ("p_len", ">i4"),
        ("p", ">f8"),
        ("e_len", ">i4"),
        ("e", ">f8"),
    ]
)


def _load_predictions(
    session: Session, data: dict[str, Any], p_alive: np.ndarray, expected: np.ndarray
) -> None:
    """The predictions per (x, t_x, T) into a temporary table, by binary COPY.

    Hundreds of thousands of rows as array parameters cost seconds of literal parsing and
    planning (the arrays are inlined), and the planner cannot estimate a join with them;
    COPY plus ANALYZE gives a hash join on known sizes. NaN (no fit) stays NaN here and
    becomes NULL in the build.
    """
    session.execute(text("DROP TABLE IF EXISTS pg_temp.patron_churn_predictions"))
    session.execute(
        text(
            "CREATE TEMPORARY TABLE patron_churn_predictions (combo bigint,"
            " p_alive double precision, expected double precision) ON COMMIT DROP"
        )
    )
    rows = np.empty(len(data["x"]), dtype=_COPY_ROW)
    rows["fields"] = 3
    rows["combo_len"], rows["p_len"], rows["e_len"] = 8, 8, 8
    rows["combo"] = (
        (data["x"].astype(np.int64) << 40)
        | (data["t_x"].astype(np.int64) << 20)
        | data["T"].astype(np.int64)
    )
    rows["p"], rows["e"] = p_alive, expected
    buffer = io.BytesIO(_COPY_SIGNATURE + rows.tobytes() + b"\xff\xff")
    cursor = session.connection().connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    cursor.copy_expert("COPY patron_churn_predictions FROM STDIN (FORMAT binary)", buffer)
    session.execute(text("ANALYZE patron_churn_predictions"))


def _fit_spend(session: Session, as_of: date, config: ScoringConfig) -> dict[str, Any]:
    rows = _copy_out(session, _SPEND_COLUMNS, [("x", ">i4"), ("m", ">f8")])
    if not len(rows):
        return {"error": "no members with repeat purchases"}
    pairs, n = np.unique(
        np.column_stack([rows["x"].astype(np.float64), rows["m"]]), axis=0, return_counts=True
    )
    x, m = pairs[:, 0], pairs[:, 1]
    try:
        gg = churn.fit_gamma_gamma(x, m, weights=n.astype(np.float64))
    except (ValueError, FloatingPointError) as exc:
        log.warning("Gamma-Gamma not fitted: %s", exc)
        return {"error": str(exc)}
    return {"p": gg.p, "q": gg.q, "v": gg.v, "converged": gg.converged}
