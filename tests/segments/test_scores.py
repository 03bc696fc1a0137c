"""RFM scores and segments, lifecycle stages and their history, churn scores, the refresh."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.orm import Session

from segments import lifecycle, refresh, rfm
from segments.config import DEFAULT_SEGMENT_GRID, ConfigError, ScoringConfig
from segments.models import RfmSegment
from tests.segments.conftest import TZ, add_member, add_purchase
from tests.segments.test_stats import local

AS_OF = date(2026, 6, 30)


def scores(session: Session, ids: list[int]) -> dict[int, dict[str, Any]]:
    """member_scores rows with the member's churn predictions (None where there are none)."""
    rows = session.execute(
        text(
            "SELECT sc.*, p.p_alive, p.expected_purchases_90d, p.expected_value"
            " FROM member_scores sc LEFT JOIN member_predictions p USING (member_id)"
            " WHERE member_id = ANY(:ids)"
        ),
        {"ids": ids},
    ).mappings()
    return {r["member_id"]: dict(r) for r in rows}


def run(uow: Callable[[], Any], config: ScoringConfig, as_of: date = AS_OF) -> dict[str, Any]:
    return refresh.run_refresh(uow, as_of, config=config)


# --- the named-segment mapping ------------------------------------------------------------


def test_every_rfm_triple_has_exactly_one_segment_and_every_name_is_used() -> None:
    config = ScoringConfig()
    names = {
        rfm.segment_for(r, f, m, config) for r, f, m in itertools.product(range(1, 6), repeat=3)
    }
    assert names == {s.value for s in RfmSegment}
    assert len(rfm.SEGMENT_LABELS) == 11
    with pytest.raises(ValueError, match="1 to 5"):
        rfm.segment_for(0, 1, 1, config)


def test_the_mapping_can_be_configured_and_is_validated() -> None:
    grid = [list(row) for row in DEFAULT_SEGMENT_GRID]
    grid[0][0] = "champions"
    config = ScoringConfig.from_mapping({"segment_grid": grid})
    assert rfm.segment_for(5, 1, 1, config) == "champions"
    with pytest.raises(ConfigError, match="unknown segment"):
        ScoringConfig.from_mapping({"segment_grid": [["vip"] * 5] * 5})
    with pytest.raises(ConfigError, match="5 rows"):
        ScoringConfig.from_mapping({"segment_grid": [["lost"] * 5] * 4})
    with pytest.raises(ConfigError, match="increasing"):
        ScoringConfig.from_mapping({"f_thresholds": [3, 2, 1, 0]})
    with pytest.raises(ConfigError, match="unknown scoring"):
        ScoringConfig.from_mapping({"colour": "red"})


def test_config_from_env_reads_json_and_the_refresh_time(tmp_path: Any) -> None:
    path = tmp_path / "scoring.json"
    path.write_text('{"active_days": 60, "r_method": "thresholds"}')
    config = ScoringConfig.from_env(
        {"PATRON_SCORING": f"@{path}", "PATRON_TIMEZONE": "UTC", "PATRON_REFRESH_AT": "02:30"}
    )
    assert (config.active_days, config.r_method, config.timezone) == (60, "thresholds", "UTC")
    assert refresh.refresh_cron(config).count(" ") == 4
    with pytest.raises(ConfigError):
        ScoringConfig.from_env({"PATRON_REFRESH_AT": "25:00"})


# --- RFM ------------------------------------------------------------------------------------


def test_equal_values_get_equal_scores_and_cut_points_are_stored(
    session: Session, shop: int, isolated: None, uow: Any, scoring: ScoringConfig
) -> None:
    # 12 one-time buyers on the same day with the same amount: no splitting by row order.
    same = [add_member(session, shop) for _ in range(12)]
    for m in same:
        add_purchase(session, m, shop, local(AS_OF - timedelta(days=40)), "50.00")
    heavy = add_member(session, shop)
    for k in range(10):
        add_purchase(session, heavy, shop, local(AS_OF - timedelta(days=k * 3)), "300.00")
    never = add_member(session, shop)
    run(uow, scoring)
    got = scores(session, [*same, heavy, never])
    assert len({(got[m]["r"], got[m]["f"], got[m]["m"], got[m]["rfm_segment"]) for m in same}) == 1
    assert (got[same[0]]["f"], got[heavy]["f"]) == (1, 5)  # thresholds 1 / 2 / 4 / 9
    assert got[heavy]["r"] == 5 and got[heavy]["m"] == 5
    assert got[heavy]["rfm_segment"] == "champions"
    assert got[never]["r"] is None and got[never]["lifecycle_stage"] == "never_purchased"
    cuts = session.scalar(text("SELECT cut_points FROM score_runs WHERE as_of = :d"), {"d": AS_OF})
    assert cuts["f"] == [1, 2, 4, 9] and cuts["method"]["f"] == "thresholds"
    assert cuts["r"] == [40, 40, 40, 40] and cuts["members"] == 13
    assert cuts["m"] == ["50.00", "50.00", "50.00", "50.00"]
    lines = rfm.explain_scores(
        got[same[0]], cuts, AS_OF, local(AS_OF - timedelta(days=40)), scoring
    )
    assert (
        lines[0] == "R = 5: last purchase 40 days before 2026-06-30; "
        "R cut points 40 / 40 / 40 / 40 days (quintile)"
    )
    assert lines[1].startswith(
        "F = 1: 1 purchases in the last 365 days; F cut points 1 / 2 / 4 / 9"
    )


def test_quintiles_split_distinct_values_evenly(
    session: Session, shop: int, isolated: None, uow: Any, scoring: ScoringConfig
) -> None:
    ids = [add_member(session, shop) for _ in range(10)]
    for k, m in enumerate(ids):
        add_purchase(session, m, shop, local(AS_OF - timedelta(days=10 * (k + 1))), f"{k + 1}0.00")
    run(uow, scoring)
    got = scores(session, ids)
    assert [got[m]["r"] for m in ids] == [5, 5, 4, 4, 3, 3, 2, 2, 1, 1]
    assert [got[m]["m"] for m in ids] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    cuts = session.scalar(text("SELECT cut_points FROM score_runs WHERE as_of = :d"), {"d": AS_OF})
    assert cuts["r"] == [20, 40, 60, 80]


# --- lifecycle ------------------------------------------------------------------------------


def _stage_case(
    session: Session, shop: int, days_since_first: int, days_since_last: int, gaps: int = 0
) -> int:
    m = add_member(session, shop)
    add_purchase(session, m, shop, local(AS_OF - timedelta(days=days_since_first)), "1")
    for k in range(gaps, 0, -1):
        add_purchase(session, m, shop, local(AS_OF - timedelta(days=days_since_last + 5 * k)), "1")
    add_purchase(session, m, shop, local(AS_OF - timedelta(days=days_since_last)), "1")
    return m


def test_lifecycle_thresholds_and_the_personal_variant(
    session: Session, shop: int, isolated: None, uow: Any, scoring: ScoringConfig
) -> None:
    cases = {
        "new": _stage_case(session, shop, 29, 0),
        "active_edge": _stage_case(session, shop, 400, 90),
        "at_risk": _stage_case(session, shop, 400, 91),
        "at_risk_edge": _stage_case(session, shop, 400, 180),
        "dormant": _stage_case(session, shop, 400, 181),
        "lost": _stage_case(session, shop, 400, 366),
        # Buys every 5 days: 16 silent days exceed 3 x 5 -> at risk early (personal).
        "personal": _stage_case(session, shop, 400, 16, gaps=4),
        "personal_ok": _stage_case(session, shop, 400, 15, gaps=4),
    }
    cases["first_day_new"] = _stage_case(session, shop, 0, 0)
    cases["old_new"] = _stage_case(session, shop, 30, 30)
    run(uow, scoring)
    got = {
        k: v["lifecycle_stage"]
        for k, v in zip(cases, scores(session, list(cases.values())).values(), strict=False)
    }
    stage = {k: scores(session, [m])[m]["lifecycle_stage"] for k, m in cases.items()}
    assert stage == {
        "new": "new",
        "active_edge": "active",
        "at_risk": "at_risk",
        "at_risk_edge": "at_risk",
        "dormant": "dormant",
        "lost": "lost",
        "personal": "at_risk",
        "personal_ok": "active",
        "first_day_new": "new",
        "old_new": "active",
    }
    assert got  # read above in one query too
    # Turned off, the frequent buyer is active by the fixed thresholds.
    fixed = ScoringConfig.from_mapping({"timezone": scoring.timezone, "personal_k": 0})
    run(uow, fixed, AS_OF)
    assert scores(session, [cases["personal"]])[cases["personal"]]["lifecycle_stage"] == "active"


def test_stage_changes_are_recorded_and_form_the_early_warning_list(
    session: Session, shop: int, isolated: None, uow: Any, scoring: ScoringConfig
) -> None:
    quiet = [add_member(session, shop) for _ in range(3)]
    for m in quiet:
        add_purchase(session, m, shop, local(AS_OF - timedelta(days=400)), "9")
        add_purchase(session, m, shop, local(AS_OF - timedelta(days=88)), "9")
    fresh = add_member(session, shop)
    day = AS_OF
    run(uow, scoring, day)
    assert {scores(session, [m])[m]["lifecycle_stage"] for m in quiet} == {"active"}
    for _ in range(3):  # 89, 90 days: active; 91: at risk
        day += timedelta(days=1)
        run(uow, scoring, day)
    add_purchase(session, fresh, shop, local(day), "5")
    run(uow, scoring, day)  # the same date again: only the new buyer changes
    run(uow, scoring, day)
    history = lifecycle.stage_history(session, quiet[0])
    assert history == [{"changed_on": day, "from_stage": "active", "to_stage": "at_risk"}]
    assert lifecycle.stage_history(session, fresh) == [
        {"changed_on": day, "from_stage": "never_purchased", "to_stage": "new"}
    ]
    assert scores(session, [quiet[0]])[quiet[0]]["stage_since"] == day
    items, cursor = lifecycle.early_warning(session, scoring, as_of=day, limit=2)
    assert len(items) == 2 and cursor is not None
    rest, end = lifecycle.early_warning(session, scoring, as_of=day, limit=2, cursor=cursor)
    assert len(rest) == 1 and end is None
    assert {i["previous_stage"] for i in items + rest} == {"active"}
    assert [i["days_since_last_purchase"] for i in items + rest] == [91, 91, 91]
    # A week later they are no longer "just became at risk".
    later, _ = lifecycle.early_warning(session, scoring, as_of=day + timedelta(days=7))
    assert later == []


# --- churn and the whole refresh ------------------------------------------------------------


def test_refresh_writes_churn_scores_and_is_idempotent(
    session: Session, shop: int, isolated: None, uow: Any, scoring: ScoringConfig
) -> None:
    ids = []
    for k in range(60):
        m = add_member(session, shop)
        ids.append(m)
        first = AS_OF - timedelta(days=300 - k)
        for j in range(k % 6 + 1):
            add_purchase(
                session, m, shop, local(first + timedelta(days=j * (7 + k % 13))), f"{20 + k}.00"
            )
    result = run(uow, scoring)
    assert result["steps"]["windows"]["mode"] == "rebuilt"
    got = scores(session, ids)
    assert all(Decimal(0) <= s["p_alive"] <= Decimal(1) for s in got.values())
    assert all(s["expected_purchases_90d"] >= 0 for s in got.values())
    assert all(s["expected_value"] is not None for s in got.values())
    one_timer = got[ids[0]]
    assert one_timer["p_alive"] == Decimal(1)  # BG/NBD: no repeat purchase, never dropped out
    params = session.scalar(
        text("SELECT churn_params FROM score_runs WHERE as_of = :d"), {"d": AS_OF}
    )
    assert set(params["bgnbd"]) >= {"r", "alpha", "a", "b"}
    before = (scores(session, ids), session.scalar(text("SELECT count(*) FROM lifecycle_changes")))
    again = run(uow, scoring)
    assert again["steps"]["windows"] == {**again["steps"]["windows"], "mode": "unchanged"}
    assert again["steps"]["rfm"]["changed"] == 0
    assert again["steps"]["lifecycle"]["written"] == 0
    assert again["steps"]["snapshot"]["taken"] is False
    after = (scores(session, ids), session.scalar(text("SELECT count(*) FROM lifecycle_changes")))
    assert after == before


def test_movement_matrix_between_monthly_snapshots(
    session: Session, shop: int, isolated: None, uow: Any, scoring: ScoringConfig
) -> None:
    ids = [add_member(session, shop) for _ in range(5)]
    for k, m in enumerate(ids):
        for j in range(k + 1):
            add_purchase(session, m, shop, local(date(2026, 5, 25) - timedelta(days=j * 11)), "40")
    run(uow, scoring, date(2026, 6, 1))
    run(uow, scoring, date(2026, 6, 15))  # not the month's first refresh: no new snapshot
    run(uow, scoring, date(2026, 9, 1))
    moved = rfm.movement(session, date(2026, 6, 1), date(2026, 9, 1))
    assert moved["total"] == 5
    cells = {
        (row["from_segment"], c["to_segment"]): c["members"]
        for row in moved["matrix"]
        for c in row["counts"]
        if c["members"]
    }
    assert sum(cells.values()) == 5
    june = dict(
        session.execute(
            text("SELECT member_id, rfm_segment FROM rfm_snapshots WHERE month = '2026-06-01'")
        ).all()
    )
    assert set(june) == set(ids)
    assert all(src != "none" for src, _ in cells)


# --- birthdays and age bands ----------------------------------------------------------------


def test_upcoming_birthdays_across_year_end_and_leap_day(
    session: Session, shop: int, isolated: None
) -> None:
    from datetime import UTC, datetime

    from rules import compile_py, member_query, parse_rule
    from segments.birthday import upcoming_birthdays
    from service.vocabulary import default_vocabulary, load_member_facts

    leap = add_member(session, shop, birth_date=date(2004, 2, 29), timezone="Asia/Shanghai")
    eve = add_member(session, shop, birth_date=date(1990, 12, 31), timezone="America/New_York")
    jan = add_member(session, shop, birth_date=date(2010, 1, 1), timezone="Asia/Shanghai")
    add_member(session, shop, birth_date=date(1990, 6, 1), timezone="UTC")
    # 2025-02-27 20:00 UTC is already the 28th in Shanghai: the leap-day birthday is today.
    feb = upcoming_birthdays(session, 0, datetime(2025, 2, 27, 20, tzinfo=UTC))
    assert [(b["in_days"], b["turning"], b["age_band"]) for b in feb] == [(0, 21, "18_24")]
    # 30 Dec 23:00 in New York is 31 Dec 04:00 UTC / 12:00 in Shanghai.
    now = datetime(2025, 12, 31, 4, tzinfo=UTC)
    soon = upcoming_birthdays(session, 1, now)
    assert sorted((b["in_days"], str(b["birthday_on"])) for b in soon) == [
        (1, "2025-12-31"),
        (1, "2026-01-01"),
    ]
    vocab = default_vocabulary()
    rule = parse_rule('age_band in ("35_44", "under_18")', vocab)
    ids = [leap, eve, jan]
    in_sql = set(
        session.scalars(
            member_query(rule, vocab, now).where(text("members.id = ANY(:i)")), {"i": ids}
        )
    )
    facts = load_member_facts(session, ids)
    check = compile_py(rule, vocab).at(now)
    # eve is still 34 in New York (her birthday is tomorrow there); jan is 15.
    assert in_sql == {i for i in ids if check(facts[i])} == {jan}


# --- the set-based steps against the definitions, written out in Python --------------------

# Days since the last purchase either side of the default lifecycle thresholds.
_EDGES = (29, 30, 31, 89, 90, 91, 179, 180, 181, 364, 365, 366)
_stats_row = st.one_of(
    st.none(),  # no statistics row: never purchased
    st.tuples(
        # Days from the last purchase to the date (-1: a day after), often at a threshold.
        st.one_of(st.integers(-1, 420), st.sampled_from(_EDGES)),
        st.integers(0, 23),  # local hour of the last purchase
        # Days from the first purchase to the date (at least those from the last).
        st.one_of(st.integers(0, 420), st.sampled_from(_EDGES)),
        st.integers(0, 6),  # purchases in the look-back window (ties on purpose)
        st.one_of(
            st.sampled_from([Decimal("50.00"), Decimal("300.00")]), st.decimals(0, 8000, places=2)
        ),
        st.integers(1, 4),  # purchase days (about personal_min_days)
        st.one_of(st.none(), st.decimals(0, 40, places=1)),  # median gap
    ),
)
_cuts = st.lists(st.decimals(0, 400, places=1), min_size=4, max_size=4, unique=True).map(sorted)


def _local_days(as_of: date, at: datetime) -> int:
    return max((as_of - at.astimezone(ZoneInfo(TZ)).date()).days, 0)


def _expected_stage(row: tuple[Any, ...] | None, as_of: date, c: ScoringConfig) -> str:
    if row is None:
        return "never_purchased"
    first, last, _, _, days, median = row
    d, d1 = _local_days(as_of, last), _local_days(as_of, first)
    if d1 < c.new_days:
        return "new"
    if d <= c.active_days:
        personal = (
            c.personal_k > 0 and days >= c.personal_min_days and median is not None and median > 0
        )
        return "at_risk" if personal and d > Decimal(str(c.personal_k)) * median else "active"
    if d <= c.at_risk_days:
        return "at_risk"
    return "dormant" if d <= c.dormant_days else "lost"


def _expected_rfm(
    rows: dict[int, tuple[Any, ...] | None], as_of: date, c: ScoringConfig
) -> tuple[dict[str, list[Any]], dict[int, tuple[Any, ...]]]:
    scored = {m: row for m, row in rows.items() if row is not None and row[2] > 0}
    values = {
        "r": [_local_days(as_of, row[1]) for row in scored.values()],
        "f": [row[2] for row in scored.values()],
        "m": [row[3] for row in scored.values()],
    }
    cuts: dict[str, list[Any]] = {}
    for dim, vals in values.items():
        if getattr(c, f"{dim}_method") == "thresholds":
            # The thresholds as written (SQL compares with the decimal, not the binary float).
            cuts[dim] = [Decimal(str(v)) for v in getattr(c, f"{dim}_thresholds")]
        else:
            # percentile_disc: the first value whose position reaches the fraction (the
            # fraction times the count in double precision, as PostgreSQL computes it).
            ordered = sorted(vals)
            cuts[dim] = (
                [ordered[max(math.ceil(p * len(ordered)), 1) - 1] for p in (0.2, 0.4, 0.6, 0.8)]
                if ordered
                else []
            )
    out = {}
    for m, row in scored.items():
        r = rfm.score_value(_local_days(as_of, row[1]), cuts["r"], reverse=True)
        f = rfm.score_value(row[2], cuts["f"], reverse=False)
        mm = rfm.score_value(row[3], cuts["m"], reverse=False)
        out[m] = (r, f, mm, rfm.segment_for(r, f, mm, c), row[2], row[3])
    return cuts, out


def _write_stats(
    session: Session, lookback: int, as_of: date, rows: dict[int, tuple[Any, ...] | None]
) -> dict[int, tuple[Any, ...] | None]:
    """Store generated statistics; returns them as (first, last, count, spend, days, median)."""
    session.execute(
        text("DELETE FROM member_stats WHERE member_id = ANY(:ids)"), {"ids": list(rows)}
    )
    stored: dict[int, tuple[Any, ...] | None] = {}
    for member, gen in rows.items():
        if gen is None:
            stored[member] = None
            continue
        back, hour, since_first, count, spend, days, median = gen
        last = local(as_of - timedelta(days=back), hour)
        first = last - timedelta(days=max(since_first - back, 0))
        stored[member] = (first, last, count, spend, days, median)
        session.execute(
            text(
                "INSERT INTO member_stats (member_id, first_purchase_at, last_purchase_at,"
                f" purchases_{lookback}d, spend_{lookback}d, purchase_days,"
                " median_interpurchase_days)"
                " VALUES (:m, :first, :last, :count, :spend, :days, :median)"
            ),
            {
                "m": member,
                "first": first,
                "last": last,
                "count": count,
                "spend": spend,
                "days": days,
                "median": median,
            },
        )
    return stored


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    first=st.lists(_stats_row, min_size=4, max_size=12),
    second=st.lists(st.tuples(_stats_row, st.booleans()), min_size=12, max_size=12),
    jump=st.integers(1, 200),
    lookback=st.sampled_from((30, 90, 365)),
    methods=st.tuples(*[st.sampled_from(("quintile", "thresholds"))] * 3),
    thresholds=st.tuples(_cuts, _cuts, _cuts),
    personal=st.sampled_from(((0.0, 3), (1.5, 2), (3.0, 3))),
)
def test_lifecycle_and_rfm_steps_agree_with_the_definitions(
    session: Session,
    shop: int,
    isolated: None,
    first: list[Any],
    second: list[tuple[Any, bool]],
    jump: int,
    lookback: int,
    methods: tuple[str, str, str],
    thresholds: tuple[list[Decimal], ...],
    personal: tuple[float, int],
) -> None:
    config = ScoringConfig.from_mapping(
        {
            "timezone": TZ,
            "rfm_lookback_days": lookback,
            **{f"{d}_method": m for d, m in zip("rfm", methods, strict=True)},
            **{
                f"{d}_thresholds": [float(v) for v in t]
                for d, t in zip("rfm", thresholds, strict=True)
            },
            "personal_k": personal[0],
            "personal_min_days": personal[1],
        }
    )
    savepoint = session.begin_nested()
    try:
        members = [add_member(session, shop) for _ in first]
        day = AS_OF
        rows = _write_stats(session, lookback, day, dict(zip(members, first, strict=True)))
        stages: dict[int, str] = {}
        for round_ in (1, 2):
            if round_ == 2:
                # A later date: new statistics (members leave and join the population), some
                # members erased.
                day += timedelta(days=jump)
                gone = [m for m, (_, erase) in zip(members, second, strict=False) if erase]
                session.execute(
                    text("UPDATE members SET status = 'erased' WHERE id = ANY(:ids)"), {"ids": gone}
                )
                members = [m for m in members if m not in gone]
                gen = {m: s for m, (s, _) in zip(members, second, strict=False)}
                rows = _write_stats(session, lookback, day, gen)
            lifecycle.refresh_stages(session, day, config)
            cuts = rfm.score_members(session, day, config)
            want_cuts, want = _expected_rfm(rows, day, config)
            got = scores(session, members)
            assert set(got) == set(members)  # erased members keep no scores
            for m in members:
                stage = _expected_stage(rows[m], day, config)
                assert got[m]["lifecycle_stage"] == stage
                if m in stages and stages[m] != stage:
                    assert got[m]["stage_since"] == day
                assert (
                    got[m]["r"],
                    got[m]["f"],
                    got[m]["m"],
                    got[m]["rfm_segment"],
                    got[m]["frequency"],
                    got[m]["monetary"],
                ) == want.get(m, (None,) * 6)
            for dim in "rfm":
                assert [Decimal(str(v)) for v in cuts[dim]] == want_cuts[dim]
            assert cuts["members"] == len(want)
            changes: dict[int, str] = dict(
                session.execute(
                    text(
                        "SELECT member_id, from_stage || '>' || to_stage FROM lifecycle_changes"
                        " WHERE changed_on = :d AND member_id = ANY(:ids)"
                    ),
                    {"d": day, "ids": members},
                ).all()
            )
            assert changes == {
                m: f"{stages[m]}>{got[m]['lifecycle_stage']}"
                for m in members
                if m in stages and stages[m] != got[m]["lifecycle_stage"]
            }
            stages = {m: got[m]["lifecycle_stage"] for m in members}
        # The same date again changes nothing.
        assert rfm.score_members(session, day, config)["changed"] == 0
        assert lifecycle.refresh_stages(session, day, config)["written"] == 0
    finally:
        savepoint.rollback()
