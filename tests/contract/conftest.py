"""Fixtures of the store contract suite: a store whose clock the test moves."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from store_helpers import FakeClock

from runlane.store import Store, create_store


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def clocked_store(store_url: str, clock: FakeClock) -> AsyncIterator[Store]:
    """Like ``store``, but the store's now() is ``clock``: time-dependent tests never sleep."""
    s = create_store(store_url, clock=clock)
    await s.open()
    await s.migrate()
    try:
        yield s
    finally:
        await s.close()
