"""A worker cut off from its store fences itself: it never starts, renews or finishes an attempt whose lease
may have passed to another worker, and it hands back runs claimed by a reply it never got. Regressions found
by the chaos tests T04, T06, T07, T08 and T19 (tests/chaos)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from runlane import JobContext, Retry, Runlane, RunStatus
from runlane.errors import StoreUnavailable
from runlane.store import Store
from runlane.worker.heartbeat import Heartbeat

LEASE = 1.0
HEARTBEAT = 0.2


async def test_a_claim_answered_after_its_lease_is_not_started(make_app: Callable[..., Runlane]) -> None:
    """T04: a claim whose reply a partition held back for a whole lease was started on arrival, although the
    run had been reclaimed and was running elsewhere: one execution too many. It is handed back instead."""
    app = make_app(lease_timeout=LEASE, heartbeat_interval=HEARTBEAT)
    calls: list[int] = []

    @app.job
    def probe(ctx: JobContext) -> int:
        calls.append(ctx.attempt)
        return ctx.attempt

    await app.migrate()
    client = app.async_client
    store: Store = await app.open_store()
    delayed = {"done": False}

    def held_back(method: Callable[..., Any]) -> Callable[..., Any]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            result = await method(*args, **kwargs)
            runs = result[1] if isinstance(result, tuple) else result
            if runs and not delayed["done"]:
                delayed["done"] = True
                await asyncio.sleep(LEASE + 0.2)  # the reply comes back after the lease ran out
            return result

        return call

    store.claim = held_back(store.claim)  # type: ignore[method-assign]
    store.finish_and_claim = held_back(store.finish_and_claim)  # type: ignore[method-assign]
    try:
        run = await client.trigger(probe)
        async with app.worker(concurrency=1):
            done = await client.wait(run.id, timeout=30)
        assert delayed["done"]
        assert done.status is RunStatus.SUCCEEDED
        assert len(calls) == 1, f"the body ran {len(calls)} times"
        assert [a.status for a in await client.attempts(run.id)][-1] is RunStatus.SUCCEEDED
    finally:
        await client.aclose()
        await app.aclose()


async def test_a_stuck_heartbeat_still_self_fences(make_app: Callable[..., Runlane]) -> None:
    """T08: a renewal stuck on a connection that neither answers nor fails (a partition) kept the heartbeat
    from self-fencing, so attempts ran on past their lease, alongside their reclaimed runs."""
    app = make_app(lease_timeout=LEASE, heartbeat_interval=HEARTBEAT)
    cancelled_after: list[float] = []
    started = threading.Event()
    fenced = threading.Event()
    stuck_since: list[float] = []

    @app.job
    def probe(ctx: JobContext) -> None:
        started.set()
        deadline = time.monotonic() + 10 * LEASE
        while time.monotonic() < deadline:
            if ctx.cancelled:
                cancelled_after.append(time.monotonic())
                fenced.set()
                return
            time.sleep(0.01)

    await app.migrate()
    client = app.async_client
    store: Store = await app.open_store()
    healed = threading.Event()
    renew = store.heartbeat_blocking

    def stuck(*args: Any, **kwargs: Any) -> set[int]:
        if started.is_set() and not healed.is_set():
            stuck_since.append(time.monotonic())
            healed.wait(30)  # the statement hangs until the network heals
        return renew(*args, **kwargs)

    check = store.held_leases

    async def stuck_check(*args: Any, **kwargs: Any) -> set[int]:
        if started.is_set() and not healed.is_set():
            await asyncio.to_thread(healed.wait, 30)  # the cancellation watch is cut off as well
        return await check(*args, **kwargs)

    store.heartbeat_blocking = stuck  # type: ignore[method-assign]
    store.held_leases = stuck_check  # type: ignore[method-assign]
    try:
        run = await client.trigger(probe)
        async with app.worker(concurrency=1) as worker:
            assert await asyncio.to_thread(started.wait, 10)
            await asyncio.to_thread(fenced.wait, 5 * LEASE)
            healed.set()
            assert cancelled_after, "the attempt kept running with its heartbeat stuck"
            # Last renewal before the hang at most one interval before it; fenced within a lease of that.
            assert cancelled_after[0] - stuck_since[0] <= LEASE + 3 * HEARTBEAT
            worker.stop()
        attempts = await client.attempts(run.id)
        assert attempts[0].status is not RunStatus.SUCCEEDED
    finally:
        healed.set()
        await client.aclose()
        await app.aclose()


async def test_a_claim_whose_reply_was_lost_is_handed_back(make_app: Callable[..., Runlane]) -> None:
    """T07: a claim that committed but whose reply a connection reset lost left its runs leased to a worker
    that never heard of them, until the reaper took them a lease later, using up an attempt."""
    app = make_app(lease_timeout=5.0)

    @app.job
    def probe() -> str:
        return "ok"

    await app.migrate()
    client = app.async_client
    store: Store = await app.open_store()
    lost = {"done": False}

    def reply_lost(method: Callable[..., Any]) -> Callable[..., Any]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            result = await method(*args, **kwargs)
            runs = result[1] if isinstance(result, tuple) else result
            if runs and not lost["done"]:
                lost["done"] = True
                raise StoreUnavailable("connection reset after the commit")
            return result

        return call

    store.claim = reply_lost(store.claim)  # type: ignore[method-assign]
    store.finish_and_claim = reply_lost(store.finish_and_claim)  # type: ignore[method-assign]
    try:
        run = await client.trigger(probe)
        started = time.monotonic()
        async with app.worker(concurrency=1):
            done = await client.wait(run.id, timeout=30)
        assert lost["done"]
        assert done.status is RunStatus.SUCCEEDED
        assert time.monotonic() - started < 5.0, "the orphaned run waited for the reaper"
        attempts = await client.attempts(run.id)
        assert [(a.number, a.status) for a in attempts] == [(1, RunStatus.SUCCEEDED)]
    finally:
        await client.aclose()
        await app.aclose()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
async def test_long_attempt_heartbeat_sync_jobs_run_nicer_than_the_worker(
    make_app: Callable[..., Runlane],
) -> None:
    """T06 (full tier): 60 CPU-bound sync jobs in each of three worker processes on two cores starved the
    heartbeats and store writes of every process on the host. Job threads now run ``job_thread_nice`` steps
    nicer than the worker's own threads, which get the CPU first (it shortens renewals; RELIABILITY.md says
    what is left)."""
    app = make_app(job_thread_nice=7)
    seen: list[tuple[int, int]] = []
    worker_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    @app.job
    def probe() -> None:
        seen.append((os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), threading.get_native_id()))

    await app.migrate()
    client = app.async_client
    try:
        run = await client.trigger(probe)
        async with app.worker(concurrency=2):
            await client.wait(run.id, timeout=30)
        assert seen and seen[0][0] == min(worker_nice + 7, 19)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == worker_nice  # the worker's own
    finally:
        await client.aclose()
        await app.aclose()


async def test_a_sync_body_whose_lease_went_stale_while_it_waited_for_a_thread_never_starts(
    make_app: Callable[..., Runlane], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (T19): a sync body queued behind busy job threads started when its stopped worker resumed,
    after its lease had gone stale. A body now starts only while its lease is younger than the heartbeat's
    fence; here every lease looks stale to the job threads, so no attempt ever starts and the reaper settles
    each one as a lost worker's."""
    app = make_app(lease_timeout=1.0, reaper_interval=0.2)
    await app.migrate()
    started: list[int] = []

    @app.job(retry=Retry(attempts=2, backoff=0.01))
    def late() -> None:
        started.append(1)

    monkeypatch.setattr(Heartbeat, "fresh", lambda self, lease: False)
    client = app.async_client
    try:
        async with app.worker(concurrency=1):
            run = await client.trigger(late)
            done = await client.wait(run.id, timeout=30)
        assert started == []
        assert done.status is RunStatus.FAILED
        attempts = await client.attempts(run.id)
        assert [a.error.type if a.error else None for a in attempts] == ["WorkerLost", "WorkerLost"]
    finally:
        await client.aclose()
        await app.aclose()
