"""Taskiq with taskiq-redis `ListQueueBroker` (LPUSH/BRPOP, no result backend); workers are
`taskiq worker … --workers N --max-async-tasks C` (async tasks)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from taskiq_redis import ListQueueBroker

from bench import probe
from bench.systems.base import REDIS_URL, Base, bin_path, reset_redis, version

broker = ListQueueBroker(url=REDIS_URL, queue_name="bench")


@broker.task(task_name="noop")
async def noop() -> None:
    probe.done()


@broker.task(task_name="probe_start")
async def probe_start(seq: int) -> None:
    probe.start(seq)


@broker.task(task_name="sleeper")
async def sleeper(seq: int) -> None:
    probe.start(seq)
    await asyncio.sleep(0.05)
    probe.end(seq)


BULK_CHUNK = 100  # 1, 10, 50, 200, 500 measured alike: the cost is client CPU, not round trips


class System(Base):
    name = "taskiq_redis"

    def setup(self) -> None:
        reset_redis()
        self.run(broker.startup())
        self.started = True

    def worker_commands(self, processes: int, concurrency: int) -> list[list[str]]:
        return [
            [
                bin_path("taskiq"),
                "worker",
                "bench.systems.taskiq_redis:broker",
                "--workers",
                str(processes),
                "--max-async-tasks",
                str(concurrency),
                "--log-level",
                "WARNING",
            ]
        ]

    def enqueue_one(self, n: int) -> None:
        async def go() -> None:
            for _ in range(n):
                await noop.kiq()

        self.run(go())

    def enqueue_bulk(self, n: int) -> None:
        async def go() -> None:  # no bulk API: concurrent kiq() calls over the connection pool
            for start in range(0, n, BULK_CHUNK):
                await asyncio.gather(*(noop.kiq() for _ in range(min(BULK_CHUNK, n - start))))

        self.run(go())

    def enqueue_probe(self, seq: int) -> None:
        self.run(probe_start.kiq(seq))

    def enqueue_sleepers(self, seqs: Sequence[int]) -> None:
        async def go() -> None:
            await asyncio.gather(*(sleeper.kiq(s) for s in seqs))

        self.run(go())

    def close_client(self) -> None:
        if getattr(self, "started", False):
            self.run(broker.shutdown())

    def describe(self) -> str:
        return f"taskiq {version('taskiq')} + taskiq-redis {version('taskiq-redis')} · ListQueueBroker"
