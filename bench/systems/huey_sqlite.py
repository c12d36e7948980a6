"""Huey with SqliteHuey (WAL, Huey's defaults otherwise); workers are `huey_consumer -k thread -w C` processes.

Huey's SQLite storage polls: each worker thread sleeps `--delay` (default 0.1 s) after an empty poll, growing by
`--backoff` (1.15) up to `--max-delay` (default 10 s). `huey_sqlite` uses tuned polling (`-d 0.01 -m 0.1`),
`huey_sqlite_default` (see that module) keeps Huey's default polling.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from huey import SqliteHuey

from bench import probe
from bench.systems.base import DATA_DIR, Base, bin_path, reset_sqlite, version

PATH = DATA_DIR / "huey.db"
PATH.parent.mkdir(parents=True, exist_ok=True)  # SqliteHuey opens its file on import, on a fresh clone too

huey = SqliteHuey("bench", filename=os.environ.get("BENCH_HUEY_DB", str(PATH)))


@huey.task()
def noop() -> None:
    probe.done()


@huey.task()
def probe_start(seq: int) -> None:
    probe.start(seq)


@huey.task()
def sleeper(seq: int) -> None:
    probe.start(seq)
    time.sleep(0.05)
    probe.end(seq)


class System(Base):
    name = "huey_sqlite"
    polling: tuple[str, ...] = ("-d", "0.01", "-m", "0.1")

    def setup(self) -> None:
        reset_sqlite(PATH)
        huey.storage.close()  # forget connections to the deleted file; tables are created on next use
        huey.storage.initialize_schema()

    def worker_commands(self, processes: int, concurrency: int) -> list[list[str]]:
        command = [
            bin_path("huey_consumer"),
            "bench.systems.huey_sqlite.huey",
            "-k",
            "thread",
            "-w",
            str(concurrency),
            "-n",
            "-q",
            *self.polling,
        ]
        return [command for _ in range(processes)]

    def enqueue_one(self, n: int) -> None:
        for _ in range(n):
            noop()

    def enqueue_bulk(self, n: int) -> None:
        for _ in range(n):  # Huey has no bulk enqueue
            noop()

    def enqueue_probe(self, seq: int) -> None:
        probe_start(seq)

    def enqueue_sleepers(self, seqs: Sequence[int]) -> None:
        for seq in seqs:
            sleeper(seq)

    def close_client(self) -> None:
        huey.storage.close()

    def describe(self) -> str:
        return f"huey {version('huey')} · SqliteHuey · consumer -k thread -w C {' '.join(self.polling) or ''}"
