"""RFM scores and segments, lifecycle stages and their history, churn scores, the refresh."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from segments import lifecycle, refresh, rfm
from segments.config import DEFAULT_SEGMENT_GRID, ConfigError, ScoringConfig
from segments.models import RfmSegment
from tests.segments.conftest import add_member, add_purchase
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
