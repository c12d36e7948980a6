"""Runlane's benchmark jobs (imported by `runlane worker bench.systems.runlane_jobs:app`). The store URL comes
from RUNLANE_URL, set by the adapter before import."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from bench import probe
from runlane import Retry, Runlane

app = Runlane()


@app.job(retry=Retry(attempts=1))
async def noop() -> None:
    probe.done()


@app.job(retry=Retry(attempts=1))
async def probe_start(seq: int) -> None:
    probe.start(seq)


@app.job(retry=Retry(attempts=1))
async def sleeper(seq: int) -> None:
    probe.start(seq)
    await asyncio.sleep(0.05)
    probe.end(seq)


@app.job(retry=Retry(attempts=1))
async def echo() -> int:
    return 1


@app.job(retry=Retry(attempts=1))
async def items(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i
