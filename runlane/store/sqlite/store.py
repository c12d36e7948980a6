"""SQLiteStore: the store seam on one SQLite file (many processes on one host) or ``:memory:`` (one process).

Writes go to the writer thread (connection.Writer: group commit under ``BEGIN IMMEDIATE``), reads to a few
reader threads with their own connections, so a read never queues behind a write. After each commit the
store signals its notifier and, through wakeup.WakeChannel, the stores of other processes on the same file.
With ``:memory:`` there is one connection, owned by the writer thread, which then serves reads too.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from runlane.errors import StoreUnavailable
from runlane.models import Attempt, Batch, Event, JobInfo, Run, RunFilter
from runlane.store import base
from runlane.store.base import ConflictPolicy, EventDraft, Finish, Lease, NewRun, Store
from runlane.store.migrations import latest_version, load_migrations
from runlane.store.notify import Notifier, Topic
from runlane.store.sqlite import flow, reads, schema, writes
from runlane.store.sqlite.connection import Readers, Tx, Writer, connect
from runlane.store.sqlite.flow import SQLiteFlow
from runlane.store.sqlite.wakeup import WakeChannel
from runlane.store.sqlite.writelock import WriteLock

T = TypeVar("T")

MIGRATIONS = "runlane.store.sqlite.migrations"
PRUNE_BATCH = 500
"""Runs deleted per write transaction while pruning, so a large prune never holds the write lock for long."""


def parse_url(url: str) -> str:
    """``sqlite:///rel.db`` → ``rel.db``; ``sqlite:////abs.db`` → ``/abs.db``; ``sqlite:///:memory:``."""
    scheme, rest = base.split_url(url)
    if scheme != "sqlite" or not rest.startswith("/") or len(rest) < 2:
        raise StoreUnavailable(
            f"not a SQLite store URL: {url!r} (expected sqlite:///path.db or sqlite:///:memory:)"
        )
    return rest[1:]


class SQLiteStore(SQLiteFlow, Store):
    """See the module docstring. ``readers``: reader threads; ``wakeups``: cross-process wake-ups on/off."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] | None = None,
        readers: int = 4,
        wakeups: bool = True,
    ) -> None:
        self.url = url
        self.path = parse_url(url)
        self.in_memory = self.path == ":memory:"
        self.notifier = Notifier()
        self._clock = clock or time.time
        self._reader_threads = readers
        self._wakeups = wakeups and not self.in_memory
        self._lock = threading.Lock()
        self._writer: Writer | None = None
        self._readers: Readers | None = None
        self._wake: WakeChannel | None = None
        self._limits_active = False  # the last claim met limits: finishes then wake `work`

    def __repr__(self) -> str:
        return f"SQLiteStore({self.url!r})"

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._writer is None:
            await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> None:
        with self._lock:
            if self._writer is not None:
                return
            if not self.in_memory and os.path.isdir(self.path):
                raise StoreUnavailable(f"cannot open SQLite database {self.path!r}: it is a directory")
            conn = connect(self.path, writer=True)
            wal = None if self.in_memory else self.path + "-wal"
            lock = None if self.in_memory else WriteLock.open(self.path)
            self._writer = Writer(conn, after_commit=self._after_commit, wal_path=wal, lock=lock)
            if not self.in_memory:
                self._readers = Readers(self.path, threads=self._reader_threads)
            if self._wakeups:
                wake = WakeChannel(self.path, self._on_remote_wakeup)
                if wake.start():
                    self._wake = wake

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        with self._lock:
            writer, readers, wake = self._writer, self._readers, self._wake
            self._writer = self._readers = self._wake = None
        if writer is not None:
            writer.close()  # finishes what is queued first
            writer.conn.close()
            writer.close_lock()
        if readers is not None:
            readers.close()
        if wake is not None:
            wake.close()

    def _after_commit(self, topics: set[Topic]) -> None:
        self.notifier.notify(*topics)
        wake = self._wake
        if wake is not None:
            wake.send(topics)

    def _on_remote_wakeup(self, topics: set[Topic]) -> None:
        self.notifier.notify(*topics)

    def _require_writer(self) -> Writer:
        writer = self._writer
        if writer is None:
            raise StoreUnavailable(f"the SQLite store at {self.url} is not open")
        return writer

    async def _write(self, fn: Callable[[Tx], T]) -> T:
        return await self._require_writer().run(fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        readers = self._readers
        if readers is None:  # :memory: (or closed): the writer's connection is the only one
            return await self._require_writer().run(lambda tx: fn(tx.conn))
        return await readers.run(fn)

    def now(self) -> float:
        return self._clock()

    # -- schema -----------------------------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        migrations = load_migrations(MIGRATIONS)
        return await self._require_writer().run(
            lambda tx: schema.migrate(tx.conn, self.now(), migrations), exclusive=True
        )

    async def schema_version(self) -> tuple[int, int]:
        current = await self._read(schema.applied_version)
        return current, latest_version(MIGRATIONS)

    # -- catalogue and workers --------------------------------------------------------------------------------

    async def register_jobs(self, jobs: Sequence[JobInfo]) -> None:
        if jobs:
            await self._write(lambda tx: writes.register_jobs(tx, self.now(), jobs))

    async def get_job(self, name: str) -> JobInfo | None:
        return await self._read(lambda conn: reads.get_job(conn, name))

    async def register_worker(self, worker_id: str, info: dict[str, Any]) -> None:
        await self._write(lambda tx: writes.register_worker(tx, self.now(), worker_id, info))

    async def deregister_worker(self, worker_id: str) -> None:
        await self._write(lambda tx: writes.deregister_worker(tx, worker_id))

    # -- triggering and reading -------------------------------------------------------------------------------

    async def insert_runs(
        self, runs: Sequence[NewRun], *, on_conflict: ConflictPolicy = "raise"
    ) -> list[Run]:
        if not runs:
            return []
        return await self._write(lambda tx: writes.insert_runs(tx, self.now(), runs, on_conflict))

    def insert_runs_blocking(
        self, runs: Sequence[NewRun], *, on_conflict: ConflictPolicy = "raise"
    ) -> list[Run] | None:
        writer = self._writer
        if writer is None:  # not open: the loop path opens it
            return None
        if not runs:
            return []
        return writer.run_here(lambda tx: writes.insert_runs(tx, self.now(), runs, on_conflict))

    async def get_run(self, run_id: int) -> Run | None:
        return await self._read(lambda conn: reads.get_run(conn, run_id))

    async def get_runs(self, run_ids: Sequence[int]) -> list[Run]:
        return await self._read(lambda conn: reads.get_runs(conn, run_ids))

    async def list_runs(
        self, filter: RunFilter, *, limit: int = 100, before_id: int | None = None
    ) -> list[Run]:
        return await self._read(lambda conn: reads.list_runs(conn, filter, limit, before_id))

    async def attempts(self, run_id: int) -> list[Attempt]:
        return await self._read(lambda conn: reads.attempts(conn, run_id))

    async def events(self, run_id: int, *, since: int | None = None, limit: int = 1000) -> list[Event]:
        return await self._read(lambda conn: reads.events(conn, run_id, since, limit))

    async def append_events(self, events: Sequence[EventDraft], *, worker_id: str | None = None) -> set[int]:
        if not events:
            return set()
        return await self._write(lambda tx: writes.append_events(tx, self.now(), events, worker_id))

    # -- batches --------------------------------------------------------------------------------------------

    async def insert_batch(
        self, runs: Sequence[NewRun], *, parent_run_id: int | None = None
    ) -> tuple[Batch, list[Run]]:
        return await self._write(lambda tx: writes.insert_batch(tx, self.now(), runs, parent_run_id))

    async def get_batch(self, batch_id: int) -> Batch | None:
        return await self._read(lambda conn: reads.get_batch(conn, batch_id))

    async def batch_runs(
        self, batch_id: int, *, after_seq: int = 0, up_to_seq: int | None = None, limit: int = 1000
    ) -> list[tuple[int, Run]]:
        return await self._read(lambda conn: reads.batch_runs(conn, batch_id, after_seq, up_to_seq, limit))

    # -- user actions -----------------------------------------------------------------------------------------

    async def cancel_runs(self, run_ids: Sequence[int], *, reason: str = "cancelled by user") -> list[int]:
        if not run_ids:
            return []
        return await self._write(lambda tx: writes.cancel_runs(tx, self.now(), run_ids, reason))

    async def retry_run(self, run_id: int) -> bool:
        return await self._write(lambda tx: writes.retry_run(tx, self.now(), run_id))

    # -- worker verbs -----------------------------------------------------------------------------------------

    async def claim(
        self,
        worker_id: str,
        *,
        queues: Sequence[str],
        jobs: Sequence[str],
        limit: int,
        lease_timeout: float,
    ) -> list[Run]:
        def op(tx: Tx) -> list[Run]:
            runs, self._limits_active = flow.claim(
                tx, self.now(), worker_id, queues, jobs, limit, lease_timeout
            )
            return runs

        return await self._write(op)

    async def finish_and_claim(
        self,
        finishes: Sequence[Finish],
        *,
        worker_id: str,
        queues: Sequence[str],
        jobs: Sequence[str],
        limit: int,
        lease_timeout: float,
    ) -> tuple[list[bool], list[Run]]:
        """Both in one writer operation: one hop to the writer thread, one transaction, one commit."""

        def op(tx: Tx) -> tuple[list[bool], list[Run]]:
            now = self.now()
            done = writes.finish_attempts(tx, now, finishes, worker_id) if finishes else []
            if self._limits_active and any(done):
                tx.topics.add("work")
            runs: list[Run] = []
            if limit > 0:
                runs, self._limits_active = flow.claim(
                    tx, self.now(), worker_id, queues, jobs, limit, lease_timeout
                )
            return done, runs

        return await self._write(op)

    def heartbeat_blocking(self, worker_id: str, leases: Sequence[Lease], lease_timeout: float) -> set[int]:
        return self._require_writer().run_blocking(
            lambda tx: writes.heartbeat(tx, self.now(), worker_id, leases, lease_timeout)
        )

    async def held_leases(self, worker_id: str, leases: Sequence[Lease]) -> set[int]:
        return await self._read(lambda conn: reads.held_leases(conn, self.now(), worker_id, leases))

    async def finish_attempts(self, finishes: Sequence[Finish], *, worker_id: str) -> list[bool]:
        if not finishes:
            return []

        def op(tx: Tx) -> list[bool]:
            done = writes.finish_attempts(tx, self.now(), finishes, worker_id)
            if self._limits_active and any(done):
                tx.topics.add("work")  # a limit slot freed: workers held back by it may claim now
            return done

        return await self._write(op)

    async def release_runs(self, leases: Sequence[Lease], *, worker_id: str) -> list[int]:
        return await self._write(lambda tx: writes.release_runs(tx, self.now(), leases, worker_id))

    async def reap_expired_leases(self) -> list[int]:
        return await self._write(lambda tx: writes.reap_expired_leases(tx, self.now()))

    async def expire_runs(self) -> list[int]:
        return await self._write(lambda tx: writes.expire_runs(tx, self.now()))

    async def next_due_at(self, *, queues: Sequence[str], jobs: Sequence[str]) -> float | None:
        return await self._read(lambda conn: reads.next_due_at(conn, queues, jobs))

    # -- housekeeping -----------------------------------------------------------------------------------------

    async def prune(self, older_than: float) -> int:
        total = 0
        while True:
            deleted = await self._write(lambda tx: writes.prune(tx, older_than, PRUNE_BATCH))
            total += deleted
            if deleted < PRUNE_BATCH:
                return total
