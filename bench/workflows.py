"""Workflow figures on one store: a batch of 10,000 no-op children (time to create, time to drain) and a
stream of 10,000 items (items/s end to end, first-item latency).

    .venv/bin/python -m bench.workflows --url sqlite:///bench-wf.db
    .venv/bin/python -m bench.workflows --url postgresql://postgres@127.0.0.1/bench_wf

The worker runs in process, on the same event loop as the client (one process, as a small deployment would
run a web app and a worker separately: this measures the store and the code paths, not process fan-out).
The store is recreated first. Figures vary with machine noise: run several times and read the spread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from runlane import Runlane


def fresh_store(url: str) -> None:
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    import psycopg

    base, _, name = url.rpartition("/")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def make_app(url: str) -> Runlane:
    app = Runlane(url, poll_interval=1.0, progress_flush_interval=0.05)

    @app.job
    async def noop(i: int) -> int:
        return i

    @app.job
    async def produce(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
            if i % 100 == 0:
                await asyncio.sleep(0)  # a real producer awaits something now and then

    return app


async def batch_figures(app: Runlane, children: int, concurrency: int) -> dict[str, float]:
    client = app.async_client
    started = time.perf_counter()
    batch = await client.trigger_batch("noop", [{"i": i} for i in range(children)])
    created = time.perf_counter() - started
    started = time.perf_counter()
    async with app.worker(concurrency=concurrency):
        done = 0
        async for _ in client.wait_each(batch.id):
            done += 1
    drained = time.perf_counter() - started
    assert done == children, done
    return {
        "batch_children": children,
        "batch_create_s": round(created, 3),
        "batch_create_per_s": round(children / created),
        "batch_drain_s": round(drained, 3),
        "batch_drain_per_s": round(children / drained),
    }


async def stream_figures(app: Runlane, items: int) -> dict[str, float]:
    client = app.async_client
    async with app.worker():
        started = time.perf_counter()
        first: float | None = None
        count = 0
        async for _ in client.stream("produce", {"n": items}):
            if first is None:
                first = time.perf_counter() - started
            count += 1
        elapsed = time.perf_counter() - started
    assert count == items, count
    return {
        "stream_items": items,
        "stream_s": round(elapsed, 3),
        "stream_items_per_s": round(items / elapsed),
        "stream_first_item_ms": round((first or 0.0) * 1000, 1),
    }


async def main(url: str, children: int, items: int, concurrency: int) -> dict[str, float]:
    fresh_store(url)
    app = make_app(url)
    await app.migrate()
    try:
        figures = {**await batch_figures(app, children, concurrency), **await stream_figures(app, items)}
    finally:
        await app.async_client.aclose()
        await app.aclose()
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="sqlite:///bench-wf.db")
    parser.add_argument("--children", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    result = asyncio.run(main(args.url, args.children, args.items, args.concurrency))
    print(json.dumps({"url": args.url.split("@")[-1], **result}))
