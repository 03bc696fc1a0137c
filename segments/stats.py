"""Member statistics kept fresh: rolling windows, their daily ageing, and full rebuilds.

A window of N days as of date D counts purchases made since local midnight of day
D - N + 1 in the business time zone (with no upper bound, so a purchase made while
the windows are as of D is counted at once). Spend is the purchase amount net of what
has been refunded on those purchases, so a refund lowers the windows that hold its
original purchase. Three paths keep the same numbers:

- each purchase / refund adds itself (`PURCHASE_WINDOW_*` fragments, `apply_*`),
- the daily step moves D forward and subtracts only what left each window that day,
- `rebuild_windows` recomputes them from transactions (set-based, any member subset).

The window starts live in the one-row `stats_windows` table, which the purchase path
reads in the same statement.
"""

# SQL here is assembled from this module's constants only; every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, CursorResult, Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from segments.config import ScoringConfig

WINDOWS = (30, 90, 365)
# Members whose statistics row changed less than this long before the previous refresh
# started are re-summarised too: a purchase transaction that began before the refresh
# (its updated_at is its start time) may have committed after the refresh read the table.
HISTORY_MARGIN = timedelta(hours=1)

Bind = Session | Connection


@dataclass(frozen=True)
class WindowState:
    """The date the windows are as of, and where each window starts."""

    as_of: date
    timezone: str
    starts: dict[int, datetime]


def window_starts(as_of: date, timezone: str) -> dict[int, datetime]:
    """Local midnight of day as_of - N + 1, for each window length N."""
    zone = ZoneInfo(timezone)
    return {
        n: datetime.combine(as_of - timedelta(days=n - 1), time(0), tzinfo=zone) for n in WINDOWS
    }


def local_today(timezone: str, now: datetime | None = None) -> date:
    """Today's date in the business time zone."""
    zone = ZoneInfo(timezone)
    return (now or datetime.now(zone)).astimezone(zone).date()


def current_state(bind: Bind, *, lock: bool = False) -> WindowState | None:
    """The stored window state (None before the first refresh); `lock` serialises refreshes."""
    row = bind.execute(
        text(
            "SELECT as_of, timezone, start_30d, start_90d, start_365d FROM stats_windows"
            " WHERE id = 1" + (" FOR UPDATE" if lock else "")
        )
    ).first()
    if row is None:
        return None
    return WindowState(row.as_of, row.timezone, dict(zip(WINDOWS, row[2:], strict=True)))


def _save_state(bind: Bind, as_of: date, timezone: str) -> WindowState:
    starts = window_starts(as_of, timezone)
    bind.execute(
        text(
            "INSERT INTO stats_windows (id, as_of, timezone, start_30d, start_90d, start_365d,"
            " updated_at) VALUES (1, :as_of, :tz, :s30, :s90, :s365, now())"
            " ON CONFLICT (id) DO UPDATE SET as_of = EXCLUDED.as_of, timezone = EXCLUDED.timezone,"
            " start_30d = EXCLUDED.start_30d, start_90d = EXCLUDED.start_90d,"
            " start_365d = EXCLUDED.start_365d, updated_at = now()"
        ),
        {"as_of": as_of, "tz": timezone, "s30": starts[30], "s90": starts[90], "s365": starts[365]},
    )
    return WindowState(as_of, timezone, starts)


# --- the purchase path ------------------------------------------------------------------
#
# For the member_stats upsert of a purchase (service.events): add the columns, the values
# (from `tx LEFT JOIN stats_windows w ON w.id = 1`) and the update. Before the first
# refresh there is no window state and everything counts; that refresh rebuilds anyway.

_WINDOW_COLUMNS = "purchases_30d, purchases_90d, purchases_365d, spend_30d, spend_90d, spend_365d"
# The windows plus the member's sorted distinct local purchase days (purchase_dates).
PURCHASE_WINDOW_COLUMNS = f"{_WINDOW_COLUMNS}, purchase_dates"
# Before the first refresh there is no window state yet: fall back to "the last N days
# from now", which the first refresh or rebuild then aligns to local midnight.
_IN = "(CAST(:occurred_at AS timestamptz) >= COALESCE(w.start_{n}d, now() - interval '{n} days'))"
# The purchase's local day in the windows' time zone; without a window state the day is
# not known (NULL array), and the first refresh reads it from the transactions.
_PURCHASE_DATE = (
    "CASE WHEN w.timezone IS NOT NULL"
    " THEN ARRAY[CAST(timezone(w.timezone, CAST(:occurred_at AS timestamptz)) AS date)] END"
)
PURCHASE_WINDOW_VALUES = ", ".join(
    [f"CAST({_IN.format(n=n)} AS integer)" for n in WINDOWS]
    + [f"CASE WHEN {_IN.format(n=n)} THEN CAST(:amount AS numeric) ELSE 0 END" for n in WINDOWS]
    + [_PURCHASE_DATE]
)
PURCHASE_WINDOW_FROM = "LEFT JOIN stats_windows w ON w.id = 1"
# Adding a day to the sorted array: usually the newest day (append) or one already there;
# a back-dated purchase is merged in order. Unknown on either side stays unknown.
PURCHASE_DATES_MERGE = """CASE
        WHEN ms.purchase_dates IS NULL OR EXCLUDED.purchase_dates IS NULL THEN NULL
        WHEN EXCLUDED.purchase_dates[1] > ms.purchase_dates[cardinality(ms.purchase_dates)]
            THEN ms.purchase_dates || EXCLUDED.purchase_dates
        WHEN EXCLUDED.purchase_dates[1] = ANY(ms.purchase_dates) THEN ms.purchase_dates
        ELSE ARRAY(SELECT DISTINCT u.d FROM unnest(ms.purchase_dates || EXCLUDED.purchase_dates)
                   AS u(d) ORDER BY u.d)
    END"""
PURCHASE_WINDOW_UPDATE = ", ".join(
    [f"{c} = ms.{c} + EXCLUDED.{c}" for c in _WINDOW_COLUMNS.split(", ")]
    + [f"purchase_dates = {PURCHASE_DATES_MERGE}"]
)
PURCHASE_WINDOW_RETURNING = _WINDOW_COLUMNS

_APPLY_PURCHASE = text(
    f"""
    INSERT INTO member_stats AS ms (member_id, first_purchase_at, last_purchase_at,
                                    purchase_count, purchase_amount, net_spend, updated_at,
                                    {PURCHASE_WINDOW_COLUMNS})
    SELECT CAST(:member_id AS bigint), :occurred_at, :occurred_at, 1, :amount, :amount, now(),
           {PURCHASE_WINDOW_VALUES}
    FROM (SELECT 1) AS one {PURCHASE_WINDOW_FROM}
    ON CONFLICT (member_id) DO UPDATE SET
        first_purchase_at = LEAST(ms.first_purchase_at, EXCLUDED.first_purchase_at),
        last_purchase_at = GREATEST(ms.last_purchase_at, EXCLUDED.last_purchase_at),
        purchase_count = ms.purchase_count + 1,
        purchase_amount = ms.purchase_amount + EXCLUDED.purchase_amount,
        net_spend = ms.net_spend + EXCLUDED.net_spend,
        updated_at = now(),
        {PURCHASE_WINDOW_UPDATE}
    """
)

# A refund lowers the spend of the windows holding its original purchase.
REFUND_WINDOW_UPDATE = text(
    """
    UPDATE member_stats ms SET
        spend_30d = ms.spend_30d
            - CASE WHEN w.start_30d IS NULL OR t.occurred_at >= w.start_30d
                   THEN CAST(:amount AS numeric) ELSE 0 END,
        spend_90d = ms.spend_90d
            - CASE WHEN w.start_90d IS NULL OR t.occurred_at >= w.start_90d
                   THEN CAST(:amount AS numeric) ELSE 0 END,
        spend_365d = ms.spend_365d
            - CASE WHEN w.start_365d IS NULL OR t.occurred_at >= w.start_365d
                   THEN CAST(:amount AS numeric) ELSE 0 END
    FROM transactions t LEFT JOIN stats_windows w ON w.id = 1
    WHERE t.id = :original_id AND ms.member_id = t.member_id
    """
)


def apply_purchase(bind: Bind, member_id: int, occurred_at: datetime, amount: Decimal) -> None:
    """Add one purchase to a member's statistics, windows included (the events path's SQL)."""
    bind.execute(
        _APPLY_PURCHASE, {"member_id": member_id, "occurred_at": occurred_at, "amount": amount}
    )


def apply_refund_to_windows(bind: Bind, original_id: int, amount: Decimal) -> None:
    """Lower the window spend of a refunded purchase (after refunded_amount is raised)."""
    bind.execute(REFUND_WINDOW_UPDATE, {"original_id": original_id, "amount": amount})


# --- daily ageing -------------------------------------------------------------------------

# One branch per window, each reading one range of the occurred_at index alone (it
# INCLUDEs these columns, migration 0007): an OR of the ranges would be a bitmap scan,
# which visits the heap page of every purchase. A purchase in two ranges (ageing by more
# than 60 days at once) is counted once in each window, as it should be.
_LEFT = """
        SELECT {n} AS w, member_id, amount - refunded_amount AS net FROM transactions
        WHERE occurred_at >= :old{n} AND occurred_at < :new{n} AND kind = 'purchase'"""
_AGE = text(
    f"""
    UPDATE member_stats ms SET
        {", ".join(f"purchases_{n}d = ms.purchases_{n}d - l.c{n}" for n in WINDOWS)},
        {", ".join(f"spend_{n}d = ms.spend_{n}d - l.s{n}" for n in WINDOWS)}
    FROM (
        SELECT member_id,
               {", ".join(f"count(*) FILTER (WHERE w = {n}) AS c{n}" for n in WINDOWS)},
               {", ".join(f"COALESCE(sum(net) FILTER (WHERE w = {n}), 0) AS s{n}" for n in WINDOWS)}
        FROM ({" UNION ALL ".join(_LEFT.format(n=n) for n in WINDOWS)}) t
        GROUP BY member_id
    ) l
    WHERE ms.member_id = l.member_id
    """
)


def age_windows(bind: Bind, as_of: date, timezone: str) -> dict[str, Any]:
    """Move the windows to `as_of`, subtracting only the purchases that left each window.

    Idempotent: a second call for the same date changes nothing. Without a state, with a
    changed time zone or when going back in time, the windows are rebuilt instead.
    """
    state = current_state(bind, lock=True)
    if state is not None and state.as_of == as_of and state.timezone == timezone:
        return {"mode": "unchanged", "members": 0}
    if state is None or state.timezone != timezone or as_of < state.as_of:
        return {"mode": "rebuilt", "members": rebuild_windows(bind, as_of, timezone=timezone)}
    new = window_starts(as_of, timezone)
    # The members of three days of purchases (~80k at 1M members) hashed in one batch.
    bind.execute(text("SET LOCAL work_mem = '64MB'"))
    bind.execute(text("SET LOCAL jit = off"))
    params: dict[str, Any] = {}
    for n in WINDOWS:
        params[f"old{n}"], params[f"new{n}"] = state.starts[n], new[n]
    result = cast(CursorResult[Any], bind.execute(_AGE, params))
    _save_state(bind, as_of, timezone)
    return {"mode": "aged", "members": result.rowcount, "days": (as_of - state.as_of).days}


# --- rebuild from transactions ------------------------------------------------------------

_LOCAL_DAY = "CAST(timezone(:tz, occurred_at) AS date)"

# Windows for the chosen members (all when :ids is NULL), from their purchases.
_WINDOW_AGG = f"""
    SELECT member_id,
           {
    ", ".join(f"count(*) FILTER (WHERE occurred_at >= :s{n}) AS purchases_{n}d" for n in WINDOWS)
},
           {
    ", ".join(
        f"COALESCE(sum(amount - refunded_amount) FILTER (WHERE occurred_at >= :s{n}), 0)"
        f" AS spend_{n}d"
        for n in WINDOWS
    )
}
    FROM transactions
    WHERE kind = 'purchase'
      AND (CAST(:ids AS bigint[]) IS NULL OR member_id = ANY(CAST(:ids AS bigint[])))
      AND occurred_at >= :s365
    GROUP BY member_id
"""

# Distinct local purchase days (sorted, and their number) and the median gap between
# consecutive ones.
_HISTORY_AGG = f"""
    SELECT member_id, count(*) AS purchase_days,
           CAST(percentile_cont(0.5) WITHIN GROUP (ORDER BY gap) AS numeric(8, 1))
               AS median_interpurchase_days,
           array_agg(day ORDER BY day) AS purchase_dates
    FROM (
        SELECT member_id, day, day - lag(day) OVER (PARTITION BY member_id ORDER BY day) AS gap
        FROM (
            SELECT DISTINCT member_id, {_LOCAL_DAY} AS day
            FROM {{source}}
            WHERE kind = 'purchase'
        ) d
    ) g
    GROUP BY member_id
"""

_COLUMNS = [f"purchases_{n}d" for n in WINDOWS] + [f"spend_{n}d" for n in WINDOWS]

_REBUILD_WINDOWS = text(
    f"""
    UPDATE member_stats ms SET
        {", ".join(f"{c} = COALESCE(w.{c}, 0)" for c in _COLUMNS)}
    FROM member_stats s LEFT JOIN ({_WINDOW_AGG}) w USING (member_id)
    WHERE ms.member_id = s.member_id
      AND (CAST(:ids AS bigint[]) IS NULL OR s.member_id = ANY(CAST(:ids AS bigint[])))
      AND ({" OR ".join(f"ms.{c} IS DISTINCT FROM COALESCE(w.{c}, 0)" for c in _COLUMNS)})
    """
)

_HISTORY_SET = """
    UPDATE member_stats ms SET
        purchase_days = COALESCE(h.purchase_days, 0),
        median_interpurchase_days = h.median_interpurchase_days,
        purchase_dates = COALESCE(h.purchase_dates, '{{}}')
    FROM member_stats s LEFT JOIN ({agg}) h USING (member_id)
    WHERE ms.member_id = s.member_id AND ({targets})
      AND (ms.purchase_days IS DISTINCT FROM COALESCE(h.purchase_days, 0)
           OR ms.median_interpurchase_days IS DISTINCT FROM h.median_interpurchase_days
           OR ms.purchase_dates IS DISTINCT FROM COALESCE(h.purchase_dates, '{{}}'))
"""
_HISTORY_ALL = text(
    _HISTORY_SET.format(agg=_HISTORY_AGG.format(source="transactions"), targets="true")
)
# For a subset, each member's purchases are read through the (member_id, occurred_at)
# index by a LATERAL subquery (a plain join let the planner hash all 20M transactions for
# 20,000 members: 37 s instead of well under one). They come out in time order, so the gap
# to the previous purchase's local day is a `lag` with no DISTINCT and no sort.
_HISTORY_OF_IDS = text(
    _HISTORY_SET.format(
        agg=f"""
            SELECT d.member_id, h.purchase_days, h.median_interpurchase_days, h.purchase_dates
            FROM unnest(CAST(:ids AS bigint[])) AS d(member_id)
            CROSS JOIN LATERAL (
                SELECT count(*) FILTER (WHERE gap IS NULL OR gap > 0) AS purchase_days,
                       CAST(percentile_cont(0.5) WITHIN GROUP (ORDER BY gap)
                            FILTER (WHERE gap > 0) AS numeric(8, 1)) AS median_interpurchase_days,
                       array_agg(day ORDER BY at) FILTER (WHERE gap IS NULL OR gap > 0)
                           AS purchase_dates
                FROM (
                    SELECT t.occurred_at AS at, {_LOCAL_DAY} AS day,
                           {_LOCAL_DAY} - lag({_LOCAL_DAY}) OVER (ORDER BY t.occurred_at) AS gap
                    FROM transactions t
                    WHERE t.member_id = d.member_id AND t.kind = 'purchase'
                ) g
            ) h
        """,
        targets="s.member_id = ANY(CAST(:ids AS bigint[]))",
    )
)


# Every member at once, in one pass: purchases in (member, time) order — the order of the
# (member_id, occurred_at) index, so no sort — give the windows and, from the gap to the
# previous purchase's local day, the distinct purchase days (gap NULL or > 0) and the median
# gap between consecutive purchase days (the positive gaps). Each row is written once.
_REBUILD_ALL = text(
    f"""
    WITH written AS (
    UPDATE member_stats ms SET
        {", ".join(f"{c} = COALESCE(a.{c}, 0)" for c in _COLUMNS)},
        purchase_days = COALESCE(a.purchase_days, 0),
        median_interpurchase_days = a.median_interpurchase_days,
        purchase_dates = COALESCE(a.purchase_dates, '{{}}')
    FROM member_stats s LEFT JOIN (
        SELECT member_id,
               {
        ", ".join(
            f"count(*) FILTER (WHERE occurred_at >= :s{n}) AS purchases_{n}d" for n in WINDOWS
        )
    },
               {
        ", ".join(
            f"COALESCE(sum(amount - refunded_amount) FILTER (WHERE occurred_at >= :s{n}), 0)"
            f" AS spend_{n}d"
            for n in WINDOWS
        )
    },
               count(*) FILTER (WHERE gap IS NULL OR gap > 0) AS purchase_days,
               CAST(percentile_cont(0.5) WITHIN GROUP (ORDER BY gap) FILTER (WHERE gap > 0)
                    AS numeric(8, 1)) AS median_interpurchase_days,
               array_agg(day ORDER BY occurred_at) FILTER (WHERE gap IS NULL OR gap > 0)
                   AS purchase_dates
        FROM (
            SELECT member_id, occurred_at, amount, refunded_amount, {_LOCAL_DAY} AS day,
                   {_LOCAL_DAY} - lag({_LOCAL_DAY})
                       OVER (PARTITION BY member_id ORDER BY occurred_at) AS gap
            FROM transactions
            WHERE kind = 'purchase'
        ) p
        GROUP BY member_id
    ) a USING (member_id)
    WHERE ms.member_id = s.member_id
      AND ({" OR ".join(f"ms.{c} IS DISTINCT FROM COALESCE(a.{c}, 0)" for c in _COLUMNS)}
           OR ms.purchase_days IS DISTINCT FROM COALESCE(a.purchase_days, 0)
           OR ms.median_interpurchase_days IS DISTINCT FROM a.median_interpurchase_days
           OR ms.purchase_dates IS DISTINCT FROM COALESCE(a.purchase_dates, '{{}}'))
    RETURNING ({" OR ".join(f"s.{c} IS DISTINCT FROM COALESCE(a.{c}, 0)" for c in _COLUMNS)})
        AS windows_changed,
        (s.purchase_days IS DISTINCT FROM COALESCE(a.purchase_days, 0)
         OR s.median_interpurchase_days IS DISTINCT FROM a.median_interpurchase_days
         OR s.purchase_dates IS DISTINCT FROM COALESCE(a.purchase_dates, '{{}}'))
        AS history_changed
    )
    SELECT count(*) FILTER (WHERE windows_changed), count(*) FILTER (WHERE history_changed)
    FROM written
    """
)


def _rebuild_all(bind: Bind, params: dict[str, Any]) -> tuple[int, int]:
    """The one-pass rebuild; (rows whose windows changed, rows whose history changed)."""
    windows, history = bind.execute(_REBUILD_ALL, params).one()
    return int(windows), int(history)


def _history(bind: Bind, ids: list[int] | None, timezone: str) -> int:
    statement = _HISTORY_ALL if ids is None else _HISTORY_OF_IDS
    result = bind.execute(statement, {"ids": ids, "tz": timezone})
    return int(cast(CursorResult[Any], result).rowcount)


# Above this share of changed members one pass over all transactions beats index lookups.
FULL_HISTORY_SHARE = 0.1


def _stats_rows(bind: Bind) -> int:
    # The planner's estimate is enough to choose a plan shape (and costs nothing).
    rows = bind.scalar(text("SELECT reltuples FROM pg_class WHERE oid = 'member_stats'::regclass"))
    return max(int(rows or 0), 0)


def _ids(member_ids: Iterable[int] | None) -> list[int] | None:
    return None if member_ids is None else sorted({int(i) for i in member_ids})


def rebuild_windows(
    bind: Bind,
    as_of: date | None = None,
    member_ids: Iterable[int] | None = None,
    *,
    timezone: str | None = None,
) -> int:
    """Recompute windows, purchase days and median gaps from transactions; returns rows changed.

    For all members this also (re)sets the window state to `as_of` (default: the stored
    date, else today). For a subset of members (e.g. after an import) `as_of` must be the
    stored date or omitted, since the other members' windows stay as they are.
    """
    state = current_state(bind, lock=True)
    tz = timezone or (state.timezone if state else ScoringConfig.from_env().timezone)
    ids = _ids(member_ids)
    if as_of is None:
        as_of = state.as_of if state else local_today(tz)
    if ids is not None and state is not None and (state.as_of != as_of or state.timezone != tz):
        raise ValueError(
            f"windows are as of {state.as_of} ({state.timezone}); a partial rebuild must use that"
        )
    if ids is None or state is None:
        _save_state(bind, as_of, tz)
    starts = window_starts(as_of, tz)
    params: dict[str, Any] = {"ids": ids, "tz": tz}
    params.update({f"s{n}": starts[n] for n in WINDOWS})
    if ids is not None and len(ids) > FULL_HISTORY_SHARE * _stats_rows(bind) > 0:
        # Most members (a big import): one ordered pass beats index lookups per member, and
        # it writes only rows that differ, so the members outside the subset stay as they are.
        ids = None
    if ids is None:
        # Like the subset path, the count is of rows whose windows changed.
        return _rebuild_all(bind, params)[0]
    changed = cast(CursorResult[Any], bind.execute(_REBUILD_WINDOWS, params)).rowcount
    _history(bind, ids, tz)
    return int(changed)


# The two summaries from the stored days, for members changed since :since whose days are
# known: no transaction is read (the purchase path added each purchase's day).
_MEDIAN_OF_DATES = """(
    SELECT CAST(percentile_cont(0.5)
                    WITHIN GROUP (ORDER BY purchase_dates[i + 1] - purchase_dates[i])
                AS numeric(8, 1))
    FROM generate_series(1, cardinality(purchase_dates) - 1) AS i)"""
_HISTORY_FROM_DATES = text(
    f"""
    UPDATE member_stats SET
        purchase_days = cardinality(purchase_dates),
        median_interpurchase_days = {_MEDIAN_OF_DATES}
    WHERE updated_at >= :since AND purchase_dates IS NOT NULL
      AND (purchase_days IS DISTINCT FROM cardinality(purchase_dates)
           OR median_interpurchase_days IS DISTINCT FROM {_MEDIAN_OF_DATES})
    """
)


def refresh_history(bind: Bind, since: datetime | None, timezone: str) -> int:
    """Re-summarise purchase days and median gaps of members changed since `since`.

    Members whose purchase days are stored (`purchase_dates`, kept by the purchase path)
    are summarised from them; the others (days not known yet) from their transactions,
    which also stores their days.
    """
    state = current_state(bind)
    ids: list[int] | None = None
    written = 0
    if since is not None:
        since = since - HISTORY_MARGIN
        row = bind.execute(
            text(
                "SELECT array_agg(member_id) FILTER (WHERE updated_at >= :since"
                "  AND purchase_dates IS NULL), count(*) FROM member_stats"
            ),
            {"since": since},
        ).one()
        unknown, total = row[0] or [], row[1]
        # Stored days are in the windows' time zone: another zone means reading them again.
        if state is not None and state.timezone == timezone:
            result = bind.execute(_HISTORY_FROM_DATES, {"since": since})
            written = int(cast(CursorResult[Any], result).rowcount)
        else:
            unknown = bind.scalars(
                text("SELECT member_id FROM member_stats WHERE updated_at >= :since"),
                {"since": since},
            ).all()
        if not unknown:
            return written
        # The ids go in as an array so each member's purchases are read through the
        # (member_id, occurred_at) index instead of one pass over every transaction.
        ids = list(unknown) if len(unknown) <= FULL_HISTORY_SHARE * total else None
    if ids is None and state is not None and state.timezone == timezone:
        # Everyone (or most): the one ordered pass of the full rebuild is the cheapest way,
        # and it writes only rows that differ (windows already right stay untouched).
        params: dict[str, Any] = {"tz": timezone}
        params.update({f"s{n}": state.starts[n] for n in WINDOWS})
        return written + _rebuild_all(bind, params)[1]
    return written + _history(bind, ids, timezone)


# --- full rebuild of every column -----------------------------------------------------------
#
# Each transaction row carries `p` (a purchase: ck_transactions_kind allows only purchases
# and refunds, so NOT p is a refund) and its local `day`; one GROUP BY member gives the
# lifetime figures, the windows and the member's distinct purchase days as a sorted array,
# whose length is purchase_days and whose consecutive differences give the median gap.
# (A running max of the previous purchase day over a window cost more than everything
# else: a WindowAgg copies every row through a tuplestore.) `p` is compared once per row
# instead of once per aggregate, and net_spend is derived from the two sums.
_EVERYTHING = {
    # The importer's lifetime definitions (service.importer._REBUILD); tests hold them equal.
    "first_purchase_at": "min(occurred_at) FILTER (WHERE p)",
    "last_purchase_at": "max(occurred_at) FILTER (WHERE p)",
    "purchase_count": "count(*) FILTER (WHERE p)",
    "purchase_amount": "COALESCE(sum(amount) FILTER (WHERE p), 0)",
    "refund_count": "count(*) FILTER (WHERE NOT p)",
    "refund_amount": "COALESCE(sum(amount) FILTER (WHERE NOT p), 0)",
    **{f"purchases_{n}d": f"count(*) FILTER (WHERE p AND occurred_at >= :s{n})" for n in WINDOWS},
    **{
        f"spend_{n}d": f"COALESCE(sum(amount - refunded_amount)"
        f" FILTER (WHERE p AND occurred_at >= :s{n}), 0)"
        for n in WINDOWS
    },
}
_ALL = [*_EVERYTHING, "net_spend", "purchase_days", "median_interpurchase_days", "purchase_dates"]

# The aggregate for the members matching {members}. The local day is a plain cast under the
# business time zone set as the statement's TimeZone (_settings): timezone(:tz, …) looks the
# zone up by name for every row, which made it the costliest per-row step.
_AGGREGATE = f"""
    SELECT member_id, {", ".join(_EVERYTHING)}, purchase_amount - refund_amount AS net_spend,
           COALESCE(cardinality(days), 0) AS purchase_days,
           (SELECT CAST(percentile_cont(0.5) WITHIN GROUP (ORDER BY days[i + 1] - days[i])
                        AS numeric(8, 1))
            FROM generate_series(1, cardinality(days) - 1) AS i) AS median_interpurchase_days,
           -- (doubled braces: this text is formatted twice, as an f-string and by .format)
           COALESCE(days, '{{{{}}}}') AS purchase_dates
    FROM (
        SELECT member_id, {", ".join(f"{v} AS {k}" for k, v in _EVERYTHING.items())},
               array_agg(DISTINCT day ORDER BY day) FILTER (WHERE p) AS days
        FROM (
            SELECT member_id, kind = 'purchase' AS p, occurred_at, amount, refunded_amount,
                   CAST(occurred_at AS date) AS day
            FROM transactions
            WHERE {{members}}
        ) d
        GROUP BY member_id
    ) a
"""

# Write the aggregated {rows}: only rows where a value differs, and members left without
# any transaction lose their row (as the importer's rebuild does).
_WRITE = f"""
    WITH {{agg}} gone AS (
        DELETE FROM member_stats ms
        WHERE NOT EXISTS (SELECT 1 FROM {{rows}} r WHERE r.member_id = ms.member_id)
    )
    INSERT INTO member_stats AS ms (member_id, updated_at, {", ".join(_ALL)})
    SELECT member_id, now(), {", ".join(_ALL)} FROM {{rows}} r
    ON CONFLICT (member_id) DO UPDATE SET
        updated_at = now(), {", ".join(f"{k} = EXCLUDED.{k}" for k in _ALL)}
    WHERE ({", ".join(f"ms.{k}" for k in _ALL)})
          IS DISTINCT FROM ({", ".join(f"EXCLUDED.{k}" for k in _ALL)})
"""

# Everything in one statement: one pass over all transactions, then the write.
_REBUILD_EVERYTHING = text(
    _WRITE.format(agg=f"agg AS MATERIALIZED ({_AGGREGATE.format(members='true')}),", rows="agg")
)

# The split rebuild: each part aggregates one member_id range into a table of its own.
# UNLOGGED: the tables live for one rebuild, so they need no WAL.
REBUILD_PARTS = 2
SCRATCH_PREFIX = "patron_rebuild_part_"
_PART = f"CREATE UNLOGGED TABLE {{table}} WITH (autovacuum_enabled = false) AS {_AGGREGATE}"
# Above this correlation between member_id and heap order (e.g. after a bulk import) the
# transactions are read through the (member_id, occurred_at) index, which then visits the
# heap in order: the planner prices that far above a full scan plus a sort, which in each
# part reads the whole table and sorts its range (1M members / 20M transactions,
# correlation 0.99, two halves side by side: 9-10 s of CPU each against 11.5-14 s).
ORDERED_HEAP = 0.9


def set_local(bind: Bind, settings: dict[str, str]) -> dict[str, str]:
    """Set each setting for the rest of this transaction; returns the values to set back.

    (An error aborts the transaction, which sets them back by itself.)
    """
    old: dict[str, str] = {}
    for name, value in settings.items():
        old[name] = str(bind.scalar(text("SELECT current_setting(:name)"), {"name": name}))
        bind.execute(text("SELECT set_config(:name, :value, true)"), {"name": name, "value": value})
    return old


def _settings(bind: Bind, tz: str) -> dict[str, str]:
    """The aggregate's settings: local days under `tz`, and the index when the heap is in order.

    CAST(timestamptz AS date) is the local day under the TimeZone setting (_AGGREGATE).
    """
    correlation = bind.scalar(
        text(
            "SELECT correlation FROM pg_stats WHERE schemaname = current_schema()"
            " AND tablename = 'transactions' AND attname = 'member_id'"
        )
    )
    ordered = correlation is not None and abs(correlation) >= ORDERED_HEAP
    return {"TimeZone": tz, **({"enable_sort": "off"} if ordered else {})}


def _engine(bind: Bind) -> Engine:
    target = bind.get_bind() if isinstance(bind, Session) else bind
    return target.engine


def _connection(bind: Bind) -> Connection:
    return bind.connection() if isinstance(bind, Session) else bind


def _can_split(bind: Bind) -> bool:
    """Can other connections read exactly what this transaction reads?

    An exported snapshot carries no uncommitted writes of the exporting transaction (so it
    must have written nothing yet) and cannot be exported from a subtransaction.
    """
    if _connection(bind).in_nested_transaction():
        return False
    return bool(bind.scalar(text("SELECT pg_current_xact_id_if_assigned() IS NULL")))


def _ranges(bind: Bind, parts: int) -> list[tuple[int | None, int | None]]:
    """member_id ranges holding about equal numbers of transactions."""
    bounds = bind.scalar(
        text(
            "SELECT CAST(CAST(histogram_bounds AS text) AS bigint[]) FROM pg_stats"
            " WHERE schemaname = current_schema() AND tablename = 'transactions'"
            " AND attname = 'member_id'"
        )
    )
    if bounds and len(bounds) > parts:
        # Equal-frequency buckets: the i-th cut is the i/parts quantile.
        cuts = [bounds[round(i * (len(bounds) - 1) / parts)] for i in range(1, parts)]
    else:
        low, high = bind.execute(
            text("SELECT min(member_id), max(member_id) FROM transactions")
        ).one()
        if low is None:
            return [(None, None)]
        cuts = [low + (high - low + 1) * i // parts for i in range(1, parts)]
    edges: list[int | None] = [None, *sorted(set(cuts)), None]
    return list(itertools.pairwise(edges))


def _compute_part(
    engine: Engine,
    snapshot: str,
    table: str,
    members: tuple[int | None, int | None],
    params: dict[str, Any],
    settings: dict[str, str],
) -> None:
    """Aggregate one member range, as of the exported snapshot, into `table` (committed)."""
    lo, hi = members
    where = " AND ".join(
        [
            *(["member_id >= :lo"] if lo is not None else []),
            *(["member_id < :hi"] if hi is not None else []),
        ]
    )
    statement = text(_PART.format(table=f'"{table}"', members=where or "true"))
    with engine.connect() as conn:
        # A liveness check on checkout may have begun a transaction; this one must be new.
        conn.connection.driver_connection.rollback()  # type: ignore[union-attr]
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.exec_driver_sql("SET TRANSACTION SNAPSHOT %(s)s", {"s": snapshot})
        for name, value in settings.items():
            conn.execute(
                text("SELECT set_config(:name, :value, true)"), {"name": name, "value": value}
            )
        conn.execute(statement, {**params, "lo": lo, "hi": hi})
        conn.commit()


def _quoted(tables: Iterable[str]) -> str:
    # The names are SCRATCH_PREFIX plus hex digits: quoting is all they need.
    return ", ".join(f'"{t}"' for t in tables)


def _drop_tables(engine: Engine, tables: Iterable[str]) -> None:
    """Drop scratch tables from a connection of their own (best effort: never blocks long)."""
    names = _quoted(tables)
    if not names:
        return
    try:
        with engine.connect() as conn:
            conn.connection.driver_connection.rollback()  # type: ignore[union-attr]
            conn.exec_driver_sql("SET LOCAL lock_timeout = '5s'")
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {names}")
            conn.commit()
    except DBAPIError:
        pass  # left for the next split rebuild to drop


def _rebuild_in_parts(bind: Bind, params: dict[str, Any], parts: int) -> int:
    """The rebuild with the aggregate computed by `parts` connections side by side.

    An aggregate with DISTINCT / ORDER BY has no partial form, so PostgreSQL computes it in
    one process; here each part is one member_id range aggregated by its own connection
    (from the engine's pool, which needs room for them) into an UNLOGGED table. All parts
    import this transaction's snapshot, so they read exactly the transactions the
    one-statement rebuild would; the write stays in this transaction, which drops the
    tables. On failure the tables are dropped from another connection; a table left over
    (this transaction rolled back after the rebuild) is dropped by the next one.
    """
    engine = _engine(bind)
    # Whoever holds the window state lock runs the only rebuild: every scratch table
    # still there belongs to a rebuild whose transaction rolled back.
    _drop_tables(
        engine,
        bind.scalars(
            text(
                "SELECT relname FROM pg_class WHERE relkind = 'r' AND relname LIKE :prefix"
                " AND relnamespace = CAST(current_schema() AS regnamespace)"
            ),
            {"prefix": SCRATCH_PREFIX.replace("_", r"\_") + "%"},
        ).all(),
    )
    ranges = _ranges(bind, parts)
    settings = {
        **_settings(bind, params["tz"]),
        "work_mem": str(bind.scalar(text("SELECT current_setting('work_mem')"))),
        # The parts are the parallelism; parallel workers would only compete with them.
        "max_parallel_workers_per_gather": "0",
    }
    snapshot = str(bind.scalar(text("SELECT pg_export_snapshot()")))
    token = uuid.uuid4().hex
    tables = [f"{SCRATCH_PREFIX}{token}_{i}" for i in range(len(ranges))]
    with ThreadPoolExecutor(max_workers=len(ranges)) as pool:
        futures = [
            pool.submit(_compute_part, engine, snapshot, table, members, params, settings)
            for table, members in zip(tables, ranges, strict=True)
        ]
        errors = [e for e in (f.exception() for f in futures) if e is not None]
    if errors:
        _drop_tables(engine, tables)
        raise errors[0]
    rows = " UNION ALL ".join(f'SELECT * FROM "{t}"' for t in tables)
    # In a savepoint: rolling it back releases this transaction's locks on the tables, so
    # another connection can drop them.
    savepoint = bind.begin_nested()
    try:
        result = bind.execute(text(_WRITE.format(agg="", rows=f"({rows})")))
        bind.execute(text(f"DROP TABLE {_quoted(tables)}"))
        savepoint.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            savepoint.rollback()
        _drop_tables(engine, tables)
        raise
    return int(cast(CursorResult[Any], result).rowcount)


def rebuild_all_stats(
    bind: Bind,
    as_of: date | None = None,
    *,
    timezone: str | None = None,
    parts: int = REBUILD_PARTS,
) -> int:
    """Recompute every member_stats column from transactions (lifetime, windows, history).

    One pass over the transactions grouped by member (see _AGGREGATE); returns the rows
    written. The window state is (re)set to `as_of` (default: the stored date, else today).
    With `parts` > 1, in a transaction that has written nothing yet and is not in a
    savepoint, `parts` more connections from the engine's pool compute the aggregate side
    by side (_rebuild_in_parts); otherwise it is one statement.
    """
    split = parts > 1 and _can_split(bind)
    state = current_state(bind, lock=True)
    tz = timezone or (state.timezone if state else ScoringConfig.from_env().timezone)
    if as_of is None:
        as_of = state.as_of if state else local_today(tz)
    _save_state(bind, as_of, tz)
    params: dict[str, Any] = {"tz": tz}
    params.update({f"s{n}": start for n, start in window_starts(as_of, tz).items()})
    if split:
        return _rebuild_in_parts(bind, params, parts)
    old = set_local(bind, _settings(bind, tz))
    written = cast(CursorResult[Any], bind.execute(_REBUILD_EVERYTHING, params)).rowcount
    set_local(bind, old)
    return int(written)
