"""The async client holds all client logic; the blocking ``Client`` forwards to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import fields, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from runlane.errors import (
    BatchFailed,
    BatchNotFound,
    InvalidArguments,
    JobNotFound,
    RunCancelled,
    RunFailed,
    RunFinished,
    RunNotFound,
)
from runlane.jobs import Job, validate_with_schema
from runlane.limits import concurrency_key_value
from runlane.models import (
    Attempt,
    Batch,
    Event,
    JobInfo,
    QueueInfo,
    Run,
    RunFilter,
    RunStatus,
    RunTree,
    to_timestamp,
)
from runlane.serialization import NotSerializable, to_jsonable
from runlane.store import EventDraft, NewRun, Store
from runlane.store.base import CONTINUE_WHEN, ConflictPolicy, ContinueWhen

from .schedules import AsyncSchedules
from .watcher import RunWatcher
from .workflows import BatchItem, build_tree, follow_batch

# Fields of a NewRun that trigger_many works out once, from its first item, and gives every other item.
_SHARED_FIELDS = tuple(f.name for f in fields(NewRun) if f.name not in ("args", "concurrency_key"))

if TYPE_CHECKING:
    from runlane.app import Runlane

JobRef = str | Job[Any, Any]
_BATCH_OPTIONS = frozenset({"not_before", "not_after", "priority", "queue", "max_attempts", "tags"})
When = datetime | timedelta | None
_PAGE = 200


def run_concurrency_key(
    name: str, local: Job[Any, Any] | None, info: JobInfo | None, data: Mapping[str, Any]
) -> str | None:
    """The partition of the job's limits a run counts in, computed once, at trigger time."""
    if local is not None:
        return concurrency_key_value(local.options.concurrency_key, data, name)
    spec = info.options.get("concurrency_key") if info is not None else None
    if isinstance(spec, dict):
        raise InvalidArguments(
            f"job {name!r} computes its concurrency key in code: trigger it from a process that defines the job"
        )
    return concurrency_key_value(spec if isinstance(spec, str) else None, data, name)


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
        known = self._resolve_known(job)
        if known is not None:
            return known
        assert isinstance(job, str)
        info = await store.get_job(job)
        if info is None:
            raise JobNotFound(job)
        self._catalogue[job] = info
        return job, None, info

    def _resolve_known(self, job: JobRef) -> tuple[str, Job[Any, Any] | None, JobInfo | None] | None:
        """``_resolve`` without the store: None for a job only the store's catalogue can name."""
        if isinstance(job, Job):
            return job.name, job, None
        if not isinstance(job, str) or not job:
            raise JobNotFound(str(job), f"a job is named by a non-empty string or a job handle, not {job!r}")
        local = self.app.get_job(job)
        if local is not None:
            return job, local, None
        info = self._catalogue.get(job)
        return None if info is None else (job, None, info)

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
        return self._build_run(
            store,
            name,
            local,
            info,
            args,
            not_before=not_before,
            not_after=not_after,
            priority=priority,
            dedup_id=dedup_id,
            queue=queue,
            max_attempts=max_attempts,
            tags=tags,
        )

    def _build_run(
        self,
        store: Store,
        name: str,
        local: Job[Any, Any] | None,
        info: JobInfo | None,
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
            concurrency_key=run_concurrency_key(name, local, info, data),
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
        connection: Any = None,
    ) -> Run:
        """Enqueue one run and return it at once (``pending``, or ``scheduled`` when ``not_before`` is later).

        ``connection``: a psycopg connection (sync or async) inside the caller's transaction; the run is
        inserted in that transaction and exists iff it commits (PostgreSQL only). A sync connection is driven
        on this loop, blocking it: with a ``dedup_id`` held by another open transaction, until that one ends
        (the blocking ``Client`` drives it on the caller's thread instead)."""
        store, new = await self.prepare_trigger(
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
        if connection is not None:
            (run,) = await store.insert_runs_in_transaction(connection, [new], on_conflict=on_conflict)
        else:
            (run,) = await store.insert_runs([new], on_conflict=on_conflict)
        return run

    async def prepare_trigger(
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
    ) -> tuple[Store, NewRun]:
        """The store and the validated run that ``trigger`` would insert."""
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
        return store, new

    def prepare_trigger_now(
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
    ) -> tuple[Store, NewRun] | None:
        """``prepare_trigger`` without awaiting, on the calling thread (the blocking client's fast path):
        None when that needs the store first (not opened yet, or a job only its catalogue knows)."""
        store = self.app.ready_store()
        if store is None:
            return None
        known = self._resolve_known(job)
        if known is None:
            return None
        name, local, info = known
        new = self._build_run(
            store,
            name,
            local,
            info,
            args,
            not_before=not_before,
            not_after=not_after,
            priority=priority,
            dedup_id=dedup_id,
            queue=queue,
            max_attempts=max_attempts,
            tags=tags,
        )
        return store, new

    async def insert_prepared(
        self, runs: Sequence[NewRun], *, on_conflict: ConflictPolicy = "raise"
    ) -> list[Run]:
        """Insert runs made by the ``prepare_*`` methods."""
        store = await self._store()
        return await store.insert_runs(runs, on_conflict=on_conflict)

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
        connection: Any = None,
    ) -> list[Run]:
        """Enqueue many runs of one job, one store round trip per chunk. All arguments are validated before
        anything is written; a chunk is written all-or-nothing. With ``connection`` (PostgreSQL), all of
        them go into the caller's transaction."""
        store, news = await self.prepare_trigger_many(
            job,
            args_list,
            not_before=not_before,
            not_after=not_after,
            priority=priority,
            queue=queue,
            max_attempts=max_attempts,
            tags=tags,
        )
        chunks = [news[start : start + chunk_size] for start in range(0, len(news), chunk_size)]
        if connection is None:
            return await store.insert_chunks(chunks)
        runs: list[Run] = []
        for chunk in chunks:
            runs.extend(await store.insert_runs_in_transaction(connection, chunk))
        return runs

    async def prepare_trigger_many(
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
    ) -> tuple[Store, list[NewRun]]:
        """The store and the validated runs that ``trigger_many`` would insert."""
        store = await self._store()
        tag_tuple = tuple(tags or ())
        news: list[NewRun] = []
        if args_list:
            # Options, defaults and times are the same for every item: work them out once, with the first
            # item, then validate each item's arguments and compute its concurrency key.
            first = await self._new_run(
                store,
                job,
                args_list[0],
                not_before=not_before,
                not_after=not_after,
                priority=priority,
                dedup_id=None,
                queue=queue,
                max_attempts=max_attempts,
                tags=tag_tuple,
            )
            name, local, info = await self._resolve(job, store)
            news.append(first)
            # Keyword construction from the first item's fields: dataclasses.replace costs ~7 us per run.
            shared = {f: getattr(first, f) for f in _SHARED_FIELDS}
            for args in args_list[1:]:
                if local is not None:
                    data = local.validate(args)
                else:
                    assert info is not None
                    data = validate_with_schema(name, info.args_schema, args)
                key = run_concurrency_key(name, local, info, data)
                news.append(NewRun(args=data, concurrency_key=key, **shared))
        return store, news

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
        try:
            name, local, info = await self._resolve(old.job, store)
            key = run_concurrency_key(name, local, info, old.args)
        except (JobNotFound, InvalidArguments):
            key = None  # no definition here: the new run counts in the job's unkeyed partition
        new = NewRun(
            job=old.job,
            args=old.args,
            queue=old.queue,
            priority=old.priority,
            max_attempts=old.max_attempts,
            tags=old.tags,
            parent_run_id=self.parent_run_id,
            concurrency_key=key,
        )
        inputs: list[Any] = []
        since = 0
        while True:  # input items are part of what the run was asked to do: the new run gets them too
            page = await store.events(run_id, since=since)
            inputs.extend(e.data for e in page if e.kind == "input")
            if len(page) < 1000:
                break
            since = page[-1].id
        (run,) = await store.insert_runs([new])
        if inputs:
            await store.append_events([EventDraft(run.id, "input", data) for data in inputs])
        return run

    # -- workflows: streams, batches, continuations, inputs, trees --------------------------------------------------

    async def wait_stream(self, run_id: int, since: int | None = None) -> AsyncIterator[Any]:
        """Observe a streaming run: its output items in order, live, from event id ``since`` (exclusive), until
        it ends; then RunFailed / RunCancelled if it did not succeed (after the items it produced). A retried
        attempt's items follow the failed attempt's. Stopping the iteration leaves the run alone."""
        async for event in self.events(run_id, since):
            if event.kind == "output":
                yield event.data
        final = await self.get_run(run_id)
        if final is None:
            raise RunNotFound(run_id)
        _outcome(final)

    async def stream(
        self, job: JobRef, args: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncIterator[Any]:
        """Trigger a streaming job and yield its outputs as they are produced (see ``wait_stream``). The
        call owns its run: cancelling the caller, or closing the iterator before the run ends, cancels it."""
        store = await self._store()
        name, local, _ = await self._resolve(job, store)
        if local is not None and not local.is_streaming:
            raise InvalidArguments(f"job {name!r} is not a streaming job (a generator or async generator)")
        created = await self.trigger(job, args, **options)
        ended = False
        try:
            async for item in self.wait_stream(created.id):
                yield item
            ended = True
        except RunFailed:
            ended = True
            raise
        finally:
            if not ended:
                await asyncio.shield(self.cancel(created.id))

    async def _start_batch(
        self,
        job_or_items: JobRef | Iterable[BatchItem],
        args_list: Iterable[Mapping[str, Any] | None] | None,
        options: dict[str, Any],
    ) -> tuple[Batch, list[Run]]:
        if isinstance(job_or_items, (str, Job)):
            if args_list is None:
                raise InvalidArguments("run_batch(job, [args, …]) needs a list of arguments")
            items = [BatchItem(job_or_items, args) for args in args_list]
        else:
            if args_list is not None:
                raise InvalidArguments("run_batch([BatchItem(job, args), …]) takes no separate arguments")
            items = list(job_or_items)
            for item in items:
                if not isinstance(item, BatchItem):
                    raise InvalidArguments(f"run_batch items must be BatchItem(job, args), not {item!r}")
        unknown = set(options) - _BATCH_OPTIONS
        if unknown:
            raise TypeError(
                f"unexpected batch options: {sorted(unknown)} (allowed: {sorted(_BATCH_OPTIONS)})"
            )
        store = await self._store()
        settings = {name: options.get(name) for name in _BATCH_OPTIONS}
        news = [await self._new_run(store, it.job, it.args, dedup_id=None, **settings) for it in items]
        return await store.insert_batch(news, parent_run_id=self.parent_run_id)

    async def trigger_batch(
        self,
        job_or_items: JobRef | Iterable[BatchItem],
        args_list: Iterable[Mapping[str, Any] | None] | None = None,
        **options: Any,
    ) -> Batch:
        """Create a batch of children in one store round trip and return it at once (see ``wait_each``).
        ``options``: ``not_before, not_after, priority, queue, max_attempts, tags`` for every child."""
        batch, _ = await self._start_batch(job_or_items, args_list, options)
        return batch

    async def run_batch(
        self,
        job_or_items: JobRef | Iterable[BatchItem],
        args_list: Iterable[Mapping[str, Any] | None] | None = None,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> list[Any]:
        """Fan out children in one batch, wait for all and return their results in input order. Raises
        BatchFailed (the RunFailed / RunCancelled of each child that did not succeed) once all have ended.
        The call owns its batch: cancelling the caller (or ``timeout``) cancels the unfinished children."""
        batch, children = await self._start_batch(job_or_items, args_list, options)
        store = await self._store()
        final: dict[int, Run] = {}
        try:
            async with asyncio.timeout(timeout):
                async for run in follow_batch(store, batch.id, self.app.settings.poll_interval):
                    final[run.id] = run
        except (asyncio.CancelledError, TimeoutError):
            await asyncio.shield(
                store.cancel_batch(batch.id, reason=f"the caller of run_batch {batch.id} stopped")
            )
            raise
        ends = [final[child.id] for child in children]
        failures = [_failure(run) for run in ends if run.status is not RunStatus.SUCCEEDED]
        if failures:
            raise BatchFailed(
                f"{len(failures)} of {len(ends)} children of batch {batch.id} did not succeed", failures
            )
        return [run.result for run in ends]

    async def stream_batch(
        self,
        job_or_items: JobRef | Iterable[BatchItem],
        args_list: Iterable[Mapping[str, Any] | None] | None = None,
        **options: Any,
    ) -> AsyncIterator[Any]:
        """Fan out like ``run_batch`` and yield each child's result as it finishes (completion order).
        Fail-fast: raises the first failed child's RunFailed / RunCancelled; the other children keep running.
        Owned: cancelling the caller or closing the iterator early cancels the unfinished children."""
        batch, _ = await self._start_batch(job_or_items, args_list, options)
        store = await self._store()
        ended = False
        try:
            async for run in follow_batch(store, batch.id, self.app.settings.poll_interval):
                if run.status is not RunStatus.SUCCEEDED:
                    ended = True
                    raise _failure(run)
                yield run.result
            ended = True
        finally:
            if not ended:
                await asyncio.shield(
                    store.cancel_batch(batch.id, reason=f"the caller of stream_batch {batch.id} stopped")
                )

    async def wait_each(self, batch_id: int) -> AsyncIterator[Run]:
        """Observe an existing batch: yield each child run as it ends, until all have. BatchNotFound if none."""
        store = await self._store()
        async for run in follow_batch(store, batch_id, self.app.settings.poll_interval):
            yield run

    async def get_batch(self, batch_id: int) -> Batch | None:
        store = await self._store()
        return await store.get_batch(batch_id)

    async def cancel_batch(self, batch_id: int) -> int:
        """Cancel every non-terminal child of a batch (and their descendants); return how many children."""
        store = await self._store()
        if await store.get_batch(batch_id) is None:
            raise BatchNotFound(batch_id)
        return await store.cancel_batch(batch_id)

    async def continue_with(
        self,
        parent_run_id: int,
        job: JobRef,
        args: Mapping[str, Any] | None = None,
        *,
        when: ContinueWhen = "succeeded",
        on_conflict: ConflictPolicy = "raise",
        **options: Any,
    ) -> Run:
        """A run that waits (``scheduled``) until ``parent_run_id`` ends, then starts if the parent's outcome
        matches ``when`` (``succeeded``, ``failed``, ``cancelled`` or ``finished`` = any) and is cancelled
        otherwise. Decided at once when the parent has already ended. Its ``parent_run_id`` is the parent."""
        if when not in CONTINUE_WHEN:
            raise InvalidArguments(f"when must be one of {list(CONTINUE_WHEN)}, not {when!r}")
        unknown = set(options) - _BATCH_OPTIONS - {"dedup_id"}
        if unknown:
            raise TypeError(f"unexpected options: {sorted(unknown)}")
        store = await self._store()
        settings = {name: options.get(name) for name in (*_BATCH_OPTIONS, "dedup_id")}
        new = await self._new_run(store, job, args, **settings)
        new = replace(new, parent_run_id=parent_run_id, continue_when=when)
        (run,) = await store.insert_runs([new], on_conflict=on_conflict)
        return run

    async def send(self, run_id: int, item: Any) -> None:
        """Append an input item for a run that has not ended (``ctx.inputs()`` receives it). RunNotFound for
        a missing run, RunFinished for one that has ended."""
        try:
            data = to_jsonable(item)
        except NotSerializable as exc:
            raise InvalidArguments(f"an input item must be JSON-serialisable: {exc}") from None
        await self._append_input(run_id, {"item": data})

    async def close_input(self, run_id: int) -> None:
        """Mark the end of a run's input: ``ctx.inputs()`` stops once it has delivered the items before it."""
        await self._append_input(run_id, {"end": True})

    async def _append_input(self, run_id: int, data: dict[str, Any]) -> None:
        store = await self._store()
        if await store.append_events([EventDraft(run_id, "input", data)]):
            run = await store.get_run(run_id)
            if run is None:
                raise RunNotFound(run_id)
            raise RunFinished(run_id, run.status.value)

    async def tree(self, run_id: int) -> RunTree:
        """The whole tree of the run's root: ``RunTree(run, children)``, each level in creation order."""
        store = await self._store()
        run = await store.get_run(run_id)
        if run is None:
            raise RunNotFound(run_id)
        runs = [r async for r in self.list_runs(RunFilter(root_run_id=run.root_run_id), limit=None)]
        return build_tree(runs or [run], run.root_run_id)

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

    # -- schedules and queues --------------------------------------------------------------------------------

    @property
    def schedules(self) -> AsyncSchedules:
        """Recurring triggers: ``add``, ``get``, ``list``, ``pause``, ``resume``, ``toggle``, ``remove``."""
        return AsyncSchedules(self)

    async def pause_queue(self, name: str) -> None:
        """Stop workers from claiming runs of ``name``; the queue keeps accepting runs."""
        store = await self._store()
        await store.set_queue_paused(name, True)

    async def resume_queue(self, name: str) -> None:
        store = await self._store()
        await store.set_queue_paused(name, False)

    async def queues(self) -> list[QueueInfo]:
        """Every known queue: active runs by status, whether it is paused, and its limits."""
        store = await self._store()
        return await store.queue_stats()

    async def aclose(self) -> None:
        for watcher in self._watchers.values():
            await watcher.aclose()
        self._watchers.clear()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _failure(run: Run) -> RunFailed:
    return RunCancelled(run) if run.status is RunStatus.CANCELLED else RunFailed(run)


def _outcome(run: Run) -> Any:
    if run.status is RunStatus.SUCCEEDED:
        return run.result
    if run.status is RunStatus.CANCELLED:
        raise RunCancelled(run)
    raise RunFailed(run)
