"""One attempt: decode arguments, call the job (async on the loop, sync on a thread), bound it by its
timeout, and turn what happened into a ``Finish`` for the store — or nothing, when the attempt no longer
owns its run and must not write."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from runlane.errors import InvalidArguments, JobTimeout, NonRetryable
from runlane.models import ErrorInfo
from runlane.serialization import NotSerializable, to_jsonable
from runlane.store import Finish
from runlane.worker.job_processes import JobProcesses, unwrap

log = logging.getLogger("runlane.worker")

if TYPE_CHECKING:
    from runlane.context import JobContext
    from runlane.jobs import Job
    from runlane.worker.worker import ActiveAttempt


def lower_thread_priority(nice: int) -> None:
    """Initializer of the job threads: make them ``nice`` steps nicer than the worker's own threads (Linux,
    where a thread has its own nice value). CPU-bound sync jobs then leave the CPU first to the heartbeat, the
    store I/O and a database on the same host: with 60 spinning job threads in a process, its heartbeat's
    store round trip took p50 270-530 ms at the same priority and 90-190 ms with the job threads at nice 10."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + nice, 19))
    except OSError as exc:  # a sandbox may forbid it; the jobs then run at the worker's priority
        log.debug("could not lower the priority of job thread %s: %s", tid, exc)


def error_info(exc: BaseException) -> ErrorInfo:
    return ErrorInfo(
        type=type(exc).__name__,
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
    )


async def _drain_async_stream(stream: AsyncIterator[Any], ctx: JobContext) -> int:
    count = 0
    async for item in stream:
        ctx.output(item)
        count += 1
    return count


def _drain_stream(stream: Iterator[Any], ctx: JobContext) -> int:
    count = 0
    for item in stream:
        ctx.output(item)
        count += 1
    return count


class _Stale(Exception):
    """A job thread became free only after the attempt's lease went stale (the worker was stopped, or every
    thread was still busy with bodies that had not yet noticed their own cancellation): not started."""


def _start_body(
    job: Job[Any, Any],
    kwargs: dict[str, Any],
    ctx: JobContext,
    pool: ThreadPoolExecutor,
    processes: JobProcesses | None,
    fresh: Callable[[], bool] | None = None,
) -> asyncio.Future[Any]:
    loop = asyncio.get_running_loop()
    if job.options.executor == "process":
        assert processes is not None, "a worker running process jobs has job processes"
        return processes.submit(job, ctx)  # arguments are decoded again in the job process
    if job.is_async_generator:
        return asyncio.ensure_future(_drain_async_stream(job.func(**kwargs), ctx))
    if job.is_async:
        coro: Coroutine[Any, Any, Any] = job.func(**kwargs)
        return asyncio.ensure_future(coro)
    body: Callable[[], Any]
    if job.is_generator:

        def body() -> Any:
            return _drain_stream(job.func(**kwargs), ctx)

    else:
        body = functools.partial(job.func, **kwargs)

    def call() -> Any:
        # A queued body starts only while its lease is still ours: the check before it was queued is no
        # longer enough once it has waited (seen in T19: a body started as its stopped worker resumed).
        if ctx.cancelled or (fresh is not None and not fresh()):
            raise _Stale(f"run {ctx.run_id} attempt {ctx.attempt}: lease stale before a job thread was free")
        return body()

    # Run in a copy of the context so contextvars set by hooks reach sync jobs too.
    return loop.run_in_executor(pool, contextvars.copy_context().run, call)


async def _settled(body: asyncio.Future[Any]) -> None:
    """Wait for ``body`` to end however it ends, like ``asyncio.wait({body})`` without its waiter future and
    callbacks (this runs for every attempt). Cancelling the waiting task cancels the body too and re-raises;
    the body's own end, a cancellation included (the job's own or the worker's ``body.cancel()``), is left
    on the future for the caller to read."""
    try:
        await body
    except BaseException:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


class Body(Protocol):
    """What the worker holds of a running body to stop it: the body's future, or an ``_InlineBody``."""

    def done(self) -> bool: ...

    def cancel(self) -> bool: ...


class _InlineBody:
    """The body of an async job without a timeout, awaited on the attempt's own task rather than on a task
    of its own (one task and one loop step fewer per attempt: worker CPU per no-op run ~55 -> ~50 µs on
    the PostgreSQL drain). It stands in for that task's future in ``ActiveAttempt.body``: ``cancel()``
    cancels the attempt's task while the body runs, and the attempt takes the cancellation as the end of its
    body, as it would the cancellation of a separate body task."""

    __slots__ = ("_finished", "_requested", "_task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self._task = task
        self._finished = False
        self._requested = 0

    def done(self) -> bool:
        return self._finished

    def cancel(self) -> bool:
        if self._finished or self._task.done():
            return False
        self._requested += 1
        return self._task.cancel()

    def end(self) -> None:
        """The body returned or raised: take back the cancellations that were meant for it alone, so the
        attempt's task goes on (and a cancellation of the task itself, a hard stop, still shows)."""
        self._finished = True
        for _ in range(self._requested):
            self._task.uncancel()


async def _await_inline(
    job: Job[Any, Any], kwargs: dict[str, Any], active: ActiveAttempt
) -> tuple[bool, BaseException | None, Any]:
    """Run an async body on the current task: (cancelled, exception, value), as a body task's future would
    hold them. A cancellation of the attempt's task itself (not of its body) propagates."""
    task = asyncio.current_task()
    assert task is not None, "attempts run on their own task"
    body = active.body = _InlineBody(task)
    try:
        try:
            if job.is_async_generator:
                value = await _drain_async_stream(job.func(**kwargs), active.ctx)
            else:
                value = await job.func(**kwargs)
        finally:
            body.end()
    except asyncio.CancelledError as exc:
        if task.cancelling():  # the task was cancelled, not (only) the body: stop the attempt
            raise
        return True, exc, None
    except Exception as exc:
        return False, exc, None
    return False, None, value


def _runs_inline(job: Job[Any, Any]) -> bool:
    return (
        (job.is_async or job.is_async_generator)
        and job.options.timeout is None
        and job.options.executor != "process"
    )


async def execute_attempt(
    job: Job[Any, Any],
    active: ActiveAttempt,
    pool: ThreadPoolExecutor,
    processes: JobProcesses | None = None,
    fresh: Callable[[], bool] | None = None,
) -> Finish | None:
    """``fresh`` says (from any thread) whether the attempt's lease is still fresh enough to start a body."""
    run, ctx = active.run, active.ctx
    try:
        kwargs = job.load(run.args)
    except InvalidArguments as exc:
        return _failed(job, active, NonRetryable(str(exc)), error_info(exc))
    if job.spec.context_param is not None:
        kwargs[job.spec.context_param] = ctx
    if _runs_inline(job):
        cancelled, raised, value = await _await_inline(job, kwargs, active)
        return _outcome(job, active, cancelled, raised, value)
    try:
        body = active.body = _start_body(job, kwargs, ctx, pool, processes, fresh)
    except Exception as exc:  # the call itself raised before a coroutine existed (sync wrappers)
        return _failed(job, active, exc, error_info(exc))
    if job.options.timeout is None:
        await _settled(body)
    elif not (await asyncio.wait({body}, timeout=job.options.timeout))[0]:
        ctx._cancel()
        body.cancel()  # an async job is interrupted; a sync one only sees ctx.cancelled
        timeout_error = JobTimeout(
            f"attempt {run.attempt} of run {run.id} ({job.name}) exceeded {job.options.timeout} s"
        )
        if active.lost or active.released:
            return None
        return _failed(job, active, timeout_error, error_info(timeout_error))
    cancelled = body.cancelled()
    raised = None if cancelled else body.exception()
    return _outcome(job, active, cancelled, raised, None if cancelled or raised else body.result())


def _outcome(
    job: Job[Any, Any], active: ActiveAttempt, cancelled: bool, raised: BaseException | None, value: Any
) -> Finish | None:
    """The ``Finish`` of a body that ended, or None if the attempt no longer owns its run."""
    run = active.run
    if active.lost or active.released:
        return None
    if cancelled:  # the job cancelled itself: nobody asked, so it is a failure like any other
        inner = asyncio.CancelledError(f"job {job.name!r} was cancelled from inside the attempt")
        return _failed(job, active, inner, ErrorInfo("CancelledError", str(inner)))
    if isinstance(raised, _Stale):  # never started: the lease is the watchdog's and the reaper's to settle
        return None
    if raised is not None:
        raised, error = unwrap(raised)
        return _failed(job, active, raised, error or error_info(raised))
    try:
        result = to_jsonable(value)
    except NotSerializable as not_json:
        bad = NonRetryable(f"the result of job {job.name!r} is not JSON-serialisable: {not_json}")
        return _failed(job, active, bad, ErrorInfo("NotSerializable", str(bad)))
    return Finish(run.id, run.attempt, "succeeded", result=result)


def _failed(job: Job[Any, Any], active: ActiveAttempt, exc: BaseException, error: ErrorInfo) -> Finish:
    run = active.run
    delay = job.options.retry.next_delay(exc, run.attempt, run.max_attempts)
    if delay is None:
        return Finish(run.id, run.attempt, "failed", error=error)
    return Finish(run.id, run.attempt, "retrying", error=error, retry_delay=delay)
