"""Flow-control figures on one store: claim throughput with a concurrency limit in force versus without, the
cost of a claim behind a saturated limit as the backlog grows, and scheduler lag (intended fire time →
start) for an every-second schedule.

    .venv/bin/python -m bench.limits --url sqlite:////tmp/limits.db
    .venv/bin/python -m bench.limits --url postgresql://postgres@127.0.0.1/bench_limits

Workers are real `runlane worker` processes. Lag is measured with the store's timestamps: the attempt's
`started_at` minus the run's intended fire time (`not_before`).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from bench.runlane_bench import fresh_store
from bench.runlane_bench import workers as runlane_workers
from runlane import RunFilter, Runlane, RunStatus
from runlane.limits import JobLimits
from runlane.store import Finish, create_store

ROOT = Path(__file__).resolve().parent.parent

drain_app = Runlane()


@drain_app.job
def noop(n: int) -> None:
    """Unlimited."""


@drain_app.job(max_concurrency=8)
def capped(n: int) -> None:
    """At most 8 running at once across all workers."""


cron_app = Runlane()


@cron_app.job(schedule="* * * * * *", overlap="allow")
def tick() -> None:
    """Every second."""


def fresh(url: str, app: Runlane) -> None:
    fresh_store(url, app)


@contextmanager
def workers(url: str, target: str, processes: int, concurrency: int) -> Iterator[None]:
    with runlane_workers(url, processes, concurrency, target=target):
        yield


def drain(url: str, job: str, runs: int, processes: int, concurrency: int) -> float:
    """Runs per second to drain ``runs`` no-op runs of ``job`` that were all enqueued beforehand."""
    fresh(url, drain_app)
    app = Runlane(url)
    app.jobs.update(drain_app.jobs)
    client = app.client
    for start in range(0, runs, 5000):
        client.trigger_many(job, [{"n": n} for n in range(start, min(runs, start + 5000))])
    started = time.perf_counter()
    with workers(url, "bench.limits:drain_app", processes, concurrency):
        while any(q.pending or q.running for q in client.queues()):  # cheap: active counts only
            time.sleep(0.1)
        elapsed = time.perf_counter() - started
    app.close()
    return runs / elapsed


def backlog_claims(url: str, pending: int, samples: int = 20) -> tuple[float, float]:
    """p50 in ms of a claim that finds the limit saturated, and of one that fills the slots two finished
    runs freed, with ``pending`` runs of the limited job waiting (the store's claim, in-process)."""
    fresh(url, drain_app)
    app = Runlane(url)
    app.jobs.update(drain_app.jobs)
    for start in range(0, pending, 5000):
        app.client.trigger_many("capped", [{"n": n} for n in range(start, min(pending, start + 5000))])
    app.close()

    async def measure() -> tuple[float, float]:
        store = create_store(url)
        await store.open()
        try:
            await store.register_limits([JobLimits("capped", max_concurrency=8)], [])
            claim = partial(store.claim, queues=["default"], jobs=["capped"], lease_timeout=60.0)
            held = await claim("w1", limit=8)
            saturated, filling = [], []
            for _ in range(samples):
                started = time.perf_counter()
                assert await claim("w2", limit=4) == []
                saturated.append(time.perf_counter() - started)
            for _ in range(samples):
                done, held = held[:2], held[2:]
                await store.finish_attempts(
                    [Finish(r.id, r.attempt, "succeeded") for r in done], worker_id="w1"
                )
                started = time.perf_counter()
                held += await claim("w1", limit=4)
                filling.append(time.perf_counter() - started)
            return statistics.median(saturated) * 1000, statistics.median(filling) * 1000
        finally:
            await store.close()

    return asyncio.run(measure())


def lag(url: str, seconds: float, processes: int) -> tuple[float, float, int]:
    """p50 and p99 of fire → start, in ms, for an every-second schedule over ``seconds``."""
    fresh(url, cron_app)
    app = Runlane(url)
    with workers(url, "bench.limits:cron_app", processes, 4):
        time.sleep(seconds)
    client = app.client
    lags = []
    for run in client.list_runs(RunFilter(schedule_id="tick", status=RunStatus.SUCCEEDED), limit=None):
        attempts = client.attempts(run.id)
        if attempts and run.not_before is not None:
            lags.append((attempts[0].started_at - run.not_before).total_seconds() * 1000)
    app.close()
    lags.sort()
    if not lags:
        return float("nan"), float("nan"), 0
    return statistics.median(lags), lags[min(len(lags) - 1, int(len(lags) * 0.99))], len(lags)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--lag-seconds", type=float, default=30.0)
    parser.add_argument("--backlog", type=int, nargs="*", default=[5_000, 50_000])
    args = parser.parse_args()
    for job in ("noop", "capped"):
        rate = drain(args.url, job, args.runs, args.processes, args.concurrency)
        label = "max_concurrency=8" if job == "capped" else "no limit"
        print(
            f"drain {args.runs} no-op runs, {args.processes}x{args.concurrency} workers, {label}: {rate:,.0f} runs/s"
        )
    for pending in args.backlog:
        saturated, filling = backlog_claims(args.url, pending)
        print(
            f"claim behind max_concurrency=8 with {pending:,} runs pending: saturated {saturated:.2f} ms,"
            f" filling two slots {filling:.2f} ms (p50)"
        )
    p50, p99, n = lag(args.url, args.lag_seconds, args.processes)
    print(
        f"every-second schedule, {args.processes} workers, {n} fires: lag p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    )


if __name__ == "__main__":
    main()
