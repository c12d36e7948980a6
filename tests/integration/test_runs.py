"""Client and worker together, in process, on every store: the life of a run."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pydantic
import pytest

from runlane import (
    InvalidArguments,
    JobContext,
    JobNotFound,
    NonRetryable,
    Retry,
    RunCancelled,
    RunConflict,
    RunFailed,
    RunFilter,
    Runlane,
    RunNotFound,
    RunStatus,
    SchemaOutdated,
)
from runlane.client import AsyncClient
from runlane.testing import FakeClock, drain


class Greeting(pydantic.BaseModel):
    name: str
    excited: bool = False


async def test_trigger_then_worker_runs_it(app: Runlane, client: AsyncClient) -> None:
    @app.job
    def add(a: int, b: int) -> int:
        return a + b

    run = await client.trigger(add, {"a": 2, "b": 3})
    assert run.status is RunStatus.PENDING
    assert (run.job, run.args, run.queue, run.attempt, run.max_attempts) == (
        "add",
        {"a": 2, "b": 3},
        "default",
        0,
        3,
    )
    assert run.root_run_id == run.id
    assert run.parent_run_id is None
    await drain(app)
    done = await client.wait(run.id, timeout=30)
    assert done.status is RunStatus.SUCCEEDED
    assert done.result == 5
    assert done.attempt == 1
    assert done.started_at is not None
    assert done.finished_at is not None
    (attempt,) = await client.attempts(run.id)
    assert attempt.number == 1
    assert attempt.status is RunStatus.SUCCEEDED
    assert attempt.worker_id == done.worker_id


async def test_run_round_trip_with_async_job_and_pydantic_arguments(
    app: Runlane, client: AsyncClient
) -> None:
    @app.job
    async def greet(greeting: Greeting) -> dict[str, str]:
        await asyncio.sleep(0)
        return {"text": f"hello {greeting.name}{'!' if greeting.excited else ''}"}

    async with app.worker():
        assert await client.run(greet, {"greeting": {"name": "ada", "excited": True}}) == {
            "text": "hello ada!"
        }
        # the job handle's typed trigger goes through the same path
        run = await greet.trigger_async(Greeting(name="bob"))
        assert await client.result(run.id, timeout=30) == {"text": "hello bob"}


async def test_context_progress_and_logs_become_events(app: Runlane, client: AsyncClient) -> None:
    @app.job
    def report(ctx: JobContext) -> str:
        for i in range(1, 101):
            ctx.progress(i, f"step {i}")
        ctx.log("almost done", level="warning")
        return f"{ctx.job}#{ctx.run_id} attempt {ctx.attempt}"

    run = await client.trigger(report)
    await drain(app)
    done = await client.wait(run.id, timeout=30)
    assert done.result == f"report#{run.id} attempt 1"
    assert done.progress == 100
    assert done.progress_message == "step 100"
    events = [e async for e in client.events(run.id)]
    kinds = [e.kind for e in events]
    assert "log" in kinds
    assert kinds.count("progress") < 100  # tight-loop progress is coalesced, not written 100 times
    assert [e.id for e in events] == sorted(e.id for e in events)
    statuses = [(e.data["from"], e.data["to"]) for e in events if e.kind == "status"]
    assert statuses == [("pending", "running"), ("running", "succeeded")]


async def test_flaky_job_is_retried_until_it_succeeds(app: Runlane, client: AsyncClient) -> None:
    calls: list[int] = []

    @app.job(retry=Retry(attempts=3, backoff=0, jitter=False))
    def flaky(ctx: JobContext) -> str:
        calls.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError(f"boom {ctx.attempt}")
        return "ok"

    run = await client.trigger(flaky)
    await drain(app)
    done = await client.wait(run.id, timeout=30)
    assert (done.status, done.result, done.attempt) == (RunStatus.SUCCEEDED, "ok", 3)
    assert calls == [1, 2, 3]
    attempts = await client.attempts(run.id)
    assert [a.status for a in attempts] == [RunStatus.FAILED, RunStatus.FAILED, RunStatus.SUCCEEDED]
    assert attempts[0].error is not None
    assert str(attempts[0].error) == "ConnectionError: boom 1"
    assert "Traceback" in (attempts[0].error.traceback or "")
    transitions = [(e.data["from"], e.data["to"]) async for e in client.events(run.id) if e.kind == "status"]
    assert ("running", "retrying") in transitions
    assert ("retrying", "pending") in transitions


async def test_exhausted_retries_fail_the_run(app: Runlane, client: AsyncClient) -> None:
    @app.job(retry=Retry(attempts=2, backoff=0))
    async def doomed() -> None:
        raise ValueError("always")

    with pytest.raises(RunFailed) as info:
        async with app.worker():
            await client.run(doomed, timeout=30)
    assert info.value.run.status is RunStatus.FAILED
    assert info.value.run.attempt == 2
    assert info.value.error is not None
    assert str(info.value.error) == "ValueError: always"


async def test_non_retryable_and_unlisted_errors_fail_at_once(app: Runlane, client: AsyncClient) -> None:
    @app.job(retry=Retry(attempts=5, backoff=0, on=(ConnectionError,)))
    def picky(kind: str) -> None:
        if kind == "fatal":
            raise NonRetryable("bad input")
        raise KeyError(kind)

    fatal = await client.trigger(picky, {"kind": "fatal"})
    other = await client.trigger(picky, {"kind": "other"})
    await drain(app)
    for run_id, type_name in ((fatal.id, "NonRetryable"), (other.id, "KeyError")):
        done = await client.wait(run_id, timeout=30)
        assert done.status is RunStatus.FAILED
        assert done.attempt == 1
        assert done.error is not None
        assert done.error.type == type_name


async def test_timeout_interrupts_an_async_attempt(app: Runlane, client: AsyncClient) -> None:
    @app.job(timeout=0.2, retry=Retry(attempts=1))
    async def sleepy() -> None:
        await asyncio.sleep(60)

    run = await client.trigger(sleepy)
    await drain(app)
    done = await client.wait(run.id, timeout=30)
    assert done.status is RunStatus.FAILED
    assert done.error is not None
    assert done.error.type == "JobTimeout"


async def test_a_result_that_is_not_json_fails_clearly(app: Runlane, client: AsyncClient) -> None:
    @app.job
    def opaque() -> object:
        return object()

    run = await client.trigger(opaque)
    await drain(app)
    done = await client.wait(run.id, timeout=30)
    assert done.status is RunStatus.FAILED
    assert done.attempt == 1
    assert done.error is not None
    assert done.error.type == "NotSerializable"


async def test_bad_triggers_raise_typed_errors_and_create_nothing(app: Runlane, client: AsyncClient) -> None:
    @app.job
    def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(InvalidArguments, match="a: Input should be a valid integer"):
        await client.trigger(add, {"a": "x", "b": 1})
    with pytest.raises(JobNotFound, match="nope"):
        await client.trigger("nope", {})
    with pytest.raises(InvalidArguments, match="not_after"):
        await client.trigger(
            add, {"a": 1, "b": 2}, not_before=timedelta(hours=2), not_after=timedelta(hours=1)
        )
    with pytest.raises(InvalidArguments, match="max_attempts"):
        await client.trigger(add, {"a": 1, "b": 2}, max_attempts=0)
    assert [r async for r in client.list_runs()] == []
    with pytest.raises(RunNotFound):
        await client.wait(987654, timeout=5)
    with pytest.raises(RunNotFound):
        await client.cancel(987654)
    assert await client.get_run(987654) is None


async def test_client_only_process_validates_against_the_catalogue(
    app: Runlane, client: AsyncClient, make_app: Any
) -> None:
    @app.job(queue="math")
    def add(a: int, b: int) -> int:
        return a + b

    await app.migrate()  # records the catalogue, as a worker start does
    remote = make_app()  # same store, no job code
    try:
        run = await remote.async_client.trigger("add", {"a": 1, "b": 2})
        assert run.queue == "math"
        with pytest.raises(InvalidArguments, match="add"):
            await remote.async_client.trigger("add", {"a": "one", "b": 2})
        with pytest.raises(JobNotFound):
            await remote.async_client.trigger("subtract", {"a": 1})
    finally:
        await remote.async_client.aclose()
        await remote.aclose()
    await drain(app)
    assert await client.result(run.id, timeout=30) == 3


async def test_dedup_conflict_and_return_existing(app: Runlane, client: AsyncClient) -> None:
    @app.job
    def once(n: int) -> int:
        return n

    first = await client.trigger(once, {"n": 1}, dedup_id="order-7")
    with pytest.raises(RunConflict) as info:
        await client.trigger(once, {"n": 2}, dedup_id="order-7")
    assert info.value.existing_run_id == first.id
    same = await client.trigger(once, {"n": 3}, dedup_id="order-7", on_conflict="return_existing")
    assert same.id == first.id
    await drain(app)
    await client.wait(first.id, timeout=30)
    again = await client.trigger(once, {"n": 4}, dedup_id="order-7")  # the first one is terminal now
    assert again.id != first.id


async def test_priority_orders_claims(app: Runlane, client: AsyncClient) -> None:
    order: list[str] = []

    @app.job
    def record(tag: str) -> None:
        order.append(tag)

    await client.trigger(record, {"tag": "low-1"})
    await client.trigger(record, {"tag": "high"}, priority=10)
    await client.trigger(record, {"tag": "low-2"})
    await drain(app, concurrency=1)
    assert order == ["high", "low-1", "low-2"]


async def test_not_before_and_not_after(make_app: Any) -> None:
    clock = FakeClock()
    app = make_app(clock=clock)
    await app.migrate()
    ran: list[str] = []

    @app.job
    def mark(tag: str) -> None:
        ran.append(tag)

    client = app.async_client
    try:
        later = await client.trigger(mark, {"tag": "later"}, not_before=timedelta(minutes=5))
        expiring = await client.trigger(
            mark, {"tag": "expiring"}, not_before=timedelta(minutes=1), not_after=timedelta(minutes=2)
        )
        assert later.status is RunStatus.SCHEDULED
        await drain(app)
        assert ran == []  # never early
        clock.advance(180)  # "expiring" is due but past its not_after: it must never start
        await app.store.expire_runs()
        await drain(app)
        assert ran == []
        clock.advance(180)
        await drain(app)
        assert ran == ["later"]
        gone = await client.wait(expiring.id, timeout=30)
        assert gone.status is RunStatus.CANCELLED
        assert gone.error is not None
        assert gone.error.type == "Expired"
    finally:
        await client.aclose()
        await app.aclose()


async def test_cancel_pending_and_terminal(app: Runlane, client: AsyncClient) -> None:
    @app.job
    def noop() -> None: ...

    run = await client.trigger(noop)
    assert await client.cancel(run.id) is True
    assert await client.cancel(run.id) is False
    with pytest.raises(RunCancelled):
        await client.result(run.id, timeout=30)
    await drain(app)  # a cancelled run is never executed
    assert (await client.attempts(run.id)) == []


async def test_cancel_interrupts_a_running_async_job(app: Runlane, client: AsyncClient) -> None:
    started = asyncio.Event()
    interrupted = asyncio.Event()

    @app.job
    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            interrupted.set()
            raise

    async with app.worker():
        run = await client.trigger(forever)
        await asyncio.wait_for(started.wait(), 30)
        assert await client.cancel(run.id)
        await asyncio.wait_for(interrupted.wait(), 30)
        done = await client.wait(run.id, timeout=30)
    assert done.status is RunStatus.CANCELLED
    (attempt,) = await client.attempts(run.id)
    assert attempt.status is RunStatus.CANCELLED


async def test_an_async_job_that_swallows_its_cancellation_is_not_recorded(
    app: Runlane, client: AsyncClient
) -> None:
    # Async bodies without a timeout run on their attempt's own task: the worker's cancellation of the body
    # must end the body only, and the attempt must still write nothing and let its slot go.
    started = asyncio.Event()
    swallowed = asyncio.Event()

    @app.job
    async def stubborn() -> str:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()
        return "finished anyway"

    @app.job
    async def next_one() -> str:
        await asyncio.sleep(0)
        return "ran"

    async with app.worker(concurrency=1):
        run = await client.trigger(stubborn)
        await asyncio.wait_for(started.wait(), 30)
        assert await client.cancel(run.id)
        await asyncio.wait_for(swallowed.wait(), 30)
        assert await client.run(next_one, timeout=30) == "ran"  # the only slot was given back
    done = await client.wait(run.id, timeout=30)
    assert done.status is RunStatus.CANCELLED
    assert done.result is None
    (attempt,) = await client.attempts(run.id)
    assert attempt.status is RunStatus.CANCELLED


async def test_an_async_job_that_cancels_itself_fails(app: Runlane, client: AsyncClient) -> None:
    @app.job(retry=Retry(attempts=1))
    async def gives_up() -> None:
        await asyncio.sleep(0)
        raise asyncio.CancelledError("nobody asked")

    run = await client.trigger(gives_up)
    await drain(app)
    done = await client.wait(run.id, timeout=30)
    assert done.status is RunStatus.FAILED
    assert done.error is not None
    assert done.error.type == "CancelledError"


async def test_a_sync_job_sees_ctx_cancelled(app: Runlane, client: AsyncClient) -> None:
    import threading

    started = threading.Event()
    saw_cancel = threading.Event()

    @app.job
    def patient(ctx: JobContext) -> None:
        started.set()
        for _ in range(3000):
            if ctx.cancelled:
                saw_cancel.set()
                return
            threading.Event().wait(0.01)

    async with app.worker():
        run = await client.trigger(patient)
        assert await asyncio.to_thread(started.wait, 30)
        assert await client.cancel(run.id)
        assert await asyncio.to_thread(saw_cancel.wait, 30)
    done = await client.wait(run.id, timeout=30)
    assert done.status is RunStatus.CANCELLED


async def test_cancelling_the_caller_of_run_cancels_the_run(app: Runlane, client: AsyncClient) -> None:
    started = asyncio.Event()

    @app.job
    async def long() -> None:
        started.set()
        await asyncio.sleep(3600)

    async with app.worker():
        caller = asyncio.create_task(client.run(long))
        await asyncio.wait_for(started.wait(), 30)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        (run,) = [r async for r in client.list_runs(RunFilter(job="long"))]
        done = await client.wait(run.id, timeout=30)
    assert done.status is RunStatus.CANCELLED


async def test_retry_and_rerun(app: Runlane, client: AsyncClient) -> None:
    attempts_seen: list[int] = []

    @app.job(retry=Retry(attempts=1))
    def once_broken(ctx: JobContext, n: int) -> int:
        attempts_seen.append(ctx.attempt)
        if len(attempts_seen) == 1:
            raise RuntimeError("first time fails")
        return n

    run = await client.trigger(once_broken, {"n": 7})
    await drain(app)
    assert (await client.wait(run.id, timeout=30)).status is RunStatus.FAILED
    assert await client.retry(run.id) is True
    assert (await client.get_run(run.id)).status is RunStatus.PENDING  # type: ignore[union-attr]
    await drain(app)
    assert await client.result(run.id, timeout=30) == 7
    assert await client.retry(run.id) is False  # succeeded runs are not retried
    new = await client.rerun(run.id)
    assert new.id != run.id
    assert (new.job, new.args) == (run.job, run.args)
    await drain(app)
    assert await client.result(new.id, timeout=30) == 7
    assert (await client.get_run(run.id)).attempt == 2  # type: ignore[union-attr]
    assert attempts_seen == [1, 2, 1]
    with pytest.raises(RunNotFound):
        await client.rerun(424242)


async def test_events_follow_live_until_terminal(app: Runlane, client: AsyncClient) -> None:
    @app.job
    async def steps(ctx: JobContext) -> None:
        for i in range(3):
            ctx.log(f"line {i}")
            await asyncio.sleep(0.01)

    run = await client.trigger(steps)
    follower = asyncio.create_task(_collect(client, run.id))
    await drain(app)
    events = await asyncio.wait_for(follower, 30)
    assert [e.data["message"] for e in events if e.kind == "log"] == ["line 0", "line 1", "line 2"]
    assert events[-1].kind == "status"
    assert events[-1].data["to"] == "succeeded"
    since = events[1].id
    replay = [e async for e in client.events(run.id, since=since)]
    assert [e.id for e in replay] == [e.id for e in events if e.id > since]


async def _collect(client: AsyncClient, run_id: int) -> list[Any]:
    return [e async for e in client.events(run_id)]


async def test_list_runs_filters_and_pages(app: Runlane, client: AsyncClient) -> None:
    @app.job
    def item(i: int) -> int:
        return i

    @app.job(queue="other")
    def elsewhere() -> None: ...

    # Five chunks: PostgreSQL sends each chunk's statement while it builds the previous chunk's runs.
    runs = await client.trigger_many(item, [{"i": i} for i in range(450)], tags=["bulk"], chunk_size=100)
    assert [r.args["i"] for r in runs] == list(range(450))
    assert [r.id for r in runs] == sorted({r.id for r in runs})
    assert all(r.tags == ("bulk",) for r in runs)
    await client.trigger(elsewhere)
    listed = [r async for r in client.list_runs(RunFilter(job="item"), limit=None)]
    assert [r.id for r in listed] == sorted((r.id for r in runs), reverse=True)
    assert len([r async for r in client.list_runs(limit=120)]) == 120
    assert [r.job async for r in client.list_runs(RunFilter(queue="other"))] == ["elsewhere"]
    assert len([r async for r in client.list_runs(RunFilter(tag="bulk"), limit=None)]) == 450
    assert [r async for r in client.list_runs(RunFilter(status=RunStatus.SUCCEEDED))] == []


async def test_wait_times_out(app: Runlane, client: AsyncClient) -> None:
    @app.job
    def noop() -> None: ...

    run = await client.trigger(noop)
    with pytest.raises(TimeoutError):
        await client.wait(run.id, timeout=0.1)


async def test_graceful_stop_releases_unfinished_runs_without_using_an_attempt(make_app: Any) -> None:
    app = make_app(shutdown_timeout=0.2)
    await app.migrate()
    started = asyncio.Event()

    @app.job
    async def stubborn() -> None:
        started.set()
        await asyncio.sleep(3600)

    client = app.async_client
    try:
        worker = app.worker()
        async with worker:
            run = await client.trigger(stubborn)
            await asyncio.wait_for(started.wait(), 30)
        released = await client.get_run(run.id)
        assert released is not None
        assert released.status is RunStatus.PENDING
        assert released.attempt == 0
        assert await client.attempts(run.id) == []
    finally:
        await client.aclose()
        await app.aclose()


async def test_unmigrated_store_is_refused(tmp_path: Any) -> None:
    app = Runlane(f"sqlite:///{tmp_path / 'fresh.db'}")

    @app.job
    def noop() -> None: ...

    try:
        with pytest.raises(SchemaOutdated, match="runlane migrate"):
            await app.async_client.trigger(noop)
        with pytest.raises(SchemaOutdated):
            await app.worker(burst=True).run()
    finally:
        await app.aclose()


async def test_waiting_on_many_runs_at_once(app: Runlane, client: AsyncClient) -> None:
    @app.job
    async def square(x: int) -> int:
        return x * x

    runs = await client.trigger_many(square, [{"x": x} for x in range(200)])
    async with app.worker(concurrency=32):
        results = await asyncio.gather(*(client.result(r.id, timeout=60) for r in runs))
    assert results == [x * x for x in range(200)]


def test_sync_client_facade(store_url: str) -> None:
    app = Runlane(store_url, poll_interval=0.2)

    @app.job
    def add(a: int, b: int) -> int:
        return a + b

    try:
        app.client.portal.call(app.migrate())
        run = app.client.trigger(add, {"a": 20, "b": 22})
        typed = add.trigger(1, 2)
        app.run_worker(burst=True)
        assert app.client.result(run.id, timeout=30) == 42
        assert app.client.result(typed.id, timeout=30) == 3
        assert [r.id for r in app.client.list_runs(RunFilter(job="add"))] == [typed.id, run.id]
        assert [e.kind for e in app.client.events(run.id)] == ["status", "status"]
    finally:
        app.close()


def test_sync_client_triggers_without_its_loop_where_the_store_allows(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the store is open, a blocking trigger validates and inserts on the caller's thread (no hand-over
    to the portal loop and back), with the same errors, dedup rules and stored runs as the async path."""
    app = Runlane(store_url, poll_interval=0.2)

    @app.job(queue="math")
    def add(a: int, b: int) -> int:
        return a + b

    remote = Runlane(store_url, poll_interval=0.2)  # same store, no job code: validates by the catalogue
    portal_calls: list[str] = []
    try:
        app.client.portal.call(app.migrate())
        for client in (app.client, remote.client):
            real_call = client.portal.call

            def counting(coro: Any, real_call: Any = real_call) -> Any:
                portal_calls.append(getattr(coro, "__qualname__", type(coro).__name__))
                return real_call(coro)

            monkeypatch.setattr(client.portal, "call", counting)
        first = app.client.trigger(add, {"a": 1, "b": 2}, dedup_id="sum", tags=["x"])
        assert (first.status, first.queue, first.tags) == (RunStatus.PENDING, "math", ("x",))
        assert portal_calls == []
        with pytest.raises(RunConflict) as info:
            app.client.trigger(add, {"a": 5, "b": 5}, dedup_id="sum")
        assert info.value.existing_run_id == first.id
        same = app.client.trigger(add, {"a": 5, "b": 5}, dedup_id="sum", on_conflict="return_existing")
        assert same.id == first.id
        with pytest.raises(InvalidArguments, match="add"):
            app.client.trigger(add, {"a": "one", "b": 2})
        assert portal_calls == []
        with pytest.raises(JobNotFound):
            app.client.trigger("subtract", {"a": 1})  # only the store's catalogue can tell
        assert portal_calls[-1] == "AsyncClient.trigger"

        portal_calls.clear()
        by_name = remote.client.trigger("add", {"a": 3, "b": 4})  # opens the store, reads the catalogue
        assert by_name.queue == "math"
        calls_to_open = len(portal_calls)
        again = remote.client.trigger("add", {"a": 4, "b": 4})
        assert len(portal_calls) == calls_to_open
        with pytest.raises(InvalidArguments, match="add"):
            remote.client.trigger("add", {"a": "one", "b": 2})

        app.run_worker(burst=True)
        assert [app.client.result(r.id, timeout=30) for r in (first, by_name, again)] == [3, 7, 8]
        stored = app.client.get_run(first.id)
        assert stored is not None and (stored.tags, stored.queue, stored.dedup_id) == (("x",), "math", "sum")
        assert len(list(app.client.list_runs(RunFilter(job="add")))) == 3
    finally:
        monkeypatch.undo()
        remote.close()
        app.close()
