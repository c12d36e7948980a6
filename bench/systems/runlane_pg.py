"""Runlane on PostgreSQL (psycopg 3 pool, SKIP LOCKED, LISTEN/NOTIFY), workers as `runlane worker` processes."""

from __future__ import annotations

from bench.systems.base import PG_BASE, drop_pg_database, reset_pg_database
from bench.systems.runlane_common import RunlaneBase

DB = "bench_runlane"


class System(RunlaneBase):
    name = "runlane_pg"
    url = f"{PG_BASE}/{DB}"

    def reset_store(self) -> None:
        reset_pg_database(DB)

    def describe(self) -> str:
        return super().describe() + " · PostgreSQL · async no-op jobs"


def cleanup() -> None:
    drop_pg_database(DB)
