"""Fixtures shared by the campaign tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from campaigns.engine import ACTIVE
from tests.conftest import KeyFactory


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    # Each test's campaigns live in its own rolled-back transaction: no test may see the
    # active-campaign cache another one filled.
    ACTIVE.clear()
    yield
    ACTIVE.clear()


@pytest.fixture
def marketer(auth: KeyFactory) -> dict[str, str]:
    return auth("marketer")


@pytest.fixture
def pos(auth: KeyFactory) -> dict[str, str]:
    return auth("pos")
