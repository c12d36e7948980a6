"""Claiming ahead (prefetch): a busy worker leases a few more runs than it has free slots, so that it executes
runs while its next claim is at the store. Runs claimed ahead never run beyond the concurrency, are handed
back unstarted at shutdown (no attempt used), and can be cancelled while they wait."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from runlane import Run, RunFilter, Runlane, RunStatus
from runlane.worker.worker import Worker

T = TypeVar("T")


async def _leased(app: Runlane, worker: Worker) -> set[int]:
    runs = app.async_client.list_runs(RunFilter(status=RunStatus.RUNNING), limit=None)
    return {r.id async for r in runs if r.worker_id == worker.id}


async def _until(read: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float = 30.0) -> None:
    """Poll ``read`` until ``done`` says yes (the store has no notification for these states)."""
    async with asyncio.timeout(timeout):
        while True:
            if done(await read()):
                return
            await asyncio.sleep(0.02)


def _active_ids(worker: Worker) -> Callable[[], Awaitable[list[int]]]:
    async def read() -> list[int]:
        return worker.active_run_ids

    return read


async def _warm_up(app: Runlane, job: Any, n: int = 20) -> None:
    """Short runs first: the worker sizes its prefetch from how long bodies and claims took so far."""
    runs = await app.async_client.trigger_many(job, [{} for _ in range(n)])
    for run in runs:
        await app.async_client.wait(run.id, timeout=30)


async def test_a_busy_worker_claims_ahead_but_never_runs_more_than_its_concurrency(app: Runlane) -> None:
    running = 0
    most_running = 0
    most_leased = 0
    worker = app.worker(concurrency=2, burst=True)

    @app.job
    async def short() -> None:
        nonlocal running, most_running, most_leased
        running += 1
        most_running = max(most_running, running)
        most_leased = max(most_leased, len(worker.active_run_ids))
        await asyncio.sleep(0)
        running -= 1

    runs = await app.async_client.trigger_many(short, [{} for _ in range(300)])
    await asyncio.wait_for(worker.run(), 120)
    assert most_running <= 2
    assert most_leased > 2  # runs waited, claimed, for a slot
    done = app.async_client.list_runs(RunFilter(status=RunStatus.SUCCEEDED), limit=None)
    assert {r.id async for r in done} == {r.id for r in runs}
    for run in runs[:20]:
        (attempt,) = await app.async_client.attempts(run.id)
        assert attempt.status is RunStatus.SUCCEEDED


def test_prefetch_covers_the_starts_of_a_few_claim_round_trips(app: Runlane) -> None:
    """A slot freed just after a flight left waits for it and for the next: claiming ahead only what one
    round trip starts left most freed slots of 50 ms runs waiting (w5 ~0.1 s over its ideal 2 s)."""
    worker = app.worker(concurrency=50)
    worker._body_time, worker._claim_time = 1 / 16, 1 / 512  # 62.5 ms bodies, ~2 ms claims (exact floats)
    assert worker._prefetch() == 4  # 50 slots start ~1.6 runs per round trip: 3 round trips' worth
    worker._body_time = 1.0
    assert worker._prefetch() == 0  # long bodies stay claimable by idle workers
    worker._body_time = 1e-5
    assert worker._prefetch() == 8 * 50  # no-op bodies: the bound


@dataclass
class Blocked:
    """A worker of concurrency 1 whose one slot a blocking run holds, after short runs sized its prefetch."""

    app: Runlane
    worker: Worker
    block: Run
    executed: list[int] = field(default_factory=list)  # what `later` runs executed

    async def stop(self) -> None:
        """Stop the worker gracefully now (leaving the block stops it again: a no-op)."""
        await self.worker.__aexit__(None, None, None)


@contextlib.asynccontextmanager
async def blocked_worker(make_app: Any, *, limited: bool = False, **settings: Any) -> AsyncIterator[Blocked]:
    app = make_app(shutdown_timeout=0.2, **settings)
    await app.migrate()
    started = asyncio.Event()
    executed: list[int] = []

    @app.job
    async def quick() -> None: ...

    @app.job
    async def blocker() -> None:
        started.set()
        await asyncio.sleep(3600)

    @app.job
    async def later(n: int) -> None:
        executed.append(n)

    if limited:

        @app.job(max_concurrency=5)
        async def limited_job() -> None: ...

    try:
        worker = app.worker(concurrency=1)
        async with worker:
            await _warm_up(app, quick)
            block = await app.async_client.trigger(blocker)
            await asyncio.wait_for(started.wait(), 30)
            yield Blocked(app, worker, block, executed)
    finally:
        await app.async_client.aclose()
        await app.aclose()


async def test_runs_claimed_ahead_go_back_unstarted_at_shutdown(make_app: Any) -> None:
    async with blocked_worker(make_app) as scene:
        client = scene.app.async_client
        waiting = await client.trigger_many("later", [{"n": n} for n in range(3)])
        ids = {r.id for r in waiting}
        await _until(lambda: _leased(scene.app, scene.worker), lambda leased: bool(leased & ids))
        await scene.stop()
        assert scene.executed == []
        for run in [scene.block, *waiting]:
            back = await client.get_run(run.id)
            assert back is not None
            assert (back.status, back.attempt) == (RunStatus.PENDING, 0)
            assert await client.attempts(run.id) == []


@pytest.mark.parametrize("why", ["prefetch=0", "limits"])
async def test_without_prefetch_a_worker_claims_only_free_slots(make_app: Any, why: str) -> None:
    """``prefetch=0``, or a limit on one of the worker's jobs: a run claimed ahead would hold a limit slot
    while it waits for one of the worker's."""
    settings: dict[str, Any] = {"prefetch": 0} if why == "prefetch=0" else {"limited": True}
    async with blocked_worker(make_app, **settings) as scene:
        client = scene.app.async_client
        others = await client.trigger_many("later", [{"n": n} for n in range(3)])
        # The slot is taken and nothing may be claimed ahead: no claim is made until the blocker ends. (The
        # pause only gives a wrong claim time to happen; it cannot fail a correct worker. With prefetch the
        # same scene leases them within milliseconds: the test above.)
        await asyncio.sleep(0.3)
        assert await _leased(scene.app, scene.worker) == {scene.block.id}
        assert scene.worker.active_run_ids == [scene.block.id]
        await scene.stop()
        assert scene.executed == []
        for run in others:
            back = await client.get_run(run.id)
            assert back is not None
            assert (back.status, back.attempt) == (RunStatus.PENDING, 0)
            assert await client.attempts(run.id) == []


async def test_a_run_cancelled_while_claimed_ahead_never_starts(make_app: Any) -> None:
    async with blocked_worker(make_app) as scene:
        client = scene.app.async_client
        (waiting,) = await client.trigger_many("later", [{"n": 1}])
        await _until(lambda: _leased(scene.app, scene.worker), lambda leased: waiting.id in leased)
        assert await client.cancel(waiting.id)
        await _until(_active_ids(scene.worker), lambda active: waiting.id not in active)
        await scene.stop()
        assert scene.executed == []
        back = await client.get_run(waiting.id)
        assert back is not None and back.status is RunStatus.CANCELLED
