"""The daily refresh with independent steps side by side gives what the plain sequence gives.

Both runs need real, separate connections (each step commits on its own), so this test
works on scratch databases made from one seeded template, not in the per-test savepoint.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from bench.bench_custom_segments import SEGMENTS
from rules import parse_rule
from segments import custom, refresh
from segments.config import ScoringConfig
from segments.models_custom import SegmentKind
from service import migrate
from service.stores import upsert_store
from service.vocabulary import default_vocabulary
from tests.segments.conftest import TZ, add_member, add_purchase

DAYS = (date(2026, 6, 29), date(2026, 6, 30))
# Rules on scores: refreshed only once lifecycle, RFM and churn have run.
SCORED = {
    "champions": 'rfm.segment = "champions"',
    "active-unlikely": 'lifecycle.stage = "active" and churn.p_alive < 0.9',
    "in-two": 'segment in ("big-spenders") and purchase_count >= 2',
}
# Everything the refresh writes (without the columns of IGNORED_COLUMNS).
TABLES = {
    "member_stats": "SELECT * FROM member_stats ORDER BY member_id",
    "member_scores": "SELECT * FROM member_scores ORDER BY member_id",
    "member_predictions": "SELECT * FROM member_predictions ORDER BY member_id",
    "lifecycle_changes": "SELECT * FROM lifecycle_changes ORDER BY member_id, changed_on",
    "rfm_snapshots": "SELECT * FROM rfm_snapshots ORDER BY month, member_id",
    "memberships": "SELECT segment_id, member_id FROM segment_memberships ORDER BY 1, 2",
    "membership_changes": "SELECT segment_id, member_id, kind, at"
    " FROM segment_membership_changes ORDER BY 1, 2, 4, 3",
    "runs": "SELECT as_of, cut_points, churn_params FROM score_runs ORDER BY as_of",
}
# Wall-clock times, and surrogate ids (drawn from sequences, used differently by the runs).
IGNORED_COLUMNS = {"id", "updated_at", "computed_at", "created_at"}


def _seed(session: Session) -> None:
    rng = random.Random(7)
    stores = []
    for n in range(3):
        code = f"PAR-{n}"
        upsert_store(session, code, f"Store {n}", f"Region-{n % 2}", actor="test")
        found = session.scalar(text("SELECT id FROM stores WHERE code = :c"), {"c": code})
        stores.append(int(found))
    for n in range(120):
        member = add_member(
            session,
            stores[n % 3],
            external_id=f"PAR-{n}",
            birth_date=date(1960 + n % 40, 1 + n % 12, 1 + n % 28),
            tags=["vip"] if n % 5 == 0 else [],
        )
        first = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(days=rng.randrange(520))
        for k in range(rng.choice([0, 1, 1, 2, 3, 6, 12])):
            when = first + timedelta(days=k * rng.randrange(5, 60), hours=rng.randrange(24))
            if when.date() < DAYS[0]:
                add_purchase(session, member, stores[k % 3], when, f"{rng.randrange(5, 900)}.50")
    vocabulary = default_vocabulary()
    for name, rule in [*list(SEGMENTS.items())[:8], *SCORED.items()]:
        custom.create_segment(
            session, vocabulary, name, kind=SegmentKind.DYNAMIC, rule=rule, actor="test"
        )


@pytest.fixture(scope="module")
def scratch(engine: Engine) -> Iterator[Callable[[str], Engine]]:
    """A seeded template database; `make(name)` clones it. All dropped afterwards."""
    base_url = make_url(str(engine.url.render_as_string(hide_password=False)))
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT", pool_size=1)
    suffix = uuid.uuid4().hex[:8]
    template = f"patron_par_tpl_{suffix}"
    made: list[str] = [template]
    engines: list[Engine] = []
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{template}"'))
    seeded = create_engine(base_url.set(database=template))
    try:
        migrate.upgrade(seeded)
        with Session(seeded) as session, session.begin():
            _seed(session)
    finally:
        seeded.dispose()

    def make(name: str) -> Engine:
        db = f"patron_par_{name}_{suffix}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{db}" TEMPLATE "{template}"'))
        made.append(db)
        clone = create_engine(base_url.set(database=db), pool_size=4)
        engines.append(clone)
        return clone

    yield make
    for clone in engines:
        clone.dispose()
    with admin.connect() as conn:
        for db in reversed(made):
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    admin.dispose()


def _unit(engine: Engine) -> Callable[[], Any]:
    @contextmanager
    def unit() -> Iterator[Session]:
        with Session(engine) as session, session.begin():
            yield session

    return unit


def _contents(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    with engine.connect() as conn:
        return {
            name: [
                {k: v for k, v in row.items() if k not in IGNORED_COLUMNS}
                for row in conn.execute(text(sql)).mappings()
            ]
            for name, sql in TABLES.items()
        }


def test_parallel_refresh_writes_what_the_sequence_writes(
    scratch: Callable[[str], Engine],
) -> None:
    config = ScoringConfig.from_mapping({"timezone": TZ})
    serial, parallel = scratch("serial"), scratch("parallel")
    for day in DAYS:
        refresh.run_refresh(_unit(serial), day, config=config)

    # Churn starts only once lifecycle has (and lifecycle waits for that, up to 30 s), so
    # the parallel run passes only if the two steps really are in flight together.
    churn_started = threading.Event()
    overlapped: list[bool] = []

    def progress(name: str, details: dict[str, Any]) -> None:
        if details.get("status") != "started":
            return
        if name == "churn":
            churn_started.set()
        elif name == "lifecycle":
            overlapped.append(churn_started.wait(timeout=30))

    for day in DAYS:
        out = refresh.run_refresh(
            _unit(parallel), day, config=config, progress=progress, parallel=2
        )
        assert list(out["steps"]) == list(refresh.iter_step_names())
        churn_started.clear()
    assert overlapped == [True, True]

    expected, got = _contents(serial), _contents(parallel)
    assert got["member_scores"], "the seeded members were not scored"
    with parallel.connect() as conn:
        sizes = dict(
            conn.execute(
                text(
                    "SELECT s.name, count(m.member_id) FROM segments s"
                    " LEFT JOIN segment_memberships m ON m.segment_id = s.id GROUP BY s.name"
                )
            ).all()
        )
    # Every segment on scores has members: a step ordering that evaluated them before the
    # scores existed would give them none (or other ones than the sequence does).
    assert all(sizes[name] > 0 for name in SCORED), sizes
    for name in TABLES:
        assert got[name] == expected[name], name


def test_steps_wait_for_what_they_read() -> None:
    order = list(refresh.iter_step_names())
    waits = refresh.prerequisites(order)
    for name, before in waits.items():
        # Prerequisites come earlier in the list: the plain sequence honours them too.
        assert all(order.index(b) < order.index(name) for b in before), name
    # The three steps that write member_scores form one chain.
    assert "lifecycle" in waits["rfm"] and "rfm" in waits["snapshot"]
    assert set(waits["custom_segments"]) == set(order) - {"custom_segments", "snapshot"}
    assert set(waits["custom_segments_stats"]) == {"windows", "tiers"}
    assert waits["custom_segments_early"] == []
    # A subset keeps only the chosen prerequisites.
    assert refresh.prerequisites(["windows", "rfm"]) == {"windows": [], "rfm": ["windows"]}


def test_segments_are_refreshed_as_soon_as_what_they_read_is_fresh() -> None:
    vocab = default_vocabulary()
    on_windows = {
        "regulars": "purchases_90d >= 2",
        "gap": "median_interpurchase_days <= 30",
        "gold": 'tier = "gold"',
    }
    rules = {
        name: parse_rule(rule, vocab)
        for name, rule in [*SEGMENTS.items(), *SCORED.items(), *on_windows.items()]
    }
    stats = {name: refresh.reads_statistics_only(rule, vocab) for name, rule in rules.items()}
    early = {name: refresh.reads_nothing_refreshed(rule, vocab) for name, rule in rules.items()}
    # Scores and memberships: only after lifecycle, RFM and churn.
    assert not any(stats[name] or early[name] for name in SCORED)
    # Windows, purchase-day history and tiers: after those steps, not from the start.
    assert all(stats[name] and not early[name] for name in on_windows)
    # Member fields and lifetime statistics only: from the start.
    assert all(stats[name] for name in SEGMENTS)
    assert {name for name in SEGMENTS if not early[name]} == {"gold-active", "silver-upsell"}
