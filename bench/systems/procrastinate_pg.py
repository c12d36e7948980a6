"""Procrastinate on PostgreSQL (psycopg 3 connector, LISTEN/NOTIFY on); workers are
`procrastinate worker --concurrency C` processes (async tasks)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Sequence

import procrastinate

from bench import probe
from bench.systems.base import PG_BASE, Base, drop_pg_database, reset_pg_database, version

DB = "bench_procrastinate"
DSN = os.environ.get("BENCH_PROCRASTINATE_DSN", f"{PG_BASE}/{DB}")

app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=DSN))


@app.task(name="noop")
async def noop() -> None:
    probe.done()


@app.task(name="probe_start")
async def probe_start(seq: int) -> None:
    probe.start(seq)


@app.task(name="sleeper")
async def sleeper(seq: int) -> None:
    probe.start(seq)
    await asyncio.sleep(0.05)
    probe.end(seq)


APP_PATH = "bench.systems.procrastinate_pg.app"


class System(Base):
    name = "procrastinate"

    def setup(self) -> None:
        reset_pg_database(DB)
        subprocess.run(
            [sys.executable, "-m", "procrastinate", f"--app={APP_PATH}", "schema", "--apply"],
            check=True,
            capture_output=True,
            timeout=120,
        )

        async def open_app() -> None:
            await app.open_async()

        self.run(open_app())
        self.opened = True

    def worker_commands(self, processes: int, concurrency: int) -> list[list[str]]:
        # --log-level warning: by default the worker logs two INFO lines per job, which costs it CPU; every
        # system here logs warnings only
        command = [
            sys.executable,
            "-m",
            "procrastinate",
            f"--app={APP_PATH}",
            "--log-level",
            "warning",
            "worker",
            "-c",
            str(concurrency),
        ]
        return [command for _ in range(processes)]

    def enqueue_one(self, n: int) -> None:
        async def go() -> None:
            for _ in range(n):
                await noop.defer_async()

        self.run(go())

    def enqueue_bulk(self, n: int) -> None:
        async def go() -> None:
            for start in range(0, n, 5000):
                await noop.batch_defer_async(*({} for _ in range(min(5000, n - start))))

        self.run(go())

    def enqueue_probe(self, seq: int) -> None:
        self.run(probe_start.defer_async(seq=seq))

    def enqueue_sleepers(self, seqs: Sequence[int]) -> None:
        self.run(sleeper.batch_defer_async(*({"seq": s} for s in seqs)))

    def close_client(self) -> None:
        if getattr(self, "opened", False):
            self.run(app.close_async())

    def describe(self) -> str:
        return f"procrastinate {version('procrastinate')} · psycopg connector · worker -c C"


def cleanup() -> None:
    drop_pg_database(DB)
