"""Dramatiq with its Redis broker (default middleware); workers are
`dramatiq bench.systems.dramatiq_redis --processes N --threads C`."""

from __future__ import annotations

import time
from collections.abc import Sequence

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench import probe
from bench.systems.base import REDIS_URL, Base, bin_path, reset_redis, version

broker = RedisBroker(url=REDIS_URL)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench", max_retries=0)
def noop() -> None:
    probe.done()


@dramatiq.actor(queue_name="bench", max_retries=0)
def probe_start(seq: int) -> None:
    probe.start(seq)


@dramatiq.actor(queue_name="bench", max_retries=0)
def sleeper(seq: int) -> None:
    probe.start(seq)
    time.sleep(0.05)
    probe.end(seq)


class System(Base):
    name = "dramatiq_redis"

    def setup(self) -> None:
        reset_redis()
        broker.client.ping()

    def worker_commands(self, processes: int, concurrency: int) -> list[list[str]]:
        return [
            [
                bin_path("dramatiq"),
                "bench.systems.dramatiq_redis",
                "--processes",
                str(processes),
                "--threads",
                str(concurrency),
                "--queues",
                "bench",
            ]
        ]

    def enqueue_one(self, n: int) -> None:
        for _ in range(n):
            noop.send()

    def enqueue_bulk(self, n: int) -> None:
        for _ in range(n):  # Dramatiq has no bulk enqueue (group() sends one by one too)
            noop.send()

    def enqueue_probe(self, seq: int) -> None:
        probe_start.send(seq)

    def enqueue_sleepers(self, seqs: Sequence[int]) -> None:
        for seq in seqs:
            sleeper.send(seq)

    def close_client(self) -> None:
        broker.close()

    def describe(self) -> str:
        return f"dramatiq {version('dramatiq')} · RedisBroker · --processes N --threads C"
