"""The async client holds all client logic; the blocking ``Client`` forwards to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from runlane.errors import InvalidArguments, JobNotFound, RunCancelled, RunFailed, RunNotFound
from runlane.jobs import Job, validate_with_schema
from runlane.models import Attempt, Event, JobInfo, Run, RunFilter, RunStatus, to_timestamp
from runlane.store import NewRun, Store
from runlane.store.base import ConflictPolicy

from .watcher import RunWatcher

if TYPE_CHECKING:
    from runlane.app import Runlane

JobRef = str | Job[Any, Any]
When = datetime | timedelta | None
_PAGE = 200


def _absolute(value: When, now: float, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return now + value.total_seconds()
    if isinstance(value, datetime):
        return to_timestamp(value)
    raise InvalidArguments(f"{name} must be a datetime or a timedelta, not {type(value).__name__}")


class AsyncClient:
    """Trigger, wait for, observe and manage runs. Usable from one event loop at a time."""

    def __init__(self, app: Runlane, *, parent_run_id: int | None = None) -> None:
        self.app = app
        self.parent_run_id = parent_run_id
        self._catalogue: dict[str, JobInfo] = {}
        self._watchers: dict[asyncio.AbstractEventLoop, RunWatcher] = {}

    def with_parent(self, parent_run_id: int) -> AsyncClient:
        """A client whose triggers become children of ``parent_run_id``."""
        return AsyncClient(self.app, parent_run_id=parent_run_id)

    async def _store(self) -> Store:
        return await self.app.open_store()

    def _watcher(self, store: Store) -> RunWatcher:
        loop = asyncio.get_running_loop()
        watcher = self._watchers.get(loop)
        if watcher is None:
            watcher = self._watchers[loop] = RunWatcher(store, self.app.settings.poll_interval)
        return watcher

    # -- triggering ----------------------------------------------------------------------------------------------

    async def _resolve(self, job: JobRef, store: Store) -> tuple[str, Job[Any, Any] | None, JobInfo | None]:
        if isinstance(job, Job):
            return job.name, job, None
        if not isinstance(job, str) or not job:
            raise JobNotFound(str(job), f"a job is named by a non-empty string or a job handle, not {job!r}")
        local = self.app.get_job(job)
        if local is not None:
            return job, local, None
        info = self._catalogue.get(job)
        if info is None:
            info = await store.get_job(job)
            if info is None:
                raise JobNotFound(job)
            self._catalogue[job] = info
        return job, None, info

    async def _new_run(
        self,
        store: Store,
        job: JobRef,
        args: Mapping[str, Any] | None,
        *,
        not_before: When,
        not_after: When,
        priority: int | None,
        dedup_id: str | None,
        queue: str | None,
        max_attempts: int | None,
        tags: Iterable[str] | None,
    ) -> NewRun:
        name, local, info = await self._resolve(job, store)
        if local is not None:
            data = local.validate(args)
            default_queue, default_priority = local.queue, local.options.priority
            default_attempts = local.options.retry.attempts
        else:
            assert info is not None
            data = validate_with_schema(name, info.args_schema, args)
            default_queue = info.queue
            default_priority = int(info.options.get("priority", 0))
            default_attempts = int(info.options.get("retry", {}).get("attempts", 3))
        now = store.now()
        start = _absolute(not_before, now, "not_before")
        end = _absolute(not_after, now, "not_after")
        if start is not None and end is not None and end <= start:
            raise InvalidArguments(f"not_after must be later than not_before for job {name!r}")
        if max_attempts is not None and max_attempts < 1:
            raise InvalidArguments(f"max_attempts must be at least 1, got {max_attempts}")
        if dedup_id is not None and (not isinstance(dedup_id, str) or not dedup_id):
            raise InvalidArguments("dedup_id must be a non-empty string")
        if isinstance(tags, str):
            raise InvalidArguments("tags must be a list of strings, not one string")
        return NewRun(
            job=name,
            args=data,
            queue=queue or default_queue,
            priority=default_priority if priority is None else int(priority),
            max_attempts=default_attempts if max_attempts is None else max_attempts,
            not_before=start,
            not_after=end,
            dedup_id=dedup_id,
            tags=tuple(str(t) for t in tags or ()),
            parent_run_id=self.parent_run_id,
        )

    async def trigger(
        self,
        job: JobRef,
        args: Mapping[str, Any] | None = None,
        *,
        not_before: When = None,
        not_after: When = None,
        priority: int | None = None,
        dedup_id: str | None = None,
        queue: str | None = None,
        max_attempts: int | None = None,
        tags: Iterable[str] | None = None,
        on_conflict: ConflictPolicy = "raise",
    ) -> Run:
        """Enqueue one run and return it at once (``pending``, or ``scheduled`` when ``not_before`` is later)."""
        store = await self._store()
        new = await self._new_run(
            store,
            job,
            args,
            not_before=not_before,
            not_after=not_after,
            priority=priority,
            dedup_id=dedup_id,
            queue=queue,
            max_attempts=max_attempts,
            tags=tags,
        )
        (run,) = await store.insert_runs([new], on_conflict=on_conflict)
        return run

    async def trigger_many(
        self,
        job: JobRef,
        args_list: Sequence[Mapping[str, Any] | None],
        *,
        not_before: When = None,
        not_after: When = None,
        priority: int | None = None,
        queue: str | None = None,
        max_attempts: int | None = None,
        tags: Iterable[str] | None = None,
        chunk_size: int = 5000,
    ) -> list[Run]:
        """Enqueue many runs of one job, one store round trip per chunk. All arguments are validated before
        anything is written; a chunk is written all-or-nothing."""
        store = await self._store()
        tag_tuple = tuple(tags or ())
        news = [
            await self._new_run(
                store,
                job,
                args,
                not_before=not_before,
                not_after=not_after,
                priority=priority,
                dedup_id=None,
                queue=queue,
                max_attempts=max_attempts,
                tags=tag_tuple,
            )
            for args in args_list
        ]
        runs: list[Run] = []
        for start in range(0, len(news), chunk_size):
            runs.extend(await store.insert_runs(news[start : start + chunk_size]))
        return runs

    # -- waiting -----------------------------------------------------------------------------------------------

    async def wait(self, run_id: int, timeout: float | None = None) -> Run:
        """Wait until the run is terminal and return it; TimeoutError after ``timeout`` seconds."""
        store = await self._store()
        return await self._watcher(store).wait_terminal(run_id, timeout)

    async def result(self, run_id: int, timeout: float | None = None) -> Any:
        """Wait and return the result; RunFailed / RunCancelled when the run did not succeed."""
        return _outcome(await self.wait(run_id, timeout))

    async def run(self, job: JobRef, args: Mapping[str, Any] | None = None, **options: Any) -> Any:
        """Trigger, wait and return the result. The call owns its run: cancelling the caller cancels it."""
        timeout = options.pop("timeout", None)
        created = await self.trigger(job, args, **options)
        try:
            final = await self.wait(created.id, timeout)
        except (asyncio.CancelledError, TimeoutError):
            await asyncio.shield(self.cancel(created.id))
            raise
        return _outcome(final)

    async def events(self, run_id: int, since: int | None = None) -> AsyncIterator[Event]:
        """Replay a run's events after ``since``, then follow them live until the run is terminal."""
        store = await self._store()
        notifier = store.notifier
        last = since
        while True:
            generation = notifier.generation("change")
            run = await store.get_run(run_id)
            if run is None:
                raise RunNotFound(run_id)
            while True:
                batch = await store.events(run_id, since=last)
                for event in batch:
                    last = event.id
                    yield event
                if len(batch) < 1000:
                    break
            if run.status.is_terminal:
                return  # read after the run was terminal, so nothing can follow
            await notifier.wait("change", generation, self.app.settings.poll_interval)

    # -- actions -------------------------------------------------------------------------------------------------

    async def cancel(self, run_id: int) -> bool:
        """Cancel a non-terminal run and its non-terminal descendants; False if it was already terminal."""
        store = await self._store()
        cancelled = await store.cancel_runs([run_id])
        if run_id in cancelled:
            return True
        if await store.get_run(run_id) is None:
            raise RunNotFound(run_id)
        return False

    async def retry(self, run_id: int) -> bool:
        """A failed or cancelled run back to ``pending`` under the same id; False in any other state."""
        store = await self._store()
        return await store.retry_run(run_id)

    async def rerun(self, run_id: int) -> Run:
        """A new run with the same job, arguments and options; the old run is left as it is."""
        store = await self._store()
        old = await store.get_run(run_id)
        if old is None:
            raise RunNotFound(run_id)
        new = NewRun(
            job=old.job,
            args=old.args,
            queue=old.queue,
            priority=old.priority,
            max_attempts=old.max_attempts,
            tags=old.tags,
            parent_run_id=self.parent_run_id,
        )
        (run,) = await store.insert_runs([new])
        return run

    # -- reading -------------------------------------------------------------------------------------------------

    async def get_run(self, run_id: int) -> Run | None:
        store = await self._store()
        return await store.get_run(run_id)

    async def list_runs(self, filter: RunFilter | None = None, limit: int | None = 100) -> AsyncIterator[Run]:
        """Runs newest first, paging by id underneath; ``limit=None`` iterates them all."""
        store = await self._store()
        filter = filter or RunFilter()
        before: int | None = None
        remaining = limit
        while remaining is None or remaining > 0:
            page_size = _PAGE if remaining is None else min(_PAGE, remaining)
            page = await store.list_runs(filter, limit=page_size, before_id=before)
            for run in page:
                yield run
            if len(page) < page_size:
                return
            before = page[-1].id
            if remaining is not None:
                remaining -= len(page)

    async def attempts(self, run_id: int) -> list[Attempt]:
        store = await self._store()
        if await store.get_run(run_id) is None:
            raise RunNotFound(run_id)
        return await store.attempts(run_id)

    async def aclose(self) -> None:
        for watcher in self._watchers.values():
            await watcher.aclose()
        self._watchers.clear()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _outcome(run: Run) -> Any:
    if run.status is RunStatus.SUCCEEDED:
        return run.result
    if run.status is RunStatus.CANCELLED:
        raise RunCancelled(run)
    raise RunFailed(run)
