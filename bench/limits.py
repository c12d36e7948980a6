"""Flow-control figures on one store: claim throughput with a concurrency limit in force versus without, and
scheduler lag (intended fire time → start) for an every-second schedule.

    .venv/bin/python -m bench.limits --url sqlite:////tmp/limits.db
    .venv/bin/python -m bench.limits --url postgresql://postgres@127.0.0.1/bench_limits

Workers are real `runlane worker` processes. Lag is measured with the store's timestamps: the attempt's
`started_at` minus the run's intended fire time (`not_before`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.runlane_bench import fresh_store
from bench.runlane_bench import workers as runlane_workers
from runlane import RunFilter, Runlane, RunStatus

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
    args = parser.parse_args()
    for job in ("noop", "capped"):
        rate = drain(args.url, job, args.runs, args.processes, args.concurrency)
        label = "max_concurrency=8" if job == "capped" else "no limit"
        print(
            f"drain {args.runs} no-op runs, {args.processes}x{args.concurrency} workers, {label}: {rate:,.0f} runs/s"
        )
    p50, p99, n = lag(args.url, args.lag_seconds, args.processes)
    print(
        f"every-second schedule, {args.processes} workers, {n} fires: lag p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    )


if __name__ == "__main__":
    main()
