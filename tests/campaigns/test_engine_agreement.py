"""The event path (Python) and the batch path (SQL) must agree on holdouts and cap buckets."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import String, literal, select
from sqlalchemy.orm import Session

from campaigns.engine import bucket, bucket_sql, holdout_slot, holdout_slot_sql

ZONES = [
    "UTC",
    "Asia/Shanghai",
    "Pacific/Auckland",
    "America/Los_Angeles",
    "Pacific/Kiritimati",
    "Asia/Kathmandu",
]
PERIODS = ["evaluation", "day", "week", "month", "year", "lifetime"]
instants = st.datetimes(
    min_value=datetime(1999, 12, 25), max_value=datetime(2031, 1, 5), timezones=st.just(UTC)
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(campaign_id=st.integers(1, 10**9), member_id=st.integers(1, 10**12))
def test_holdout_slot_is_the_same_in_python_and_sql(
    session: Session, campaign_id: int, member_id: int
) -> None:
    sql = session.scalar(select(holdout_slot_sql(campaign_id, literal(member_id))))
    assert sql == holdout_slot(campaign_id, member_id)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(period=st.sampled_from(PERIODS), zone=st.sampled_from(ZONES), now=instants)
def test_cap_bucket_is_the_same_in_python_and_sql(
    session: Session, period: str, zone: str, now: datetime
) -> None:
    sql = session.scalar(select(bucket_sql(period, literal(zone, String), now, "txn:1")))
    assert sql == bucket(period, zone, now, "txn:1")


def test_buckets_follow_the_members_own_calendar() -> None:
    # 31 Dec 2026 23:30 in Los Angeles is already 2027 in Shanghai: a yearly cap resets
    # at each member's own new year.
    now = datetime(2027, 1, 1, 7, 30, tzinfo=UTC)
    assert bucket("year", "America/Los_Angeles", now, "x") == "2026"
    assert bucket("year", "Asia/Shanghai", now, "x") == "2027"
    # 29 Feb exists as a day bucket in leap years only.
    assert bucket("day", "UTC", datetime(2028, 2, 29, 12, tzinfo=UTC), "x") == "2028-02-29"
    assert bucket("week", "UTC", datetime(2027, 1, 1, tzinfo=UTC), "x") == "2026-W53"


def test_holdout_share_is_close_to_the_percentage() -> None:
    held = sum(holdout_slot(7, m) < 1000 for m in range(1, 20_001))  # 10 %
    assert 1_800 < held < 2_200
