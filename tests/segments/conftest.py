"""Fixtures for scoring tests: a config, members, purchases through the real SQL paths."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session

from segments import stats
from segments.config import ScoringConfig
from service.models import Member, Store
from service.stores import upsert_store

TZ = "Asia/Shanghai"


@pytest.fixture
def scoring() -> ScoringConfig:
    return ScoringConfig.from_mapping({"timezone": TZ})


@pytest.fixture
def shop(session: Session) -> int:
    """A store id (created in this test's transaction)."""
    code = "SEG-" + uuid.uuid4().hex[:8]
    upsert_store(session, code, "Scoring store", "SEG-East", actor="test")
    session.flush()
    return int(session.scalar(select(Store.id).where(Store.code == code)))


@pytest.fixture
def isolated(session: Session) -> None:
    """Members other tests committed stay out of this test's population (rolled back after)."""
    session.execute(text("UPDATE members SET status = 'erased' WHERE status = 'active'"))
    session.execute(text("DELETE FROM stats_windows"))
    session.execute(text("DELETE FROM score_runs"))
    session.execute(text("DELETE FROM rfm_snapshots"))


def add_member(session: Session, store_id: int | None = None, **values: Any) -> int:
    values.setdefault("external_id", "SM-" + uuid.uuid4().hex[:12])
    return int(
        session.execute(
            insert(Member).values(home_store_id=store_id, **values).returning(Member.id)
        ).scalar_one()
    )


def add_purchase(
    session: Session, member_id: int, store_id: int, when: datetime, amount: Decimal | str
) -> int:
    """A purchase row plus the statistics update the purchase path makes."""
    amount = Decimal(str(amount))
    tx_id = session.execute(
        text(
            "INSERT INTO transactions (external_id, kind, member_id, store_id, channel,"
            " occurred_at, amount, currency) VALUES (:ext, 'purchase', :m, :s, 'pos', :at, :a,"
            " 'CNY') RETURNING id"
        ),
        {"ext": "TX-" + uuid.uuid4().hex, "m": member_id, "s": store_id, "at": when, "a": amount},
    ).scalar_one()
    stats.apply_purchase(session, member_id, when, amount)
    return int(tx_id)


def add_refund(session: Session, purchase_id: int, when: datetime, amount: Decimal | str) -> None:
    """A refund of part of a purchase, with the window update of the refund path."""
    amount = Decimal(str(amount))
    session.execute(
        text(
            "INSERT INTO transactions (external_id, kind, member_id, store_id, channel,"
            " occurred_at, amount, currency, original_id)"
            " SELECT :ext, 'refund', member_id, store_id, channel, :at, :a, currency, id"
            " FROM transactions WHERE id = :p"
        ),
        {"ext": "RF-" + uuid.uuid4().hex, "at": when, "a": amount, "p": purchase_id},
    )
    session.execute(
        text("UPDATE transactions SET refunded_amount = refunded_amount + :a WHERE id = :p"),
        {"a": amount, "p": purchase_id},
    )
    session.execute(
        text(
            "UPDATE member_stats SET refund_count = refund_count + 1,"
            " refund_amount = refund_amount + :a, net_spend = net_spend - :a"
            " WHERE member_id = (SELECT member_id FROM transactions WHERE id = :p)"
        ),
        {"a": amount, "p": purchase_id},
    )
    stats.apply_refund_to_windows(session, purchase_id, amount)


@pytest.fixture
def uow(session: Session) -> Callable[[], Any]:
    """A unit-of-work factory that runs every refresh step in this test's session."""

    @contextmanager
    def unit() -> Iterator[Session]:
        yield session
        session.flush()

    return unit


WINDOW_COLUMNS = (
    "purchases_30d",
    "purchases_90d",
    "purchases_365d",
    "spend_30d",
    "spend_90d",
    "spend_365d",
    "purchase_count",
    "net_spend",
)


def windows_of(session: Session, ids: list[int]) -> dict[int, tuple[Any, ...]]:
    rows = session.execute(
        text(
            f"SELECT member_id, {', '.join(WINDOW_COLUMNS)} FROM member_stats"
            " WHERE member_id = ANY(:ids)"
        ),
        {"ids": ids},
    ).all()
    return {r[0]: tuple(r[1:]) for r in rows}
