"""RQ with `rq worker -w rq.SimpleWorker` processes: one job at a time per process, executed in the worker
process itself (RQ's default `Worker` forks a child per job, far slower for short jobs). RQ has no in-process
concurrency, so w5 does not apply."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from redis import Redis
from rq import Queue

from bench import probe
from bench.systems.base import REDIS_URL, Base, bin_path, reset_redis, version


def noop() -> None:
    probe.done()


def probe_start(seq: int) -> None:
    probe.start(seq)


class System(Base):
    name = "rq_redis"
    unsupported: ClassVar[dict[str, str]] = {
        "w5": "RQ runs one job at a time per worker process (no in-process concurrency)"
    }

    def setup(self) -> None:
        reset_redis()
        self.redis = Redis.from_url(REDIS_URL)
        self.queue = Queue("bench", connection=self.redis)
        self.redis.ping()

    def worker_commands(self, processes: int, concurrency: int) -> list[list[str]]:
        command = [bin_path("rq"), "worker", "-w", "rq.SimpleWorker", "-u", REDIS_URL, "-q", "bench"]
        return [command for _ in range(processes)]

    def enqueue_one(self, n: int) -> None:
        for _ in range(n):
            self.queue.enqueue(noop)

    def enqueue_bulk(self, n: int) -> None:
        for start in range(0, n, 5000):  # enqueue_many: one Redis pipeline per call
            self.queue.enqueue_many([Queue.prepare_data(noop) for _ in range(min(5000, n - start))])

    def enqueue_probe(self, seq: int) -> None:
        self.queue.enqueue(probe_start, seq)

    def enqueue_sleepers(self, seqs: Sequence[int]) -> None:
        raise NotImplementedError

    def close_client(self) -> None:
        if getattr(self, "redis", None) is not None:
            self.redis.close()

    def describe(self) -> str:
        return f"rq {version('rq')} · SimpleWorker, 1 job at a time per process"
