"""Celery with the Redis broker; workers are `celery worker --pool threads --concurrency C` processes.

No result backend (`task_ignore_result`), default acks (early: a message is acknowledged when received),
default prefetch multiplier (4), and `--without-gossip --without-mingle --without-heartbeat` (Celery's documented
advice for Redis-only, single-host setups; it shortens start-up).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from celery import Celery

from bench import probe
from bench.systems.base import REDIS_URL, Base, bin_path, reset_redis, version

POOL = os.environ.get("BENCH_CELERY_POOL", "threads")

app = Celery("bench", broker=REDIS_URL)
app.conf.update(
    task_ignore_result=True,
    task_default_queue="bench",
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop() -> None:
    probe.done()


@app.task(name="probe_start")
def probe_start(seq: int) -> None:
    probe.start(seq)


@app.task(name="sleeper")
def sleeper(seq: int) -> None:
    probe.start(seq)
    time.sleep(0.05)
    probe.end(seq)


class System(Base):
    name = "celery_redis"

    def setup(self) -> None:
        reset_redis()
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=3)
        self.producer_cm = app.producer_or_acquire()
        self.producer = self.producer_cm.__enter__()

    def worker_commands(self, processes: int, concurrency: int) -> list[list[str]]:
        return [
            [
                bin_path("celery"),
                "-A",
                "bench.systems.celery_redis",
                "worker",
                "--pool",
                POOL,
                "--concurrency",
                str(concurrency),
                "-Q",
                "bench",
                "-n",
                f"bench{i}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel",
                "WARNING",
            ]
            for i in range(processes)
        ]

    def enqueue_one(self, n: int) -> None:
        for _ in range(n):
            noop.delay()

    def enqueue_bulk(self, n: int) -> None:
        # Celery has no bulk publish: one producer, one publish per message (no per-call pool checkout)
        for _ in range(n):
            noop.apply_async(producer=self.producer)

    def enqueue_probe(self, seq: int) -> None:
        probe_start.delay(seq)

    def enqueue_sleepers(self, seqs: Sequence[int]) -> None:
        for seq in seqs:
            sleeper.apply_async((seq,), producer=self.producer)

    def close_client(self) -> None:
        if getattr(self, "producer_cm", None) is not None:
            self.producer_cm.__exit__(None, None, None)

    def describe(self) -> str:
        return f"celery {version('celery')} (kombu {version('kombu')}) · Redis broker · --pool {POOL} -c C"
