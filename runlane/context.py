"""The job context: what a running job can learn about its run and report back.

Progress, log and output calls only append to an in-memory buffer (safe from any thread); the worker
flushes buffers in batches, every ``progress_flush_interval`` and with the attempt's end, so a job may report
progress in a tight loop without paying a store round trip per call.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from runlane.errors import RunlaneError
from runlane.serialization import to_jsonable
from runlane.store.base import EventDraft

if TYPE_CHECKING:
    from runlane.app import Runlane
    from runlane.client import AsyncClient, Client
    from runlane.models import Run

LOG_LEVELS = frozenset({"debug", "info", "warning", "error", "critical"})


class AttemptCancelled(RunlaneError):
    """Raised by ``ctx.raise_if_cancelled()`` when the run was cancelled or this attempt lost its lease."""


class EventBuffer:
    """Events a job produced and the worker has not written yet. Consecutive progress updates collapse
    into the latest one: only the newest percentage matters to anyone reading it."""

    def __init__(self, on_output: Callable[[], None] | None = None) -> None:
        self._items: deque[EventDraft] = deque()
        self._lock = threading.Lock()
        self._on_output = on_output

    def add(self, draft: EventDraft) -> None:
        with self._lock:
            if draft.kind == "progress" and self._items and self._items[-1].kind == "progress":
                self._items[-1] = draft
            else:
                self._items.append(draft)
        if draft.kind == "output" and self._on_output is not None:
            self._on_output()

    def drain(self) -> list[EventDraft]:
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items

    def __len__(self) -> int:
        return len(self._items)


class JobContext:
    """Passed to a job parameter annotated ``JobContext``."""

    def __init__(self, app: Runlane, run: Run, *, buffer: EventBuffer | None = None) -> None:
        self._app = app
        self._run = run
        self._buffer = buffer if buffer is not None else EventBuffer()
        self._cancelled = False  # set once, from any thread (a bool: this object is made for every run)
        self._cancel_hooks: list[Callable[[], None]] = []
        self._client: Client | None = None
        self._async_client: AsyncClient | None = None
        try:  # the worker's loop: sync jobs reach the store through it (ctx.inputs())
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    # -- what the run is --------------------------------------------------------------------------------------

    @property
    def run_id(self) -> int:
        return self._run.id

    @property
    def job(self) -> str:
        return self._run.job

    @property
    def attempt(self) -> int:
        return self._run.attempt

    @property
    def parent_run_id(self) -> int | None:
        return self._run.parent_run_id

    @property
    def args(self) -> dict[str, Any]:
        return dict(self._run.args)

    @property
    def run(self) -> Run:
        return self._run

    @property
    def scheduled_at(self) -> datetime | None:
        """The intended fire time for a run created by a schedule; None otherwise."""
        return self._run.not_before if self._run.schedule_id is not None else None

    # -- reporting ----------------------------------------------------------------------------------------------

    def _emit(self, kind: Any, data: Any) -> None:
        # The store's clock (the database's on PostgreSQL), like every other time recorded for the run.
        at = self._app.store.now()
        self._buffer.add(EventDraft(self._run.id, kind, data, attempt=self._run.attempt, at=at))

    def progress(self, percent: float | None, message: str | None = None) -> None:
        if percent is not None:
            if not 0 <= percent <= 100:
                raise ValueError(f"progress must be between 0 and 100, got {percent!r}")
            percent = float(percent)
        self._emit("progress", {"percent": percent, "message": message})

    def log(self, message: str, level: str = "info") -> None:
        if level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {sorted(LOG_LEVELS)}, got {level!r}")
        self._emit("log", {"message": str(message), "level": level})

    def output(self, item: Any) -> None:
        """Emit one output item (what ``yield`` does in a streaming job)."""
        self._emit("output", to_jsonable(item))

    # -- cancellation -------------------------------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once the run was cancelled, or this attempt lost its lease, or the attempt timed out."""
        return self._cancelled

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise AttemptCancelled(f"run {self.run_id} attempt {self.attempt} was cancelled")

    def _cancel(self) -> None:
        self._cancelled = True
        for hook in self._cancel_hooks:
            hook()

    def _on_cancel(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` when the attempt is cancelled (at once if it already is): a job process's flag."""
        self._cancel_hooks.append(hook)
        if self._cancelled:
            hook()

    # -- inputs ---------------------------------------------------------------------------------------------------

    def inputs(self) -> InputStream:
        """The input items sent to this run (``client.send``), in order, from the first one ever sent (a retry
        or a rerun sees them all again). ``async for`` in an async job, ``for`` in a sync one. Waits for more
        until ``client.close_input(run_id)``; raises AttemptCancelled if the attempt is cancelled meanwhile."""
        return InputStream(self)

    # -- triggering children ---------------------------------------------------------------------------------------

    @property
    def async_client(self) -> AsyncClient:
        """A client whose triggers become children of this run."""
        if self._async_client is None:
            self._async_client = self._app.async_client.with_parent(self._run.id)
        return self._async_client

    @property
    def client(self) -> Client:
        """The blocking twin of ``async_client``; for sync jobs (they run on worker threads)."""
        if self._client is None:
            self._client = self._app.client.with_parent(self._run.id)
        return self._client


class InputStream:
    """What ``ctx.inputs()`` returns: both an async iterator and (for sync jobs, on a worker thread) a
    blocking one. Input events carry ``{"item": value}``, or ``{"end": true}`` after ``close_input``."""

    _PAGE = 1000

    def __init__(self, ctx: JobContext) -> None:
        self._ctx = ctx
        self._last_event = 0
        self._items: deque[Any] = deque()
        self._ended = False

    def __aiter__(self) -> InputStream:
        return self

    async def __anext__(self) -> Any:
        while not self._items:
            if self._ended:
                raise StopAsyncIteration
            await self._fetch()
        return self._items.popleft()

    def __iter__(self) -> InputStream:
        return self

    def __next__(self) -> Any:
        loop = self._ctx._loop
        if loop is None:
            raise RuntimeError("ctx.inputs() needs the worker's event loop")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("an async job reads its inputs with `async for item in ctx.inputs()`")
        try:
            return asyncio.run_coroutine_threadsafe(self.__anext__(), loop).result()
        except StopAsyncIteration:
            raise StopIteration from None

    async def _fetch(self) -> None:
        """Read input events after the last one seen; wait for a change when there are none yet."""
        ctx = self._ctx
        store = await ctx._app.open_store()
        notifier = store.notifier
        while True:
            ctx.raise_if_cancelled()
            generation = notifier.generation("change")
            page = await store.events(ctx.run_id, since=self._last_event, limit=self._PAGE)
            for event in page:
                self._last_event = event.id
                if event.kind != "input":
                    continue
                data = event.data if isinstance(event.data, dict) else {}
                if data.get("end"):
                    self._ended = True
                    return
                self._items.append(data.get("item"))
            if self._items:
                return
            if len(page) < self._PAGE:
                await notifier.wait("change", generation, ctx._app.settings.poll_interval)
