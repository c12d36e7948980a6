"""Helpers for testing code that uses Runlane: a clock you move by hand, and a burst drain."""

from __future__ import annotations

from typing import Any

from runlane.app import Runlane


class FakeClock:
    """A store clock that tests advance explicitly: ``Runlane(url, clock=clock)``.

    It starts at a fixed, realistic epoch so that datetimes in assertions and output look sane.
    """

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def drain(app: Runlane, **worker_options: Any) -> None:
    """Run a burst worker until nothing is due: every claimable run is executed, then it returns."""
    await app.worker(burst=True, **worker_options).run()
