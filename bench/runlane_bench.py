"""Runlane's own figures on one store: trigger→start latency, enqueue rates, drain rates.

    .venv/bin/python -m bench.runlane_bench --url sqlite:///bench.db all
    .venv/bin/python -m bench.runlane_bench --url postgresql://postgres@127.0.0.1/bench all

Workers run as real `runlane worker` processes (so wake-ups cross processes, as in production). Latency is
measured with the store's own timestamps: claim time (`started_at`) minus insert time (`created_at`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runlane import RunFilter, Runlane, RunStatus

ROOT = Path(__file__).resolve().parent.parent


def fresh_store(url: str, jobs_from: Runlane | None = None) -> None:
    """Start from an empty store (delete the SQLite file, or recreate the PostgreSQL database), migrated and
    with the catalogue of ``jobs_from`` (default: the no-op jobs of bench.apps)."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    else:
        import psycopg

        base, _, name = url.rpartition("/")
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
    if jobs_from is None:
        from bench.apps import app as jobs_from
    migrator = Runlane(url)
    migrator.jobs.update(jobs_from.jobs)
    asyncio.run(migrator.migrate())
    asyncio.run(migrator.aclose())


@contextmanager
def workers(url: str, processes: int, concurrency: int, target: str = "bench.apps:app") -> Iterator[None]:
    """`runlane worker TARGET` processes for the duration of the block."""
    env = {**os.environ, "RUNLANE_URL": url, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "runlane", "worker", target, "--concurrency", str(concurrency)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(processes)
    ]
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def wait_until_idle_workers(app: Runlane, processes: int, timeout: float = 30) -> None:
    """Warm-up: each worker process must have claimed one run before we measure."""
    runs = app.client.trigger_many("noop", [{} for _ in range(processes * 4)])
    for run in runs:
        app.client.wait(run.id, timeout=timeout)
    time.sleep(0.5)  # let them go idle again: we measure wake-up from idle


def latency(url: str, runs: int, interval: float, processes: int) -> dict[str, float]:
    fresh_store(url)
    app = Runlane(url)
    with workers(url, processes, 16):
        wait_until_idle_workers(app, processes)
        ids = []
        for _ in range(runs):
            ids.append(app.client.trigger("noop").id)
            time.sleep(interval)
        done = [app.client.wait(i, timeout=60) for i in ids]
    app.close()
    lat = [((r.started_at - r.created_at).total_seconds()) * 1000 for r in done if r.started_at]
    return {"p50_ms": statistics.median(lat), "p95_ms": percentile(lat, 95), "p99_ms": percentile(lat, 99)}


def enqueue(url: str, single: int, bulk: int) -> dict[str, float]:
    fresh_store(url)
    app = Runlane(url)
    app.client.trigger("noop")  # open the store outside the timing
    start = time.perf_counter()
    for _ in range(single):
        app.client.trigger("noop")
    single_rate = single / (time.perf_counter() - start)
    start = time.perf_counter()
    app.client.trigger_many("noop", [{} for _ in range(bulk)])
    bulk_rate = bulk / (time.perf_counter() - start)
    app.close()
    return {"single_per_s": single_rate, "bulk_per_s": bulk_rate}


def drain(url: str, runs: int, processes: int, concurrency: int) -> dict[str, float]:
    fresh_store(url)
    app = Runlane(url)
    app.client.trigger_many("noop", [{} for _ in range(runs)])
    start = time.perf_counter()
    first_start: float | None = None
    active = RunFilter(status=(RunStatus.PENDING, RunStatus.RUNNING))
    done = RunFilter(status=RunStatus.SUCCEEDED)
    with workers(url, processes, concurrency):
        while True:
            time.sleep(0.02)
            if first_start is None and next(iter(app.client.list_runs(done, limit=1)), None):
                first_start = time.perf_counter()
            if next(iter(app.client.list_runs(active, limit=1)), None) is None:
                break
        end = time.perf_counter()
    app.close()
    steady = end - (first_start or start)
    return {"with_startup_per_s": runs / (end - start), "steady_per_s": runs / steady}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("what", choices=["latency", "enqueue", "drain", "all"])
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--latency-runs", type=int, default=300)
    parser.add_argument("--single", type=int, default=10_000)
    parser.add_argument("--bulk", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    if args.what in ("latency", "all"):
        results["latency (1 idle worker process)"] = latency(args.url, args.latency_runs, 0.02, 1)
    if args.what in ("enqueue", "all"):
        results["enqueue"] = enqueue(args.url, args.single, args.bulk)
    if args.what in ("drain", "all"):
        for processes in (1, 2):
            results[f"drain {args.runs} no-op runs, {processes} process(es)"] = drain(
                args.url, args.runs, processes, args.concurrency
            )
    for name, figures in results.items():
        print(f"{name}: " + ", ".join(f"{k}={v:,.1f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
