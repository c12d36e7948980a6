"""``executor="process"``: sync jobs in job processes of their own (regression for chaos T06, where dozens of
CPU-bound job threads starved the worker's heartbeat of the GIL and healthy attempts were reclaimed).

The job functions are module-level so that a job process can import them."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runlane import JobContext, Retry, Runlane, RunStatus
from runlane.worker.heartbeat import fence_age

LEASE = 1.0
HEARTBEAT = 0.2


def whoami(n: int) -> dict[str, int]:
    return {"pid": os.getpid(), "square": n * n, "nice": os.getpriority(os.PRIO_PROCESS, 0)}


def reports(ctx: JobContext, count: int) -> Iterator[int]:
    for i in range(count):
        ctx.progress(100 * (i + 1) / count, f"item {i}")
        ctx.log(f"made {i}")
        yield i


def fails(kind: str) -> None:
    if kind == "value":
        raise ValueError("bad value 42")
    if kind == "unpicklable":
        raise Unpicklable(lambda: None)
    if kind == "crash":
        os._exit(3)


class Unpicklable(Exception):
    def __init__(self, hook: Callable[[], None]) -> None:
        super().__init__("carries a lambda")
        self.hook = hook


def spins(seconds: float) -> int:
    """CPU-bound: holds its process's GIL the whole time."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return os.getpid()


def waits_for_cancel(ctx: JobContext, marker: str) -> None:
    Path(marker).write_text("started")
    while not ctx.cancelled:
        time.sleep(0.01)
    Path(marker).write_text("saw the cancel")
    ctx.raise_if_cancelled()


def ignores_cancel(marker: str) -> None:
    Path(marker).write_text("started")
    time.sleep(30)
    Path(marker).write_text("ran on")  # never: the process is terminated after the grace period


async def wait_for_text(path: Path, text: str, timeout: float = 60.0) -> None:
    """Wait for a job process to write ``text`` to ``path`` (the worker does not know when a body begins)."""
    async with asyncio.timeout(timeout):
        while not await asyncio.to_thread(lambda: path.exists() and path.read_text() == text):  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_a_process_job_runs_in_another_process_and_returns_its_result(
    make_app: Callable[..., Runlane],
) -> None:
    app = make_app(job_processes=2)
    job = app.job(executor="process")(whoami)
    await app.migrate()
    client = app.async_client
    try:
        runs = [await client.trigger(job, {"n": n}) for n in range(4)]
        async with app.worker(concurrency=4, burst=True) as worker:
            done = [await client.wait(r.id, timeout=60) for r in runs]
        assert worker.processed == 4
        assert [d.status for d in done] == [RunStatus.SUCCEEDED] * 4
        assert [d.result["square"] for d in done] == [0, 1, 4, 9]  # type: ignore[index]
        pids = {d.result["pid"] for d in done}  # type: ignore[index]
        assert os.getpid() not in pids and 1 <= len(pids) <= 2
        # CPU-bound jobs yield the CPU to the worker's heartbeat and store I/O (job_process_nice, default 19).
        assert {d.result["nice"] for d in done} == {19}  # type: ignore[index]
    finally:
        await client.aclose()
        await app.aclose()


async def test_progress_logs_and_stream_items_travel_back_in_order(make_app: Callable[..., Runlane]) -> None:
    app = make_app(job_processes=1)
    job = app.job(executor="process")(reports)
    await app.migrate()
    client = app.async_client
    try:
        run = await client.trigger(job, {"count": 50})
        async with app.worker(concurrency=1, burst=True):
            done = await client.wait(run.id, timeout=60)
        assert done.status is RunStatus.SUCCEEDED and done.result == 50
        events = [e async for e in client.events(run.id)]
        outputs = [e.data for e in events if e.kind == "output"]
        logs = [e.data["message"] for e in events if e.kind == "log"]
        progress = [e.data for e in events if e.kind == "progress"]
        assert outputs == list(range(50))
        assert logs == [f"made {i}" for i in range(50)]
        assert progress and progress[-1] == {"percent": 100.0, "message": "item 49"}
    finally:
        await client.aclose()
        await app.aclose()


@pytest.mark.parametrize(
    ("kind", "error_type", "pebble_drops_deaths"),
    [
        ("value", "ValueError", False),
        ("unpicklable", "Unpicklable", False),
        ("crash", "JobProcessDied", False),
        # Regression (CI, a loaded machine): a job process that died at once could die before pebble read its
        # acknowledgement of the task; pebble's check of dead processes then found no task to fail and
        # dropped the death, and the attempt waited forever with its lease renewed. The worker now learns
        # which attempt each job process runs and fails it when the process's connection ends unreported.
        # Here pebble drops every death, as it did in that race.
        ("crash", "JobProcessDied", True),
    ],
    ids=["value", "unpicklable", "crash", "crash-unseen-by-pebble"],
)
async def test_a_failing_process_job_records_its_error_and_follows_its_retry_policy(
    make_app: Callable[..., Runlane],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    error_type: str,
    pebble_drops_deaths: bool,
) -> None:
    if pebble_drops_deaths:
        from pebble.pool.process import PoolManager

        monkeypatch.setattr(PoolManager, "handle_worker_expiration", lambda self, expiration: None)
    app = make_app(job_processes=2)
    job = app.job(executor="process", retry=Retry(attempts=2, backoff=0.01))(fails)
    ok = app.job(executor="process", name="ok_neighbour")(whoami)
    await app.migrate()
    client = app.async_client
    try:
        bad = await client.trigger(job, {"kind": kind})
        good = [await client.trigger(ok, {"n": n}) for n in range(3)]
        async with app.worker(concurrency=4, burst=True):
            failed = await client.wait(bad.id, timeout=60)
            fine = [await client.wait(r.id, timeout=60) for r in good]
        assert failed.status is RunStatus.FAILED
        attempts = await client.attempts(bad.id)
        assert len(attempts) == 2
        for attempt in attempts:
            assert attempt.error is not None and attempt.error.type == error_type, attempt.error
        if kind == "value":
            assert attempts[0].error is not None
            assert "bad value 42" in attempts[0].error.message
            assert "in fails" in (attempts[0].error.traceback or "")  # the job process's traceback
        assert [r.status for r in fine] == [RunStatus.SUCCEEDED] * 3  # a crash takes down its process only
    finally:
        await client.aclose()
        await app.aclose()


async def test_a_cancelled_process_job_sees_ctx_cancelled(
    make_app: Callable[..., Runlane], tmp_path: Path
) -> None:
    app = make_app(job_processes=1)
    job = app.job(executor="process")(waits_for_cancel)
    await app.migrate()
    client = app.async_client
    marker = tmp_path / "marker"
    try:
        run = await client.trigger(job, {"marker": str(marker)})
        async with app.worker(concurrency=1):
            await wait_for_text(marker, "started")
            await client.cancel(run.id)
            done = await client.wait(run.id, timeout=60)
            await wait_for_text(marker, "saw the cancel")
        assert done.status is RunStatus.CANCELLED
    finally:
        await client.aclose()
        await app.aclose()


async def test_a_process_job_that_ignores_its_timeout_is_terminated(
    make_app: Callable[..., Runlane], tmp_path: Path
) -> None:
    app = make_app(job_processes=1)
    # The timeout counts from the submission: under load a job process may take over a second to start and
    # reach the marker, which a 0.5 s timeout then beat (the test failed 1 in ~6 runs at -n 2).
    job = app.job(executor="process", timeout=3.0, retry=Retry(attempts=1))(ignores_cancel)
    after = app.job(executor="process", name="after")(reports)
    await app.migrate()
    client = app.async_client
    marker = tmp_path / "marker"
    try:
        run = await client.trigger(job, {"marker": str(marker)})
        async with app.worker(concurrency=1):
            done = await client.wait(run.id, timeout=60)
            # The one job process was freed by terminating the sleeper: the next job runs long before 30 s,
            # and all its events arrive.
            started = time.monotonic()
            nxt = await client.trigger(after, {"count": 20})
            follow = await client.wait(nxt.id, timeout=60)
            took = time.monotonic() - started
        # Its replacement's events travel on a connection of their own: the terminated process broke none.
        outputs = [e.data async for e in client.events(nxt.id) if e.kind == "output"]
        assert outputs == list(range(20))
        assert done.status is RunStatus.FAILED
        attempts = await client.attempts(run.id)
        assert attempts[-1].error is not None and attempts[-1].error.type == "JobTimeout"
        assert follow.status is RunStatus.SUCCEEDED
        assert took < 25, f"the next job waited {took:.1f} s: the timed-out process was not terminated"
        await asyncio.sleep(0.2)
        assert marker.read_text() == "started"
    finally:
        await client.aclose()
        await app.aclose()


async def test_long_attempt_heartbeat_cpu_bound_process_jobs_keep_their_leases(
    make_app: Callable[..., Runlane],
) -> None:
    """T06: CPU-bound sync jobs for several leases, more of them than cores, in one worker: the heartbeat
    renews on time because the jobs' GIL is not the worker's. Every run succeeds in its first attempt."""
    app = make_app(lease_timeout=LEASE, heartbeat_interval=HEARTBEAT, job_processes=6)
    job = app.job(executor="process")(spins)
    await app.migrate()
    client = app.async_client
    try:
        runs = [await client.trigger(job, {"seconds": 4 * LEASE}) for _ in range(6)]
        async with app.worker(concurrency=6, burst=True):
            done = [await client.wait(r.id, timeout=120) for r in runs]
        assert [d.status for d in done] == [RunStatus.SUCCEEDED] * 6
        for run in runs:
            attempts = await client.attempts(run.id)
            assert len(attempts) == 1, attempts
    finally:
        await client.aclose()
        await app.aclose()


async def test_a_job_process_fences_itself_when_its_worker_stops_renewing(
    make_app: Callable[..., Runlane], tmp_path: Path
) -> None:
    """T03/T19 for process jobs: a SIGSTOPped worker cannot cancel anything, yet its job process keeps
    running. The process applies the heartbeat's rule itself: once the lease went unrenewed for a whole
    lease period, ``ctx.cancelled`` turns true (and a job that ignores it is ended after the grace)."""
    app = make_app(lease_timeout=LEASE, heartbeat_interval=HEARTBEAT, job_processes=1)
    job = app.job(executor="process")(waits_for_cancel)
    await app.migrate()
    client = app.async_client
    marker = tmp_path / "marker"
    try:
        run = await client.trigger(job, {"marker": str(marker)})
        async with app.worker(concurrency=1) as worker:
            await wait_for_text(marker, "started")
            heartbeat = worker._heartbeat
            assert heartbeat is not None
            heartbeat.freeze()  # renewals stop, as if the worker were stopped
            last = heartbeat.renewed_at(run.id)
            assert last is not None
            await wait_for_text(marker, "saw the cancel")
            # Not before the worker itself would have fenced the lease (from its last renewal's send time).
            assert time.monotonic() >= last + fence_age(LEASE)
    finally:
        await client.aclose()
        await app.aclose()


def test_process_jobs_are_sync_functions_defined_at_module_level() -> None:
    app = Runlane("sqlite:///:memory:")

    async def coro() -> None:
        return None

    def local() -> None:
        return None

    with pytest.raises(ValueError, match="executor='process' runs sync functions"):
        app.job(executor="process")(coro)
    with pytest.raises(ValueError, match="not defined at module level"):
        app.job(executor="process")(local)
    with pytest.raises(ValueError, match="executor must be one of"):
        app.job(executor="fork")(whoami)
