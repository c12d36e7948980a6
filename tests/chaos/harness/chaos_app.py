"""The app every chaos worker process runs (``runlane worker harness.chaos_app:app``).

Its store URL and timing settings come from ``RUNLANE_*`` variables and its ledger from ``CHAOS_LEDGER``, set
by the test that starts the process. Every job body writes its execution to the ledger before doing anything.
"""

from __future__ import annotations

import asyncio
import os
import time
from functools import cache

from harness import fires, frozen, skew, sqlite_audit
from harness.ledger import Ledger
from runlane import JobContext, Retry, Runlane

skew.install_from_env()  # T13: this process's wall clock, shifted (before anything reads it)
sqlite_audit.install_from_env()  # T22: audit this worker's SQLite transactions when asked to
fires.install_crash_hook_from_env()  # T12: crash at a step of the fire path when asked to
fires.install_plan_recorder_from_env()  # T12/T13: record each scheduler pass's clock and plan
frozen.install_from_env()  # T06: a worker whose heartbeats never happen
app = Runlane()
app.queue("limited_q", max_concurrency=10)

PROBE_RETRY = Retry(attempts=10, backoff=0.2, max_delay=1.0)


@cache
def ledger() -> Ledger:
    return Ledger.from_env()


def _open(ctx: JobContext, key: str | None) -> int:
    scheduled = ctx.scheduled_at.timestamp() if ctx.scheduled_at is not None else None
    return ledger().start(
        run_id=ctx.run_id,
        attempt=ctx.attempt,
        job=ctx.job,
        key=key,
        worker_id=ctx.run.worker_id,
        scheduled_at=scheduled,
    )


def _sleep_honouring_cancel(ctx: JobContext, key: str, duration_ms: int) -> str:
    execution = _open(ctx, key)
    deadline = time.monotonic() + duration_ms / 1000
    while (left := deadline - time.monotonic()) > 0:
        if ctx.cancelled:
            ledger().end(execution, "cancelled")
            ctx.raise_if_cancelled()
        time.sleep(min(left, 0.02))
    ledger().end(execution, "done")
    return key


async def _async_sleep(ctx: JobContext, key: str, duration_ms: int) -> str:
    execution = _open(ctx, key)
    try:
        await asyncio.sleep(duration_ms / 1000)
    except asyncio.CancelledError:
        ledger().end(execution, "cancelled")
        raise
    ledger().end(execution, "done")
    return key


@app.job(retry=PROBE_RETRY)
def ledger_probe(key: str, duration_ms: int, ctx: JobContext) -> str:
    return _sleep_honouring_cancel(ctx, key, duration_ms)


@app.job(retry=PROBE_RETRY)
async def ledger_probe_async(key: str, duration_ms: int, ctx: JobContext) -> str:
    return await _async_sleep(ctx, key, duration_ms)


@app.job(retry=PROBE_RETRY, queue="fast")
async def fast_probe(key: str, duration_ms: int, ctx: JobContext) -> str:
    """Short runs in a queue of their own, no limits: workers of that queue claim ahead (prefetch)."""
    return await _async_sleep(ctx, key, duration_ms)


@app.job(retry=PROBE_RETRY, max_concurrency=5)
def limited_probe(key: str, duration_ms: int, ctx: JobContext) -> str:
    return _sleep_honouring_cancel(ctx, key, duration_ms)


@app.job(retry=PROBE_RETRY, max_concurrency=1)
def solo_probe(key: str, duration_ms: int, ctx: JobContext) -> str:
    return _sleep_honouring_cancel(ctx, key, duration_ms)


@app.job(retry=PROBE_RETRY, queue="limited_q")
def queued_probe(key: str, duration_ms: int, ctx: JobContext) -> str:
    return _sleep_honouring_cancel(ctx, key, duration_ms)


@app.job(retry=PROBE_RETRY, rate_limit="50/s")
def rated_probe(key: str, duration_ms: int, ctx: JobContext) -> str:
    return _sleep_honouring_cancel(ctx, key, duration_ms)


@app.job(retry=Retry(attempts=3, backoff=0.2, max_delay=1.0))
def crash_probe(key: str, ctx: JobContext) -> None:
    """Poison: takes its whole worker process down."""
    _open(ctx, key)
    os._exit(137)


def _spin(ctx: JobContext, key: str, duration_ms: int) -> str:
    execution = _open(ctx, key)
    deadline = time.monotonic() + duration_ms / 1000
    n = 0
    while time.monotonic() < deadline:
        n += sum(i * i for i in range(2000))
    ledger().end(execution, "done")
    return key


@app.job(retry=PROBE_RETRY, executor="process")
def spin_probe(key: str, duration_ms: int, ctx: JobContext) -> str:
    """CPU-bound, in a job process (the executor for CPU-bound sync jobs): its GIL is not the worker's."""
    return _spin(ctx, key, duration_ms)


@app.job(retry=PROBE_RETRY)
def spin_thread_probe(key: str, duration_ms: int, ctx: JobContext) -> str:
    """CPU-bound in a worker thread: holds the worker's GIL in bursts for the whole duration."""
    return _spin(ctx, key, duration_ms)


@app.job(retry=PROBE_RETRY, queue="blocking")  # its own queue: one per worker, or they run in series
async def block_loop_probe(key: str, duration_ms: int, ctx: JobContext) -> str:
    """Blocks the worker's event loop (a badly written async job): heartbeats must not depend on the loop."""
    execution = _open(ctx, key)
    time.sleep(duration_ms / 1000)  # noqa: ASYNC251 - the fault under test
    ledger().end(execution, "done")
    return key


@app.job(retry=Retry(attempts=1))
def tick(ctx: JobContext) -> None:
    """Fired by schedules: the ledger keeps the intended fire time."""
    execution = _open(ctx, ctx.run.schedule_id)
    ledger().end(execution, "done")


@app.job(retry=Retry(attempts=1))
def slow_tick(duration_ms: int, ctx: JobContext) -> None:
    """Fired by a schedule whose runs outlive its interval: overlap ``skip`` must record skipped fires."""
    execution = _open(ctx, ctx.run.schedule_id)
    deadline = time.monotonic() + duration_ms / 1000
    while (left := deadline - time.monotonic()) > 0 and not ctx.cancelled:
        time.sleep(min(left, 0.02))
    ledger().end(execution, "cancelled" if ctx.cancelled else "done")


@app.job(retry=PROBE_RETRY)
def progress_probe(key: str, duration_ms: int, ctx: JobContext) -> str:
    """Reports progress every 50 ms, naming its attempt: a stale attempt's late writes are recognisable."""
    execution = _open(ctx, key)
    deadline = time.monotonic() + duration_ms / 1000
    started = time.monotonic()
    while (left := deadline - time.monotonic()) > 0:
        if ctx.cancelled:
            ledger().end(execution, "cancelled")
            ctx.raise_if_cancelled()
        elapsed = time.monotonic() - started
        ctx.progress(min(99.0, 100 * elapsed * 1000 / duration_ms), f"attempt {ctx.attempt}")
        time.sleep(min(left, 0.05))
    ledger().end(execution, "done")
    return key


@app.job(retry=Retry(attempts=5, backoff=30.0, max_delay=60.0))
def fail_probe(key: str, ctx: JobContext) -> None:
    """Fails at once and waits long before its next attempt: a run that sits in ``retrying``."""
    execution = _open(ctx, key)
    ledger().end(execution, "failed")
    raise RuntimeError(f"{key} fails on purpose")
