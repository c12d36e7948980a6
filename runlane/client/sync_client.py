"""The blocking client: the same methods as ``AsyncClient``, each forwarded to it on a portal loop."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from runlane.models import Attempt, Batch, Event, QueueInfo, Run, RunFilter, RunTree
from runlane.store.base import ConflictPolicy, ContinueWhen

from .async_client import AsyncClient, JobRef, When
from .portal import Portal
from .schedules import Schedules
from .workflows import BatchItem

if TYPE_CHECKING:
    from runlane.app import Runlane


class Client:
    """For Django views, scripts and threads. Owns one background loop thread, shared by its children."""

    def __init__(self, app: Runlane, *, parent_run_id: int | None = None, portal: Portal | None = None):
        self.app = app
        self.portal = portal or Portal()
        self._owns_portal = portal is None
        self.async_client = AsyncClient(app, parent_run_id=parent_run_id)

    def with_parent(self, parent_run_id: int) -> Client:
        return Client(self.app, parent_run_id=parent_run_id, portal=self.portal)

    def trigger(
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
        options: dict[str, Any] = dict(
            not_before=not_before,
            not_after=not_after,
            priority=priority,
            dedup_id=dedup_id,
            queue=queue,
            max_attempts=max_attempts,
            tags=tags,
        )
        if _blocking(connection):
            # The caller's sync connection is driven on the caller's thread, not the shared loop: a dedup id
            # held by another open transaction then blocks only this caller.
            store, new = self.async_client.prepare_trigger_now(job, args, **options) or self.portal.call(
                self.async_client.prepare_trigger(job, args, **options)
            )
            (run,) = store.insert_runs_in_transaction_blocking(connection, [new], on_conflict=on_conflict)
            return run
        if connection is None:
            # On this thread once the store is open: no hand-over to the portal loop and back.
            prepared = self.async_client.prepare_trigger_now(job, args, **options)
            if prepared is not None:
                store, new = prepared
                runs = store.insert_runs_blocking([new], on_conflict=on_conflict)
                if runs is None:
                    runs = self.portal.call(self.async_client.insert_prepared([new], on_conflict=on_conflict))
                return runs[0]
        return self.portal.call(
            self.async_client.trigger(job, args, on_conflict=on_conflict, connection=connection, **options)
        )

    def trigger_many(
        self, job: JobRef, args_list: Sequence[Mapping[str, Any] | None], **options: Any
    ) -> list[Run]:
        connection = options.get("connection")
        if _blocking(connection):
            chunk_size = int(options.pop("chunk_size", 5000))
            del options["connection"]
            store, news = self.portal.call(self.async_client.prepare_trigger_many(job, args_list, **options))
            runs: list[Run] = []
            for start in range(0, len(news), chunk_size):
                runs.extend(
                    store.insert_runs_in_transaction_blocking(connection, news[start : start + chunk_size])
                )
            return runs
        return self.portal.call(self.async_client.trigger_many(job, args_list, **options))

    def run(self, job: JobRef, args: Mapping[str, Any] | None = None, **options: Any) -> Any:
        return self.portal.call(self.async_client.run(job, args, **options))

    def wait(self, run_id: int, timeout: float | None = None) -> Run:
        return self.portal.call(self.async_client.wait(run_id, timeout))

    def result(self, run_id: int, timeout: float | None = None) -> Any:
        return self.portal.call(self.async_client.result(run_id, timeout))

    def events(self, run_id: int, since: int | None = None) -> Iterator[Event]:
        return self.portal.iterate(self.async_client.events(run_id, since))

    def cancel(self, run_id: int) -> bool:
        return self.portal.call(self.async_client.cancel(run_id))

    def retry(self, run_id: int) -> bool:
        return self.portal.call(self.async_client.retry(run_id))

    def rerun(self, run_id: int) -> Run:
        return self.portal.call(self.async_client.rerun(run_id))

    def get_run(self, run_id: int) -> Run | None:
        return self.portal.call(self.async_client.get_run(run_id))

    def list_runs(self, filter: RunFilter | None = None, limit: int | None = 100) -> Iterator[Run]:
        return self.portal.iterate(self.async_client.list_runs(filter, limit))

    def attempts(self, run_id: int) -> list[Attempt]:
        return self.portal.call(self.async_client.attempts(run_id))

    # -- schedules and queues -------------------------------------------------------------------------------------

    @property
    def schedules(self) -> Schedules:
        return Schedules(self.async_client.schedules, self.portal)

    def pause_queue(self, name: str) -> None:
        self.portal.call(self.async_client.pause_queue(name))

    def resume_queue(self, name: str) -> None:
        self.portal.call(self.async_client.resume_queue(name))

    def queues(self) -> list[QueueInfo]:
        return self.portal.call(self.async_client.queues())

    # -- workflows (see AsyncClient: iterators are driven on the portal loop) ------------------------------------

    def stream(self, job: JobRef, args: Mapping[str, Any] | None = None, **options: Any) -> Iterator[Any]:
        return self.portal.iterate(self.async_client.stream(job, args, **options))

    def wait_stream(self, run_id: int, since: int | None = None) -> Iterator[Any]:
        return self.portal.iterate(self.async_client.wait_stream(run_id, since))

    def trigger_batch(
        self,
        job_or_items: JobRef | Iterable[BatchItem],
        args_list: Iterable[Mapping[str, Any] | None] | None = None,
        **options: Any,
    ) -> Batch:
        return self.portal.call(self.async_client.trigger_batch(job_or_items, args_list, **options))

    def run_batch(
        self,
        job_or_items: JobRef | Iterable[BatchItem],
        args_list: Iterable[Mapping[str, Any] | None] | None = None,
        **options: Any,
    ) -> list[Any]:
        return self.portal.call(self.async_client.run_batch(job_or_items, args_list, **options))

    def stream_batch(
        self,
        job_or_items: JobRef | Iterable[BatchItem],
        args_list: Iterable[Mapping[str, Any] | None] | None = None,
        **options: Any,
    ) -> Iterator[Any]:
        return self.portal.iterate(self.async_client.stream_batch(job_or_items, args_list, **options))

    def wait_each(self, batch_id: int) -> Iterator[Run]:
        return self.portal.iterate(self.async_client.wait_each(batch_id))

    def get_batch(self, batch_id: int) -> Batch | None:
        return self.portal.call(self.async_client.get_batch(batch_id))

    def cancel_batch(self, batch_id: int) -> int:
        return self.portal.call(self.async_client.cancel_batch(batch_id))

    def continue_with(
        self,
        parent_run_id: int,
        job: JobRef,
        args: Mapping[str, Any] | None = None,
        *,
        when: ContinueWhen = "succeeded",
        **options: Any,
    ) -> Run:
        return self.portal.call(
            self.async_client.continue_with(parent_run_id, job, args, when=when, **options)
        )

    def send(self, run_id: int, item: Any) -> None:
        self.portal.call(self.async_client.send(run_id, item))

    def close_input(self, run_id: int) -> None:
        self.portal.call(self.async_client.close_input(run_id))

    def tree(self, run_id: int) -> RunTree:
        return self.portal.call(self.async_client.tree(run_id))

    def close(self) -> None:
        """Stop this client's loop thread (the app's store stays open for others)."""
        if self._owns_portal and self.portal._loop is not None:
            self.portal.call(self.async_client.aclose())
            if self.app._store is not None:  # a pool bound to the portal loop must not outlive it
                self.portal.call(self.app._store.release_loop())
        if self._owns_portal:
            self.portal.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _blocking(connection: Any) -> bool:
    """A caller's connection whose calls block (a psycopg ``Connection``, not an ``AsyncConnection``). Its
    inserts run on the caller's thread: on the shared portal loop, one waiting for a dedup id held by an open
    transaction would stall every thread's calls, including the one that would end that transaction."""
    execute = getattr(type(connection), "execute", None) if connection is not None else None
    return execute is not None and not inspect.iscoroutinefunction(execute)
