"""What one drained run costs, worker and server apart: the figures behind bench/RESULTS.md "What a run costs".

    .venv-bench/bin/python -m bench.drain_costs --url postgresql://postgres@127.0.0.1/bench_costs --runs 20000
    .venv-bench/bin/python -m bench.drain_costs --url postgresql://postgres@127.0.0.1/bench_costs --replay
    .venv-bench/bin/python -m bench.drain_costs --url sqlite:////tmp/rlbench/costs.db --prefetch 0

Default mode: a burst worker in this process drains ``--runs`` pre-enqueued no-op runs; prints runs/s, the
worker process's CPU per run (``getrusage``) and, on PostgreSQL, the CPU of the database's backends per run
(``/proc/<pid>/stat`` of the server processes connected to this database, read before they disconnect).
``--replay``: no worker at all, only the worker's flights (finish ``--batch`` runs and claim as many, one
transaction each) from one store, with the time per flight along the drain: the store's own floor. The
database is dropped and recreated first (like every bench script).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import time

from bench.runlane_bench import fresh_store
from runlane import Retry, Run, Runlane
from runlane.store import Finish, Store


def backend_cpu(database: str) -> float:
    """CPU seconds used so far by the PostgreSQL server processes connected to ``database`` (Linux)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ")  # a backend's title: "postgres: … user db host state"
            if not title.startswith(b"postgres:") or f" {database} ".encode() not in title:
                continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            continue
    return total / os.sysconf("SC_CLK_TCK")


def make_app(url: str, prefetch: int | None) -> Runlane:
    app = Runlane(url, prefetch=prefetch)

    @app.job(retry=Retry(attempts=1))
    async def noop() -> None: ...

    return app


async def drain(app: Runlane, runs: int, concurrency: int, database: str | None) -> None:
    await app.async_client.trigger_many("noop", [{} for _ in range(runs)])
    worker = app.worker(concurrency=concurrency, burst=True)
    server0 = backend_cpu(database) if database else 0.0
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    await worker.run()
    elapsed = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    server = backend_cpu(database) - server0 if database else None
    cpu = usage1.ru_utime - usage0.ru_utime + usage1.ru_stime - usage0.ru_stime
    print(f"{runs / elapsed:,.0f} runs/s; worker CPU {1e6 * cpu / runs:.0f} us/run", end="")
    print(f"; server CPU {1e6 * server / runs:.0f} us/run" if server is not None else "")


async def first_claim(store: Store, batch: int) -> list[Run]:
    """Register the replay's worker and claim its first ``batch`` runs of job ``noop``."""
    await store.register_worker("replay", {})
    return await store.claim("replay", queues=["default"], jobs=["noop"], limit=batch, lease_timeout=60.0)


async def replay_flights(store: Store, claimed: list[Run], batch: int) -> list[tuple[int, float]]:
    """Finish the claimed runs and claim as many in one flight, until none is left: each flight's finished
    runs and seconds."""
    flights: list[tuple[int, float]] = []
    while claimed:
        finishes = [Finish(r.id, r.attempt, "succeeded") for r in claimed]
        start = time.perf_counter()
        _, claimed = await store.finish_and_claim(
            finishes, worker_id="replay", queues=["default"], jobs=["noop"], limit=batch, lease_timeout=60.0
        )
        flights.append((len(finishes), time.perf_counter() - start))
    return flights


async def replay(app: Runlane, runs: int, batch: int, database: str | None) -> None:
    await app.async_client.trigger_many("noop", [{} for _ in range(runs)])
    store = await app.open_store()
    claimed = await first_claim(store, batch)
    server0 = backend_cpu(database) if database else 0.0
    t0 = time.perf_counter()
    flights = [seconds for _, seconds in await replay_flights(store, claimed, batch)]
    elapsed = time.perf_counter() - t0
    server = backend_cpu(database) - server0 if database else None
    fifth = max(len(flights) // 5, 1)
    along = [
        1000 * sum(flights[i : i + fifth]) / len(flights[i : i + fifth]) for i in range(0, fifth * 5, fifth)
    ]
    print(
        f"{runs / elapsed:,.0f} runs/s; {1000 * elapsed / len(flights):.2f} ms per flight of {batch}", end=""
    )
    print(f"; server CPU {1e6 * server / runs:.0f} us/run" if server is not None else "")
    print("ms per flight, by fifth of the drain:", " ".join(f"{x:.2f}" for x in along))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prefetch", type=int, default=None, help="the worker setting (default: Runlane's)")
    parser.add_argument("--replay", action="store_true", help="the store's flights alone, no worker")
    parser.add_argument("--batch", type=int, default=16, help="runs per flight with --replay")
    args = parser.parse_args()
    fresh_store(args.url, make_app(args.url, None))
    database = args.url.rpartition("/")[2] if args.url.startswith("postgresql") else None
    app = make_app(args.url, args.prefetch)

    async def go() -> None:
        try:
            if args.replay:
                await replay(app, args.runs, args.batch, database)
            else:
                await drain(app, args.runs, args.concurrency, database)
        finally:
            await app.aclose()

    asyncio.run(go())


if __name__ == "__main__":
    main()
