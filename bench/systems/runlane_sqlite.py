"""Runlane on SQLite (WAL, its defaults): one file on local disk, workers as `runlane worker` processes."""

from __future__ import annotations

from bench.systems.base import DATA_DIR, reset_sqlite
from bench.systems.runlane_common import RunlaneBase


class System(RunlaneBase):
    name = "runlane_sqlite"
    path = DATA_DIR / "runlane.db"
    url = f"sqlite:///{path}"

    def reset_store(self) -> None:
        reset_sqlite(self.path)

    def describe(self) -> str:
        return super().describe() + " · SQLite WAL file · async no-op jobs"
