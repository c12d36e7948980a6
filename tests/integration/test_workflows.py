"""Workflows end to end on every store: run trees, batches, streams, continuations, inputs, and which calls
own what they start (cancelling the caller cancels it) versus only observe."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from runlane import (
    BatchFailed,
    BatchItem,
    BatchNotFound,
    InvalidArguments,
    JobContext,
    Retry,
    RunCancelled,
    RunFailed,
    RunFilter,
    RunFinished,
    Runlane,
    RunNotFound,
    RunStatus,
)
from runlane.client import AsyncClient
from runlane.testing import drain

ONCE = Retry(attempts=1)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    """Wait until ``check()`` holds (for conditions that have no event to wait on)."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.01)


async def collect_into(items: AsyncIterator[Any], into: list[Any]) -> None:
    async for item in items:
        into.append(item)


async def runs_of(client: AsyncClient, **filters: Any) -> list[Any]:
    return [run async for run in client.list_runs(RunFilter(**filters), limit=None)]


# -- run trees and cascades -------------------------------------------------------------------------------------


async def test_runs_triggered_from_jobs_form_a_tree(app: Runlane, client: AsyncClient) -> None:
    @app.job
    async def leaf(n: int) -> int:
        return n * 2

    @app.job
    def middle(n: int, ctx: JobContext) -> int:  # a sync job waits for its child through the blocking client
        return int(ctx.client.run(leaf, {"n": n})) + 1

    @app.job
    async def top(ctx: JobContext) -> list[int]:
        return [await ctx.async_client.run(middle, {"n": i}) for i in range(2)]

    async with app.worker(concurrency=8):
        root = await client.trigger(top)
        assert await client.result(root.id, timeout=30) == [1, 3]
    middles = await runs_of(client, parent_run_id=root.id)
    assert sorted(r.job for r in middles) == ["middle", "middle"]
    leaf_run = (await runs_of(client, parent_run_id=middles[0].id))[0]
    tree = await client.tree(leaf_run.id)  # any member gives the whole tree of its root
    assert tree.run.id == root.id
    assert [(depth, run.job) for depth, run in tree.walk()] == [
        (0, "top"),
        (1, "middle"),
        (2, "leaf"),
        (1, "middle"),
        (2, "leaf"),
    ]
    assert {run.root_run_id for _, run in tree.walk()} == {root.id}
    assert len(tree) == 5 and tree.find(leaf_run.id) is not None
    with pytest.raises(RunNotFound):
        await client.tree(987654)


async def test_cancel_cascades_and_lets_continuations_decide(app: Runlane, client: AsyncClient) -> None:
    running = 0
    all_running = asyncio.Event()

    @app.job
    async def sleeper() -> None:
        nonlocal running
        running += 1
        if running == 3:
            all_running.set()
        await asyncio.sleep(3600)

    @app.job
    async def fan(ctx: JobContext) -> None:
        for _ in range(3):
            await ctx.async_client.trigger(sleeper)
        await asyncio.sleep(3600)

    @app.job
    async def cleanup() -> str:
        return "cleaned"

    async with app.worker(concurrency=8):
        root = await client.trigger(fan)
        on_cancel = await client.continue_with(root.id, cleanup, when="cancelled")
        on_success = await client.continue_with(root.id, cleanup)
        async with asyncio.timeout(30):
            await all_running.wait()
        assert await client.cancel(root.id)
        for child in await runs_of(client, parent_run_id=root.id, job="sleeper"):
            done = await client.wait(child.id, timeout=30)
            assert done.status is RunStatus.CANCELLED
            assert done.error is not None and "cascade" in done.error.message
        assert await client.result(on_cancel.id, timeout=30) == "cleaned"
        with pytest.raises(RunCancelled, match="runs when succeeded"):
            await client.result(on_success.id, timeout=30)
        assert not await client.cancel(root.id)


# -- batches ----------------------------------------------------------------------------------------------------


async def test_run_batch_returns_results_in_input_order(app: Runlane, client: AsyncClient) -> None:
    @app.job
    async def square(x: int) -> int:
        await asyncio.sleep(0.001 * (10 - x))  # later inputs tend to finish first
        return x * x

    @app.job
    def shout(s: str) -> str:
        return s.upper()

    async with app.worker(concurrency=10):
        assert await client.run_batch(square, [{"x": i} for i in range(10)]) == [i * i for i in range(10)]
        assert await client.run_batch([BatchItem(square, {"x": 3}), BatchItem("shout", {"s": "hi"})]) == [
            9,
            "HI",
        ]
        assert await client.run_batch(square, []) == []
    children = await runs_of(client, job="square")
    batch_ids = {r.batch_id for r in children}
    assert None not in batch_ids and len(batch_ids) == 2
    for batch_id in batch_ids:
        batch = await client.get_batch(batch_id)
        assert batch is not None and batch.is_finished and batch.status is RunStatus.SUCCEEDED
    with pytest.raises(InvalidArguments):
        await client.run_batch(square, [{"x": "not a number"}])
    with pytest.raises(InvalidArguments):
        await client.run_batch(square)  # type: ignore[call-overload]


async def test_run_batch_raises_batch_failed_after_all_children_end(
    app: Runlane, client: AsyncClient
) -> None:
    @app.job(retry=ONCE)
    async def picky(x: int) -> int:
        if x % 3 == 0:
            raise ValueError(f"no {x}")
        return x

    async with app.worker(concurrency=4):
        with pytest.raises(BatchFailed) as info:
            await client.run_batch(picky, [{"x": i} for i in range(7)])
    failures = info.value.exceptions
    assert [e.run.args["x"] for e in failures] == [0, 3, 6]
    assert all(isinstance(e, RunFailed) and e.error and e.error.type == "ValueError" for e in failures)
    batch = await client.get_batch(failures[0].run.batch_id or 0)
    assert batch is not None and batch.is_finished  # raised only once every child had ended
    assert (batch.counts[RunStatus.SUCCEEDED], batch.counts[RunStatus.FAILED]) == (4, 3)
    assert batch.status is RunStatus.FAILED


async def test_stream_batch_yields_as_children_finish_and_fails_fast(
    app: Runlane, client: AsyncClient
) -> None:
    gate = asyncio.Event()

    @app.job(retry=ONCE)
    async def gated(x: int) -> int:
        if x == 0:
            raise ValueError("first one breaks")
        await gate.wait()
        return x

    @app.job
    async def quick(x: int) -> int:
        return x

    async with app.worker(concurrency=8):
        assert sorted([r async for r in client.stream_batch(quick, [{"x": i} for i in range(5)])]) == list(
            range(5)
        )
        seen: list[int] = []
        with pytest.raises(RunFailed, match="first one breaks") as info:
            await collect_into(client.stream_batch(gated, [{"x": i} for i in range(4)]), seen)
        assert seen == []
        batch_id = info.value.run.batch_id
        assert batch_id is not None
        gate.set()  # fail-fast did not cancel the others: they finish
        ended = [run async for run in client.wait_each(batch_id)]
    assert sorted((r.args["x"], r.status.value) for r in ended) == [
        (0, "failed"),
        (1, "succeeded"),
        (2, "succeeded"),
        (3, "succeeded"),
    ]


async def test_trigger_batch_wait_each_and_cancel_batch(app: Runlane, client: AsyncClient) -> None:
    @app.job
    async def noop(i: int) -> int:
        return i

    batch = await client.trigger_batch(noop, [{"i": i} for i in range(6)], priority=3, tags=["b"])
    assert (batch.total, batch.counts[RunStatus.PENDING]) == (6, 6)
    children = await runs_of(client, batch_id=batch.id)
    assert {(r.priority, r.tags) for r in children} == {(3, ("b",))}
    await drain(app)
    ended = [run async for run in client.wait_each(batch.id)]
    assert sorted(r.result for r in ended) == list(range(6))
    second = await client.trigger_batch(noop, [{"i": i} for i in range(4)])
    assert await client.cancel_batch(second.id) == 4
    assert await client.cancel_batch(second.id) == 0
    cancelled = await client.get_batch(second.id)
    assert cancelled is not None and cancelled.counts[RunStatus.CANCELLED] == 4
    assert cancelled.status is RunStatus.CANCELLED
    with pytest.raises(BatchNotFound):
        await client.cancel_batch(987654)
    with pytest.raises(BatchNotFound):
        [run async for run in client.wait_each(987654)]
    assert await client.get_batch(987654) is None


async def test_a_batch_of_a_thousand_children(app: Runlane, client: AsyncClient) -> None:
    @app.job
    async def noop(i: int) -> int:
        return i

    async with app.worker(concurrency=32):
        results = await client.run_batch(noop, [{"i": i} for i in range(1000)])
    assert results == list(range(1000))
    child = (await runs_of(client, job="noop"))[0]
    batch = await client.get_batch(child.batch_id or 0)
    assert batch is not None
    assert (batch.total, batch.counts[RunStatus.SUCCEEDED], batch.finish_seq) == (1000, 1000, 1000)


# -- streams ----------------------------------------------------------------------------------------------------


async def test_stream_delivers_outputs_in_order_live_and_replays(app: Runlane, client: AsyncClient) -> None:
    @app.job
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
            await asyncio.sleep(0)

    @app.job
    def letters(word: str) -> Iterator[str]:
        yield from word

    @app.job
    def plain() -> int:
        return 1

    async with app.worker():
        assert [x async for x in client.stream(count, {"n": 200})] == list(range(200))
        assert [x async for x in client.stream(letters, {"word": "stream"})] == list("stream")
        with pytest.raises(InvalidArguments, match="not a streaming job"):
            [x async for x in client.stream(plain)]
    (run,) = await runs_of(client, job="count")
    assert run.result == 200  # a streaming job's result is its item count
    outputs = [e for e in [e async for e in client.events(run.id)] if e.kind == "output"]
    assert [e.data for e in outputs] == list(range(200))
    assert [x async for x in client.wait_stream(run.id, since=outputs[149].id)] == list(range(150, 200))


async def test_a_failing_streaming_job_delivers_its_items_then_raises(
    app: Runlane, client: AsyncClient
) -> None:
    @app.job(retry=ONCE)
    async def breaks() -> AsyncIterator[int]:
        for i in range(3):
            yield i
        raise ValueError("broke after three")

    got: list[int] = []
    async with app.worker():
        with pytest.raises(RunFailed, match="broke after three"):
            await collect_into(client.stream(breaks), got)
    assert got == [0, 1, 2]


# -- ownership: owners cancel what they started, observers only stop watching --------------------------------------


async def test_cancelling_the_caller_of_run_batch_or_stream_batch_cancels_the_children(
    app: Runlane, client: AsyncClient
) -> None:
    @app.job
    async def idle() -> None:
        await asyncio.sleep(3600)

    for method in (client.run_batch, client.stream_batch):

        async def call(method: Any = method) -> None:
            result = method(idle, [{}, {}, {}])
            if hasattr(result, "__aiter__"):
                async for _ in result:
                    pass
            else:
                await result

        before = {r.id for r in await runs_of(client, job="idle")}
        task = asyncio.create_task(call())

        async def created(before: set[int] = before) -> bool:
            return len({r.id for r in await runs_of(client, job="idle")} - before) == 3

        await eventually(created)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for run in await runs_of(client, job="idle"):
            assert run.id in before or run.status is RunStatus.CANCELLED


async def test_stream_owns_its_run_and_wait_stream_only_observes(app: Runlane, client: AsyncClient) -> None:
    @app.job
    async def ticker() -> AsyncIterator[int]:
        i = 0
        while True:
            yield i
            i += 1
            await asyncio.sleep(0.005)

    async with app.worker():
        # closing the stream early cancels the run it started
        stream = client.stream(ticker)
        async with contextlib.aclosing(stream):
            assert [await anext(stream) for _ in range(3)] == [0, 1, 2]
        (owned,) = await runs_of(client, job="ticker")
        assert (await client.wait(owned.id, timeout=30)).status is RunStatus.CANCELLED
        # cancelling a task that consumes a stream cancels it too
        consumer_got_items = asyncio.Event()

        async def consume(items: AsyncIterator[int]) -> None:
            async for _ in items:
                consumer_got_items.set()

        task = asyncio.create_task(consume(client.stream(ticker)))
        async with asyncio.timeout(30):
            await consumer_got_items.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        second = (await runs_of(client, job="ticker"))[0]
        assert (await client.wait(second.id, timeout=30)).status is RunStatus.CANCELLED
        # an observer that stops leaves the run running
        run = await client.trigger(ticker)
        consumer_got_items.clear()
        task = asyncio.create_task(consume(client.wait_stream(run.id)))
        async with asyncio.timeout(30):
            await consumer_got_items.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        watcher = asyncio.create_task(client.wait(run.id))
        events_task = asyncio.create_task(consume_events(client, run.id))
        await asyncio.sleep(0)
        watcher.cancel()
        events_task.cancel()
        await asyncio.gather(watcher, events_task, return_exceptions=True)
        still = await client.get_run(run.id)
        assert still is not None and still.status is RunStatus.RUNNING
        assert await client.cancel(run.id)


async def consume_events(client: AsyncClient, run_id: int) -> None:
    async for _ in client.events(run_id):
        pass


async def test_wait_each_only_observes(app: Runlane, client: AsyncClient) -> None:
    @app.job
    async def idle() -> None:
        await asyncio.sleep(3600)

    batch = await client.trigger_batch(idle, [{}, {}])
    task = asyncio.create_task(consume_runs(client.wait_each(batch.id)))
    for _ in range(5):
        await asyncio.sleep(0)  # let it start waiting
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    still = await client.get_batch(batch.id)
    assert still is not None and still.counts[RunStatus.PENDING] == 2
    assert await client.cancel_batch(batch.id) == 2


async def consume_runs(runs: AsyncIterator[Any]) -> None:
    async for _ in runs:
        pass


# -- continuations --------------------------------------------------------------------------------------------------


async def test_continuations_chain_across_workers_outcomes(app: Runlane, client: AsyncClient) -> None:
    @app.job(retry=ONCE)
    async def step(name: str, fail: bool = False) -> str:
        if fail:
            raise ValueError(name)
        return name

    first = await client.trigger(step, {"name": "a"})
    second = await client.continue_with(first.id, step, {"name": "b", "fail": True})
    on_failure = await client.continue_with(second.id, step, {"name": "c"}, when="failed")
    on_success = await client.continue_with(second.id, step, {"name": "x"})
    always = await client.continue_with(on_success.id, step, {"name": "d"}, when="finished")
    assert {second.status, on_failure.status, on_success.status, always.status} == {RunStatus.SCHEDULED}
    assert on_failure.parent_run_id == second.id and on_failure.root_run_id == first.id
    await drain(app)
    assert await client.result(first.id, timeout=30) == "a"
    with pytest.raises(RunFailed):
        await client.result(second.id, timeout=30)
    assert await client.result(on_failure.id, timeout=30) == "c"
    with pytest.raises(RunCancelled):
        await client.result(on_success.id, timeout=30)
    assert await client.result(always.id, timeout=30) == "d"  # `finished` runs after a cancelled parent too
    late = await client.continue_with(first.id, step, {"name": "late"})
    assert late.status is RunStatus.PENDING  # decided at once: the parent already succeeded
    with pytest.raises(InvalidArguments):
        await client.continue_with(first.id, step, {"name": "x"}, when="sometimes")  # type: ignore[arg-type]
    with pytest.raises(RunNotFound):
        await client.continue_with(987654, step, {"name": "x"})


# -- inputs -----------------------------------------------------------------------------------------------------


async def test_inputs_reach_async_and_sync_jobs_and_rerun_replays_them(
    app: Runlane, client: AsyncClient
) -> None:
    @app.job
    async def collect(ctx: JobContext) -> list[Any]:
        return [item async for item in ctx.inputs()]

    @app.job
    def total(ctx: JobContext) -> int:
        return sum(ctx.inputs())

    early = await client.trigger(collect)
    await client.send(early.id, {"a": 1})
    await client.send(early.id, None)
    await client.close_input(early.id)
    async with app.worker():
        assert await client.result(early.id, timeout=30) == [{"a": 1}, None]
        live = await client.trigger(total)
        for n in (1, 2, 3):
            await client.send(live.id, n)  # the job is waiting for them, or will be
        await client.close_input(live.id)
        assert await client.result(live.id, timeout=30) == 6
        again = await client.rerun(early.id)
        assert await client.result(again.id, timeout=30) == [{"a": 1}, None]
    with pytest.raises(RunFinished, match="already ended"):
        await client.send(early.id, 1)
    with pytest.raises(RunNotFound):
        await client.send(987654, 1)
    with pytest.raises(InvalidArguments):
        await client.send(again.id, object())
    inputs = [e.data for e in [e async for e in client.events(early.id)] if e.kind == "input"]
    assert inputs == [{"item": {"a": 1}}, {"item": None}, {"end": True}]


async def test_cancelling_a_run_stops_a_job_waiting_for_input(app: Runlane, client: AsyncClient) -> None:
    @app.job
    def waits(ctx: JobContext) -> int:
        return len(list(ctx.inputs()))

    async with app.worker():
        run = await client.trigger(waits)
        await client.send(run.id, 1)

        async def started() -> bool:
            current = await client.get_run(run.id)
            return current is not None and current.status is RunStatus.RUNNING

        await eventually(started)
        assert await client.cancel(run.id)
        assert (await client.wait(run.id, timeout=30)).status is RunStatus.CANCELLED
    # the worker stopped cleanly: the blocked sync job saw the cancellation and let its thread go


# -- the blocking client ------------------------------------------------------------------------------------------


def test_sync_client_workflows(store_url: str) -> None:
    app = Runlane(store_url, poll_interval=0.2, progress_flush_interval=0.05)

    @app.job
    def double(x: int) -> int:
        return 2 * x

    @app.job
    def spell(word: str) -> Iterator[str]:
        yield from word

    @app.job
    def echo(ctx: JobContext) -> list[Any]:
        return list(ctx.inputs())

    try:
        client = app.client
        client.portal.call(app.migrate())
        batch = client.trigger_batch(double, [{"x": i} for i in range(5)])
        spelled = client.trigger(spell, {"word": "abc"})
        parent = client.trigger(double, {"x": 21})
        follow = client.continue_with(parent.id, double, {"x": 1})
        fed = client.trigger(echo)
        client.send(fed.id, "in")
        client.close_input(fed.id)
        app.run_worker(burst=True)
        assert sorted(r.result for r in client.wait_each(batch.id)) == [0, 2, 4, 6, 8]
        assert client.get_batch(batch.id).is_finished  # type: ignore[union-attr]
        assert list(client.wait_stream(spelled.id)) == ["a", "b", "c"]
        assert client.result(follow.id, timeout=30) == 2
        assert client.result(fed.id, timeout=30) == ["in"]
        assert client.tree(follow.id).children[0].run.id == follow.id
        assert client.cancel_batch(batch.id) == 0
    finally:
        app.close()
