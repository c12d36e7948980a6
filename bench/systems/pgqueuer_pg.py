"""PgQueuer on PostgreSQL with its documented asyncpg driver; workers are processes running `pgqueuer.run(...)`
— what `pgq run` does — through this module's `__main__` (pgqueuer 1.6's `pgq run` crashes at start-up with
typer 0.29: its `--log-level` parser hands a str where an enum is expected). Like `pgq run`, it uses uvloop
when installed (it is, as a pgqueuer dependency).

Batch size: `--batch-size` = the per-process concurrency (16 for the drain; PgQueuer's default is 10); no
`--max-concurrent-tasks` cap for no-op jobs, and `--max-concurrent-tasks 50 --batch-size 25` for w5 (PgQueuer
requires the cap to be at least twice the batch size).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from bench import probe
from bench.systems.base import PG_BASE, Base, bin_path, drop_pg_database, reset_pg_database, version

DB = "bench_pgqueuer"
DSN = os.environ.get("BENCH_PGQUEUER_DSN", f"{PG_BASE}/{DB}")


@asynccontextmanager
async def create() -> AsyncIterator[Any]:
    """The factory `pgq run bench.systems.pgqueuer_pg:create` calls in each worker process (pgqueuer 1.6 wants an
    async context manager)."""
    import asyncpg
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job

    connection = await asyncpg.connect(DSN)
    pgq = PgQueuer(AsyncpgDriver(connection))

    @pgq.entrypoint("noop")
    async def noop(job: Job) -> None:
        probe.done()

    @pgq.entrypoint("probe_start")
    async def probe_start(job: Job) -> None:
        probe.start(int(job.payload or b"0"))

    @pgq.entrypoint("sleeper")
    async def sleeper(job: Job) -> None:
        seq = int(job.payload or b"0")
        probe.start(seq)
        await asyncio.sleep(0.05)
        probe.end(seq)

    try:
        yield pgq
    finally:
        await connection.close()


class System(Base):
    name = "pgqueuer"

    def setup(self) -> None:
        reset_pg_database(DB)
        subprocess.run(
            [bin_path("pgq"), "--pg-dsn", DSN, "install"], check=True, capture_output=True, timeout=120
        )

        async def connect() -> Any:
            import asyncpg
            from pgqueuer.db import AsyncpgDriver
            from pgqueuer.queries import Queries

            self.connection = await asyncpg.connect(DSN)
            return Queries(AsyncpgDriver(self.connection))

        self.queries = self.run(connect())

    def worker_commands(self, processes: int, concurrency: int) -> list[list[str]]:
        if concurrency > 16:  # w5: a hard cap on in-flight jobs
            limits = ["--batch-size", str(concurrency // 2), "--max-concurrent-tasks", str(concurrency)]
        else:
            limits = ["--batch-size", str(concurrency)]
        command = [sys.executable, "-m", "bench.systems.pgqueuer_pg", *limits]
        return [command for _ in range(processes)]

    def enqueue_one(self, n: int) -> None:
        async def go() -> None:
            for _ in range(n):
                await self.queries.enqueue("noop", None)

        self.run(go())

    def enqueue_bulk(self, n: int) -> None:
        self.run(self.queries.enqueue(["noop"] * n, [None] * n, [0] * n))

    def enqueue_probe(self, seq: int) -> None:
        self.run(self.queries.enqueue("probe_start", str(seq).encode()))

    def enqueue_sleepers(self, seqs: Sequence[int]) -> None:
        seqs = list(seqs)
        self.run(
            self.queries.enqueue(["sleeper"] * len(seqs), [str(s).encode() for s in seqs], [0] * len(seqs))
        )

    def close_client(self) -> None:
        if getattr(self, "connection", None) is not None:
            self.run(self.connection.close())

    def describe(self) -> str:
        return f"pgqueuer {version('pgqueuer')} + asyncpg {version('asyncpg')} · pgq run, batch-size = concurrency"


def cleanup() -> None:
    drop_pg_database(DB)


def main() -> None:
    """`pgq run bench.systems.pgqueuer_pg:create [--batch-size B] [--max-concurrent-tasks M]`, without the CLI."""
    import argparse
    import logging

    import pgqueuer

    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--max-concurrent-tasks", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    coro = pgqueuer.run(
        "bench.systems.pgqueuer_pg:create",  # a path: pgqueuer adapts a coroutine factory as `pgq run` does
        batch_size=args.batch_size,
        max_concurrent_tasks=args.max_concurrent_tasks,
        dequeue_timeout=timedelta(seconds=30),
    )
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    main()
