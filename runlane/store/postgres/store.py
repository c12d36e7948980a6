"""PostgresStore: the store seam on PostgreSQL with psycopg 3.

Connections: one ``AsyncConnectionPool`` per running event loop (an async pool is bound to the loop that
opened it, and the store is shared by the sync client's loop thread and the worker's loop), a synchronous
connection for ``heartbeat_blocking`` (called from a plain thread while a job may block the loop), a pool of
synchronous connections for ``insert_runs_blocking`` (the blocking client's triggers, opened at the first),
and the listener's own connection. Each pool lends one connection to the store (its "held" one), which any
call takes when it is free: sequential calls then reuse one warm backend instead of the pool's round robin.
Every verb is one statement (batches go through UNNEST) or, for claims, one short transaction; wake-ups are
NOTIFYed from inside the statement that made the change and signalled locally after it commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, LiteralString, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq, sql
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from runlane.errors import RunConflict, RunNotFound, StoreUnavailable
from runlane.models import Attempt, Batch, Event, JobInfo, Run, RunFilter, RunStatus, to_datetime
from runlane.serialization import dumps
from runlane.store.base import ConflictPolicy, EventDraft, Finish, Lease, NewRun, Store
from runlane.store.migrations import load_migrations
from runlane.store.notify import TOPICS, Notifier, Topic
from runlane.store.postgres import insert as ins
from runlane.store.postgres.config import PostgresOptions, hide_password, merge_conninfo
from runlane.store.postgres.flow import PostgresFlow
from runlane.store.postgres.listener import Listener, channel_array
from runlane.store.postgres.queries import RUN_COLUMNS, RUN_FILTERS, Q
from runlane.store.postgres.rows import (
    BATCH_WIDTH,
    append_params,
    attempt_from_row,
    batch_from_row,
    event_from_row,
    finish_params,
    int_array,
    job_from_row,
    rounds,
    run_from_row,
    text_array,
)
from runlane.store.postgres.trip import one_trip

log = logging.getLogger("runlane.store.postgres")

T = TypeVar("T")
AConn = psycopg.AsyncConnection[Any]
Pool = AsyncConnectionPool[AConn]

MIGRATIONS_PACKAGE = "runlane.store.postgres.migrations"
MIGRATION_LOCK = 0x72756E6C616E65  # "runlane": serialises concurrent migrators across processes
PROMOTE_LIMIT = 1000
_RETRIES = 5  # deadlocks and serialization failures are retried; the transaction was rolled back
HELD_FOR = 60.0
"""Seconds a loop's held connection stays out of its pool at a time (see ``_LoopPool``)."""
CLOCK_REFRESH = 30.0
"""Seconds between readings of the database's clock; in between, this host's monotonic clock measures the
time elapsed since the last reading (it never jumps, unlike the wall clock, but stops while a host sleeps)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1].strip() if text else type(exc).__name__


async def _fetch_all(conn: AConn, step: ins.Step) -> list[tuple[Any, ...]]:
    cur = await conn.execute(*step)
    return await cur.fetchall()


def _still_holdable(conn: AConn | psycopg.Connection[Any], held_until: float) -> bool:
    """A held connection goes back to its pool when broken, left mid-transaction, or held for long enough
    that the pool's own policies (``max_lifetime``, replacing broken connections) should apply to it."""
    return (
        not conn.broken
        and conn.info.transaction_status == pq.TransactionStatus.IDLE
        and time.monotonic() <= held_until
    )


@dataclass(slots=True)
class _LoopPool:
    """One event loop's pool and the connection the store holds out of it.

    psycopg's pool hands its connections out in turn, so one client triggering in sequence talks to
    another backend each time once the pool has grown past one: measured ~0.14 ms more per trigger, and
    ~90 us more client CPU, than on one connection. The held connection serves whichever call finds it
    free; concurrent calls take pooled ones as before."""

    pool: Pool
    opened: bool = False
    held: AConn | None = None
    busy: bool = False
    held_until: float = 0.0
    """Monotonic time after which the held connection goes back to the pool, so that the pool's own
    policies (``max_lifetime``, replacing broken connections) keep applying to it."""

    async def take(self) -> AConn:
        if self.held is None:
            self.held = await self.pool.getconn()
            self.held_until = time.monotonic() + HELD_FOR
        return self.held

    async def settle(self, conn: AConn) -> None:
        """After a call on the held connection: keep it only if it is idle, healthy and not held too long."""
        if not _still_holdable(conn, self.held_until):
            await self.release()  # the pool rolls it back or replaces it as needed

    async def release(self) -> None:
        held, self.held = self.held, None
        if held is not None:
            await self.pool.putconn(held)

    async def close(self) -> None:
        await self.release()
        await self.pool.close()


class _ThreadSidePool:
    """The blocking inserts' pool of sync connections, with one connection held out of it as ``_LoopPool``
    holds one (the same round-robin cost): the call that finds it free uses it, concurrent calls the pool."""

    def __init__(self, pool: ConnectionPool[psycopg.Connection[Any]]) -> None:
        self.pool = pool
        self.held: psycopg.Connection[Any] | None = None
        self.held_until = 0.0
        self._lock = threading.Lock()  # taken by the call using the held connection

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        if self.pool.max_size < 2 or not self._lock.acquire(blocking=False):
            with self.pool.connection() as conn:
                yield conn
            return
        try:
            held, self.held = self.held, None
            if held is None:
                conn = self.pool.getconn()
                self.held_until = time.monotonic() + HELD_FOR
            else:
                conn = held
            try:
                yield conn
            except BaseException:
                self.pool.putconn(conn)  # the pool rolls it back or replaces it as needed
                raise
            if _still_holdable(conn, self.held_until):
                self.held = conn
            else:
                self.pool.putconn(conn)
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:  # after a call in progress on the held connection
            held, self.held = self.held, None
            if held is not None:
                self.pool.putconn(held)
        self.pool.close()


class PostgresStore(PostgresFlow, Store):
    """A store on PostgreSQL. Options (also from the URL's query string): see ``PostgresOptions``."""

    def __init__(self, url: str, *, clock: Callable[[], float] | None = None, **options: Any) -> None:
        self.url = url
        self.notifier = Notifier()
        self._clock = clock
        self._conninfo, self.options = PostgresOptions.parse(url, options)
        self._token = secrets.token_hex(8)  # marks this store's own NOTIFYs, which it already signalled
        self._lock = threading.Lock()
        self._pools: dict[asyncio.AbstractEventLoop, _LoopPool] = {}
        self._hb_lock = threading.Lock()
        self._hb_conn: psycopg.Connection[Any] | None = None
        self._blocking_pool: _ThreadSidePool | None = None  # insert_runs_blocking's, opened at its first call
        self._blocking_lock = threading.Lock()
        self._listener: Listener | None = None  # started by listen() or the notifier's first wait
        self._opened = False
        self._migrations = load_migrations(MIGRATIONS_PACKAGE)
        self._db_clock: tuple[float, float] | None = None  # (database epoch seconds, monotonic) when read

    @property
    def display_url(self) -> str:
        return hide_password(self.url)

    @property
    def listener(self) -> Listener | None:
        """The LISTEN thread once started (tests and operators read its state)."""
        return self._listener

    def now(self) -> float:
        """The database's clock (the injected one in tests), not this host's: every worker must agree on
        which fires are due and when ``not_before`` passes, whatever its own clock says (T13). Read at open
        and every ``CLOCK_REFRESH`` seconds, and carried forward in between by the monotonic clock."""
        if self._clock is not None:
            return self._clock()
        reading = self._db_clock
        if reading is None:  # not opened yet: nothing better to go by
            return time.time()
        return reading[0] + (time.monotonic() - reading[1])

    def _clock_stale(self) -> bool:
        reading = self._db_clock
        return self._clock is None and (reading is None or time.monotonic() - reading[1] > CLOCK_REFRESH)

    async def _read_clock(self, conn: AConn) -> None:
        sent = time.monotonic()
        cur = await conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
        row = await cur.fetchone()
        received = time.monotonic()
        if row is not None:  # the server read its clock about halfway through the round trip
            self._db_clock = (float(row[0]) + (received - sent) / 2, received)

    def _now(self) -> datetime | None:
        """The ``now`` parameter: the injected clock, else None so that SQL uses the database's clock."""
        return to_datetime(self._clock()) if self._clock is not None else None

    def _conninfo_for(self, role: str = "") -> str:
        return merge_conninfo(self._conninfo, self.options.connect_kwargs(role=role))

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._opened:
            return
        try:
            conn = await psycopg.AsyncConnection.connect(self._conninfo_for())
        except psycopg.Error as exc:
            raise StoreUnavailable(
                f"cannot connect to PostgreSQL at {self.display_url}: {_first_line(exc)}"
            ) from exc
        try:
            await self._read_clock(conn)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"PostgreSQL at {self.display_url} failed: {_first_line(exc)}") from exc
        finally:
            await conn.close()
        await self._pool()
        with self._lock:
            self._opened = True
            # Every NOTIFY on a channel we listen to, our own included, wakes the LISTEN thread: about 0.2 ms
            # of CPU per trigger here, a quarter of a trigger's cost, in a process that may never wait.
            self.notifier.on_first_wait(self._listen_soon)

    async def listen(self, topics: Iterable[Topic] = TOPICS) -> None:
        topics = set(topics)
        listener = self._listen_soon(*topics)
        if not await asyncio.to_thread(listener.wait_listening, self.options.connect_timeout, topics=topics):
            log.warning("LISTEN on %s not ready yet; wake-ups fall back to polling", self.display_url)

    def _listen_soon(self, *topics: Topic) -> Listener:
        with self._lock:
            listener = self._listener
            if listener is None:
                listener = self._listener = Listener(
                    self._conninfo_for("listener"), self.notifier, self._token, topics
                )
                listener.start()
            else:
                listener.want(topics)
        return listener

    async def close(self) -> None:
        with self._lock:
            pools, self._pools = self._pools, {}
            listener, self._listener = self._listener, None
            self._opened = False
            self.notifier.on_first_wait(None)
        if listener is not None:
            await asyncio.to_thread(listener.stop)
        current = asyncio.get_running_loop()
        for loop, entry in pools.items():
            if loop is current:
                await entry.close()
            elif not loop.is_closed() and loop.is_running():
                future = asyncio.run_coroutine_threadsafe(entry.close(), loop)
                try:
                    await asyncio.wait_for(asyncio.wrap_future(future), 10)
                except (TimeoutError, RuntimeError) as exc:
                    log.warning("could not close the connection pool of another event loop: %r", exc)
        with self._hb_lock:
            if self._hb_conn is not None:
                self._hb_conn.close()
                self._hb_conn = None
        with self._lock:
            blocking, self._blocking_pool = self._blocking_pool, None
        if blocking is not None:
            await asyncio.to_thread(blocking.close)

    async def release_loop(self) -> None:
        with self._lock:
            entry = self._pools.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry.close()

    async def _pool(self) -> _LoopPool:
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._pools.get(loop)
            if entry is None:
                for other in [lp for lp in self._pools if lp.is_closed()]:
                    del self._pools[other]  # its loop is gone and took the pool's tasks with it
                kwargs = {"autocommit": True, "prepare_threshold": self.options.prepare_threshold}
                pool: Pool = AsyncConnectionPool(
                    self._conninfo_for(),
                    min_size=self.options.pool_min_size,
                    max_size=self.options.pool_max_size,
                    timeout=self.options.pool_timeout,
                    kwargs=kwargs,
                    open=False,
                    name=f"runlane-{id(loop):x}",
                )
                entry = _LoopPool(pool)
                self._pools[loop] = entry
        if not entry.opened:
            await entry.pool.open()
            entry.opened = True
        return entry

    async def _run(self, body: Callable[[AConn], Awaitable[T]], *, retry_disconnect: bool = True) -> T:
        """Run ``body`` on a pooled connection; driver failures become StoreUnavailable.

        A pooled connection may have died while idle (a server restart, an idle-session timeout): such a
        failure is retried on a fresh connection when ``body`` is safe to repeat. Every worker write is
        fenced and every read is harmless, so only inserts and claims opt out: a commit whose reply was lost
        could otherwise insert twice, or lease runs to a worker that never hears of them (the worker, told,
        hands such runs back: see ``Worker._release_orphans``).
        """
        lp = await self._pool()
        for attempt in range(_RETRIES):
            try:
                if lp.busy or self.options.pool_max_size < 2:  # (with one, holding it would starve the rest)
                    async with lp.pool.connection() as conn:
                        return await self._call(conn, body)
                lp.busy = True
                try:
                    conn = await lp.take()
                    try:
                        return await self._call(conn, body)
                    finally:
                        await lp.settle(conn)
                finally:
                    lp.busy = False
            except (psycopg.OperationalError, pg_errors.IdleInTransactionSessionTimeout) as exc:
                self._retry_or_raise(exc, attempt, retry_disconnect)
        raise AssertionError("unreachable")

    def _retry_or_raise(self, exc: psycopg.Error, attempt: int, retry_disconnect: bool) -> None:
        """Return if a failed body may run again; else raise StoreUnavailable from ``exc``."""
        if isinstance(exc, pg_errors.DeadlockDetected | pg_errors.SerializationFailure):
            if attempt == _RETRIES - 1:
                raise StoreUnavailable(f"PostgreSQL kept aborting a transaction: {_first_line(exc)}") from exc
            log.info("retrying after %s", type(exc).__name__)
            return
        if isinstance(exc, PoolTimeout):
            raise StoreUnavailable(
                f"no connection to PostgreSQL at {self.display_url} within {self.options.pool_timeout}s"
            ) from exc
        if isinstance(exc, pg_errors.IdleInTransactionSessionTimeout):
            # A transaction guarded by a short idle timeout (a fire or a limited claim, see flow.py) sat
            # idle because this process stopped; the server ended it (and rolled it back).
            raise StoreUnavailable(f"PostgreSQL ended an idle transaction: {_first_line(exc)}") from exc
        disconnect = isinstance(exc, psycopg.OperationalError) and _is_disconnect(exc)
        if retry_disconnect and attempt < _RETRIES - 1 and disconnect:
            log.info("PostgreSQL connection lost (%s); retrying on a fresh one", _first_line(exc))
            return
        raise StoreUnavailable(f"PostgreSQL at {self.display_url} failed: {_first_line(exc)}") from exc

    async def _call(self, conn: AConn, body: Callable[[AConn], Awaitable[T]]) -> T:
        if self._clock_stale():
            await self._read_clock(conn)
        return await body(conn)

    async def _fetch(
        self, query: LiteralString | sql.Composed, params: dict[str, Any]
    ) -> list[tuple[Any, ...]]:
        async def body(conn: AConn) -> list[tuple[Any, ...]]:
            cur = await conn.execute(query, params)
            return await cur.fetchall() if cur.description else []

        return await self._run(body)

    # -- schema ---------------------------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        applied: list[int] = []
        for migration in self._migrations:

            async def body(conn: AConn, version: int = migration.version) -> bool:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                    await conn.execute(
                        "CREATE TABLE IF NOT EXISTS runlane_migrations (version integer PRIMARY KEY, "
                        "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
                    )
                    cur = await conn.execute(
                        "SELECT 1 FROM runlane_migrations WHERE version = %s", (version,)
                    )
                    if await cur.fetchone():
                        return False
                    m = self._migrations[version - 1]
                    await conn.execute(m.sql)  # no parameters: several statements
                    await conn.execute(
                        "INSERT INTO runlane_migrations (version, name) VALUES (%s, %s)", (version, m.name)
                    )
                    return True

            if await self._run(body):
                applied.append(migration.version)
        return applied

    async def schema_version(self) -> tuple[int, int]:
        async def body(conn: AConn) -> int:
            cur = await conn.execute("SELECT to_regclass('runlane_migrations') IS NOT NULL")
            row = await cur.fetchone()
            if not row or not row[0]:
                return 0
            cur = await conn.execute("SELECT coalesce(max(version), 0) FROM runlane_migrations")
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        return await self._run(body), len(self._migrations)

    # -- catalogue and workers ------------------------------------------------------------------------------

    async def register_jobs(self, jobs: Sequence[JobInfo]) -> None:
        if not jobs:
            return
        latest = {j.name: j for j in jobs}  # one row per name, the last one winning
        await self._fetch(
            Q["register_jobs"],
            {
                "name": list(latest),
                "queue": [j.queue for j in latest.values()],
                "options": [dumps(j.options) for j in latest.values()],
                "args_schema": [dumps(j.args_schema) for j in latest.values()],
                "now": self._now(),
            },
        )

    async def get_job(self, name: str) -> JobInfo | None:
        rows = await self._fetch(Q["get_job"], {"name": name})
        return job_from_row(rows[0]) if rows else None

    async def register_worker(self, worker_id: str, info: dict[str, Any]) -> None:
        await self._fetch(Q["register_worker"], {"id": worker_id, "info": dumps(info), "now": self._now()})

    async def deregister_worker(self, worker_id: str) -> None:
        await self._fetch(Q["deregister_worker"], {"id": worker_id})

    # -- triggering and reading -----------------------------------------------------------------------------

    async def insert_runs(
        self, runs: Sequence[NewRun], *, on_conflict: ConflictPolicy = "raise"
    ) -> list[Run]:
        if not runs:
            return []

        single = ins.single_statement(runs)

        async def body(conn: AConn) -> tuple[list[Run], int]:
            plan = ins.insert_plan(runs, on_conflict, now=self._now(), token=self._token)
            if single:  # one autocommit statement is already all-or-nothing: no BEGIN/COMMIT round trips
                return await ins.drive_async(conn, plan)
            async with conn.transaction():
                return await ins.drive_async(conn, plan)

        result, created = await self._run(body, retry_disconnect=False)
        if created:
            self.notifier.notify("work")
        return result

    def insert_runs_blocking(
        self, runs: Sequence[NewRun], *, on_conflict: ConflictPolicy = "raise"
    ) -> list[Run] | None:
        """On a thread-side pool of sync connections, opened at the first call: a blocking caller then
        crosses to no event loop (two thread wake-ups and psycopg's async machinery per trigger). Before
        ``open`` and when the database clock is due for a reading, None: the loop path does both."""
        if not self._opened or self._clock_stale():
            return None
        if not runs:
            return []
        pool = self._blocking_pool or self._open_blocking_pool()
        single = ins.single_statement(runs)
        for attempt in range(_RETRIES):
            try:
                with pool.connection() as conn:
                    plan = ins.insert_plan(runs, on_conflict, now=self._now(), token=self._token)
                    if single:
                        result, created = ins.drive_sync(conn, plan)
                    else:
                        with conn.transaction():
                            result, created = ins.drive_sync(conn, plan)
            except (psycopg.OperationalError, pg_errors.IdleInTransactionSessionTimeout) as exc:
                self._retry_or_raise(exc, attempt, retry_disconnect=False)
                continue
            if created:
                self.notifier.notify("work")
            return result
        raise AssertionError("unreachable")

    def _open_blocking_pool(self) -> _ThreadSidePool:
        # Its own lock: opening waits for a first connection, which must not stall the loops' _pool().
        with self._blocking_lock:
            if self._blocking_pool is not None:
                return self._blocking_pool
            pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
                self._conninfo_for(),
                min_size=1,
                max_size=max(self.options.pool_max_size, 1),
                timeout=self.options.pool_timeout,
                kwargs={"autocommit": True, "prepare_threshold": self.options.prepare_threshold},
                open=False,
                name="runlane-blocking",
            )
            try:
                pool.open(wait=True, timeout=self.options.pool_timeout)  # else the first call grows it
                with self._lock:
                    if not self._opened:  # closed meanwhile
                        raise StoreUnavailable(f"the PostgreSQL store at {self.display_url} is closed")
                    self._blocking_pool = _ThreadSidePool(pool)
            except BaseException as exc:
                pool.close()
                if isinstance(exc, PoolTimeout):
                    self._retry_or_raise(exc, 0, retry_disconnect=False)  # raises StoreUnavailable
                raise
            return self._blocking_pool

    async def insert_chunks(self, chunks: Sequence[Sequence[NewRun]]) -> list[Run]:
        """Chunks of one-statement inserts overlap on one connection: the next chunk's JSON document is built
        while the server inserts this chunk, its statement is sent as soon as this one's rows arrive, and
        this chunk's runs are built from those rows while the server inserts the next. Chunk k+1 starts only
        after chunk k committed, so ids follow input order and a failure leaves the same chunks inserted as
        one chunk at a time would. (Client and server cost about the same per run: 25 -> ~14 us per run.)"""
        if len(chunks) < 2 or not all(ins.one_step(chunk) for chunk in chunks):
            return await super().insert_chunks(chunks)
        out: list[Run] = []
        created = 0
        settled = 0  # chunks committed and turned into runs: a retried body (a deadlock) resumes after them

        async def body(conn: AConn) -> None:
            nonlocal created, settled
            plans = [
                ins.insert_plan(chunk, "raise", now=self._now(), token=self._token)
                for chunk in chunks[settled:]
            ]
            running: asyncio.Task[list[tuple[Any, ...]]] | None = asyncio.ensure_future(
                _fetch_all(conn, next(plans[0]))
            )
            try:
                await asyncio.sleep(0)
                for i, plan in enumerate(plans):
                    step: ins.Step | None = None
                    unbuilt: Exception | None = None
                    try:
                        step = next(plans[i + 1]) if i + 1 < len(plans) else None
                    except Exception as exc:  # raised once this chunk is settled, as one at a time would
                        unbuilt = exc
                    assert running is not None
                    rows = await running
                    running = None
                    if unbuilt is not None:
                        raise unbuilt
                    if step is not None:
                        running = asyncio.ensure_future(_fetch_all(conn, step))
                        await asyncio.sleep(0)  # let it send the statement before the runs are built
                    try:
                        plan.send(rows)
                    except StopIteration as stop:
                        runs, n = stop.value
                        out.extend(runs)
                        created += n
                        settled += 1
                    else:  # pragma: no cover - one_step said the plan ends with its first statement
                        raise AssertionError("a one-step insert plan asked for another statement")
            finally:
                if running is not None and not running.done():
                    running.cancel()  # the pool discards a connection left mid-statement
                    with contextlib.suppress(BaseException):
                        await running

        try:
            await self._run(body, retry_disconnect=False)
        finally:
            if created:
                self.notifier.notify("work")
        return out

    async def insert_runs_in_transaction(
        self,
        conn: psycopg.AsyncConnection[Any] | psycopg.Connection[Any],
        runs: Sequence[NewRun],
        *,
        on_conflict: ConflictPolicy = "raise",
    ) -> list[Run]:
        """Insert runs in the caller's transaction on ``conn``: they exist iff that transaction commits.

        A sync ``Connection`` is driven without awaiting (the statements are short, like any call on it in
        the caller's code). Runs go in under a savepoint, so a RunConflict or RunNotFound undoes only them and
        leaves the caller's transaction usable. The NOTIFY is queued in the transaction and fires at commit,
        without this store's token, so that this process's own listener signals the local notifier too.
        """
        if isinstance(conn, psycopg.AsyncConnection):
            return await ins.insert_with_caller_async(conn, runs, on_conflict, now=self._now())
        return self.insert_runs_in_transaction_blocking(conn, runs, on_conflict=on_conflict)

    def insert_runs_in_transaction_blocking(
        self, conn: psycopg.Connection[Any], runs: Sequence[NewRun], *, on_conflict: ConflictPolicy = "raise"
    ) -> list[Run]:
        """The sync form of ``insert_runs_in_transaction``, for a sync client with a sync connection."""
        return ins.insert_with_caller_sync(conn, runs, on_conflict, now=self._now())

    async def get_run(self, run_id: int) -> Run | None:
        runs = await self.get_runs([run_id])
        return runs[0] if runs else None

    async def get_runs(self, run_ids: Sequence[int]) -> list[Run]:
        if not run_ids:
            return []
        rows = await self._fetch(Q["get_runs"], {"ids": int_array(run_ids)})
        return [run_from_row(row) for row in rows]

    async def list_runs(
        self, filter: RunFilter, *, limit: int = 100, before_id: int | None = None
    ) -> list[Run]:
        params: dict[str, Any] = {
            "job": filter.job,
            "statuses": [s.value for s in filter.statuses] or None,
            "queue": filter.queue,
            "parent_run_id": filter.parent_run_id,
            "root_run_id": filter.root_run_id,
            "batch_id": filter.batch_id,
            "schedule_id": filter.schedule_id,
            "tag": filter.tag,
            "created_after": filter.created_after,
            "created_before": filter.created_before,
            "before_id": before_id,
        }
        params = {k: v for k, v in params.items() if v is not None}
        where = [sql.SQL(RUN_FILTERS[k]) for k in params] or [sql.SQL("true")]
        params["limit"] = max(0, limit)
        query = sql.SQL(
            "SELECT {cols} FROM runlane_runs r WHERE {where} ORDER BY r.id DESC LIMIT %(limit)s"
        ).format(
            cols=sql.SQL(", ".join(f"r.{c}" for c in RUN_COLUMNS.split(", "))),
            where=sql.SQL(" AND ").join(where),
        )
        return [run_from_row(row) for row in await self._fetch(query, params)]

    async def attempts(self, run_id: int) -> list[Attempt]:
        return [attempt_from_row(row) for row in await self._fetch(Q["attempts"], {"run_id": run_id})]

    async def events(self, run_id: int, *, since: int | None = None, limit: int = 1000) -> list[Event]:
        rows = await self._fetch(Q["events"], {"run_id": run_id, "since": since or 0, "limit": max(0, limit)})
        return [event_from_row(row) for row in rows]

    async def append_events(self, events: Sequence[EventDraft], *, worker_id: str | None = None) -> set[int]:
        if not events:
            return set()
        # One group per (run, attempt) in first-appearance order; a run in two groups goes to two rounds.
        groups: dict[tuple[int, int | None], list[EventDraft]] = {}
        for draft in events:
            groups.setdefault((draft.run_id, draft.attempt), []).append(draft)
        batches = rounds(list(groups.items()), key=lambda item: item[0][0])

        async def body(conn: AConn) -> set[int]:
            sent: list[tuple[list[int], psycopg.AsyncCursor[Any]]] = []  # each round's runs and its reply
            # One round (the usual case) is one autocommit statement; more go out together in one trip.
            async with contextlib.nullcontext() if len(batches) == 1 else one_trip(conn):
                for batch in batches:
                    group_list = [(run_id, attempt, drafts) for _, ((run_id, attempt), drafts) in batch]
                    params = {
                        **append_params(group_list),
                        "worker": worker_id,
                        "now": self._now(),
                        "token": self._token,
                        "channels": channel_array("change"),
                    }
                    cur = await conn.execute(Q["append_events"], params)
                    sent.append(([run_id for run_id, _, _ in group_list], cur))
            refused: set[int] = set()
            for run_ids, cur in sent:
                accepted = {row[0] for row in await cur.fetchall()}
                refused |= {run_id for run_id in run_ids if run_id not in accepted}
            return refused

        refused = await self._run(body)
        if len(refused) < len({d.run_id for d in events}):
            self.notifier.notify("change")
        return refused

    # -- batches --------------------------------------------------------------------------------------------

    async def insert_batch(
        self, runs: Sequence[NewRun], *, parent_run_id: int | None = None
    ) -> tuple[Batch, list[Run]]:
        params: dict[str, Any] = {
            "rows": ins.rows_document(runs),
            "parent_run_id": parent_run_id,
            "now": self._now(),
            "token": self._token,
            "channels": channel_array("work"),
        }
        rows = await self._fetch(Q["insert_batch"], params)
        if not rows:
            assert parent_run_id is not None
            raise RunNotFound(parent_run_id)
        batch = batch_from_row(rows[0])
        children = [
            replace(new, parent_run_id=parent_run_id, batch_id=batch.id, dedup_id=None).to_run(
                row[BATCH_WIDTH], RunStatus(row[BATCH_WIDTH + 1]), *row[BATCH_WIDTH + 2 :]
            )
            for new, row in zip(runs, rows if runs else [], strict=True)  # no runs: one row, the batch
        ]
        if children:
            self.notifier.notify("work")
        return batch, children

    async def get_batch(self, batch_id: int) -> Batch | None:
        rows = await self._fetch(Q["get_batch"], {"id": batch_id})
        return batch_from_row(rows[0]) if rows else None

    async def batch_runs(
        self, batch_id: int, *, after_seq: int = 0, up_to_seq: int | None = None, limit: int = 1000
    ) -> list[tuple[int, Run]]:
        params = {
            "batch_id": batch_id,
            "after": after_seq,
            "upto": up_to_seq if up_to_seq is not None else 2**62,
            "limit": max(0, limit),
        }
        return [(row[0], run_from_row(row, 1)) for row in await self._fetch(Q["batch_runs"], params)]

    # -- user actions ---------------------------------------------------------------------------------------

    async def cancel_runs(self, run_ids: Sequence[int], *, reason: str = "cancelled by user") -> list[int]:
        if not run_ids:
            return []
        params = {
            "ids": int_array(run_ids),
            "reason": reason,
            "now": self._now(),
            "token": self._token,
            "channels": channel_array("change", "cancel"),
        }

        async def body(conn: AConn) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
            async with conn.transaction():
                cur = await conn.execute(Q["cancel_runs"], params)
                rows = await cur.fetchall()
                decided = await self._resolve_continuations(conn, [row[0] for row in rows])
            return rows, decided

        rows, decided = await self._run(body)
        if rows:
            topics: list[Topic] = ["change"]
            if any(old == "running" for _, old in rows):
                topics.append("cancel")
            if any(status == "pending" for _, status in decided):
                topics.append("work")
            self.notifier.notify(*topics)
        cancelled = {row[0] for row in rows} | {id_ for id_, status in decided if status == "cancelled"}
        return sorted(cancelled)

    async def _resolve_continuations(self, conn: AConn, run_ids: Sequence[int]) -> list[tuple[Any, ...]]:
        """Inside a transaction that made some of ``run_ids`` terminal: decide their waiting continuations.
        Returns ``(id, new status)`` of the continuations decided."""
        if not run_ids:
            return []
        cur = await conn.execute(Q["resolve_continuations"], self._resolve_params(run_ids))
        return await cur.fetchall()

    def _resolve_params(self, run_ids: Sequence[int]) -> dict[str, Any]:
        return {
            "ids": int_array(run_ids),
            "now": self._now(),
            "token": self._token,
            "channels": channel_array("work", "change"),
        }

    async def retry_run(self, run_id: int) -> bool:
        params = {
            "id": run_id,
            "now": self._now(),
            "token": self._token,
            "channels": channel_array("work", "change"),
        }
        for _ in range(ins.MAX_ROUNDS):
            try:
                rows = await self._fetch(Q["retry_run"], params)
            except pg_errors.UniqueViolation:
                run = await self.get_run(run_id)
                if run is None or run.dedup_id is None:
                    raise
                holders = await self._fetch(Q["active_by_dedup"], {"dedup_ids": [run.dedup_id]})
                if holders:
                    raise RunConflict(run.dedup_id, holders[0][0]) from None
                continue  # the holder ended in between: try again
            if rows:
                self.notifier.notify("work", "change")
                return True
            if not await self._fetch(Q["run_status"], {"id": run_id}):
                raise RunNotFound(run_id)
            return False
        raise StoreUnavailable(f"could not retry run {run_id}: its dedup id kept changing hands")

    # -- worker verbs ---------------------------------------------------------------------------------------

    async def claim(
        self, worker_id: str, *, queues: Sequence[str], jobs: Sequence[str], limit: int, lease_timeout: float
    ) -> list[Run]:
        if limit <= 0 or not queues or not jobs:
            return []
        return (
            await self.finish_and_claim(
                (), worker_id=worker_id, queues=queues, jobs=jobs, limit=limit, lease_timeout=lease_timeout
            )
        )[1]

    async def _send_claim(
        self,
        conn: AConn,
        worker_id: str,
        queues: Sequence[str],
        jobs: Sequence[str],
        limit: int,
        lease_timeout: float,
        now: datetime | None,
    ) -> tuple[psycopg.AsyncCursor[Any], psycopg.AsyncCursor[Any]]:
        """Queue the promotion of due runs and the claim on ``conn`` (inside a pipelined transaction)."""
        params = self._claim_params(worker_id, queues, jobs, limit, lease_timeout, now)
        promote = await conn.execute(Q["promote_due"], params)
        claim = await conn.execute(Q["claim"], params)
        return promote, claim

    def _claim_params(
        self,
        worker_id: str,
        queues: Sequence[str],
        jobs: Sequence[str],
        limit: int,
        lease_timeout: float,
        now: datetime | None,
    ) -> dict[str, Any]:
        """The parameters of ``promote_due``, ``claim`` and ``promote_and_claim`` (one set serves all three)."""
        return {
            "now": now,
            "promote_limit": PROMOTE_LIMIT,
            "promote_channels": channel_array("work", "change"),
            "queues": text_array(queues),
            "jobs": text_array(jobs),
            "limit": limit,
            "worker": worker_id,
            "lease_timeout": float(lease_timeout),
            "token": self._token,
            "channels": channel_array("change"),
        }

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
        """The finishes, their continuations, the promotion of due runs and the claim: one transaction and
        one round trip (pipeline mode sends BEGIN, every statement and COMMIT together). Without finishes,
        one statement (``_promote_and_claim``)."""
        if limit <= 0 or not queues or not jobs:
            return await self.finish_attempts(finishes, worker_id=worker_id), []
        if not finishes:
            return [], await self._promote_and_claim(worker_id, queues, jobs, limit, lease_timeout)
        now = self._now()
        batches = rounds(finishes, key=lambda f: f.run_id)
        topics = self._finish_topics(finishes)
        ending = sorted({f.run_id for f in finishes if f.outcome != "retrying"})

        async def body(conn: AConn) -> tuple[list[bool], bool, int, list[tuple[Any, ...]]]:
            async with one_trip(conn):
                finished, resolved = await self._send_finish(conn, batches, ending, worker_id, topics, now)
                promote, claim = await self._send_claim(
                    conn, worker_id, queues, jobs, limit, lease_timeout, now
                )
            done, started = await self._collect_finish(finishes, finished, resolved)
            promoted_row = await promote.fetchone()
            return done, started, (promoted_row[0] if promoted_row else 0), await claim.fetchall()

        done, started, promoted, rows = await self._run(body, retry_disconnect=False)
        wake: set[Topic] = set()
        if any(done):
            wake.update(topics)
            if started:
                wake.add("work")
        if promoted:
            wake.update(("work", "change"))
        elif rows:
            wake.add("change")
        if wake:
            self.notifier.notify(*sorted(wake))
        runs = [run_from_row(row) for row in rows]
        if len(runs) < limit:  # paused-free limited queues and limited jobs: the limit-aware claim
            try:
                runs += await self.claim_limited(worker_id, queues, jobs, limit - len(runs), lease_timeout)
            except StoreUnavailable:
                if not finishes:
                    raise
                # The finishes committed: report them; the limited runs are claimed on the next round.
                log.warning("limit-aware claim failed after recording %d finishes", len(finishes))
        return done, runs

    async def _promote_and_claim(
        self, worker_id: str, queues: Sequence[str], jobs: Sequence[str], limit: int, lease_timeout: float
    ) -> list[Run]:
        """A claim without finishes: the promotion and the claim in one autocommit statement. An idle
        worker's claim is on the path from a trigger to its start, and a pipelined transaction of the same
        two statements (BEGIN, the generic-plan setting, COMMIT, a pipeline sync) costs ~0.3 ms more.

        The statement's claim does not see the runs its promotion made pending (one snapshot): when it
        promoted some, the same statement goes again for them, so a claim still promotes, then claims."""
        runs: list[Run] = []
        promoted_any = False
        for _ in range(2):
            promoted, claimed = await self._promote_and_claim_once(
                worker_id, queues, jobs, limit - len(runs), lease_timeout
            )
            runs += claimed
            promoted_any = promoted_any or promoted > 0
            if not promoted or len(runs) >= limit:
                break
        if promoted_any:
            self.notifier.notify("change", "work")
        elif runs:
            self.notifier.notify("change")
        if len(runs) < limit:  # paused-free limited queues and limited jobs: the limit-aware claim
            runs += await self.claim_limited(worker_id, queues, jobs, limit - len(runs), lease_timeout)
        return runs

    async def _promote_and_claim_once(
        self, worker_id: str, queues: Sequence[str], jobs: Sequence[str], limit: int, lease_timeout: float
    ) -> tuple[int, list[Run]]:
        params = self._claim_params(worker_id, queues, jobs, limit, lease_timeout, self._now())

        async def body(conn: AConn) -> list[tuple[Any, ...]]:
            cur = await conn.execute(Q["promote_and_claim"], params)
            return await cur.fetchall()

        rows = await self._run(body, retry_disconnect=False)
        return (rows[0][0] if rows else 0), [run_from_row(row, 1) for row in rows if row[1] is not None]

    def heartbeat_blocking(self, worker_id: str, leases: Sequence[Lease], lease_timeout: float) -> set[int]:
        params = {
            "run": int_array(lease.run_id for lease in leases),
            "attempt": int_array(lease.attempt for lease in leases),
            "worker": worker_id,
            "lease_timeout": float(lease_timeout),
            "now": self._now(),
        }
        with self._hb_lock:
            for attempt in range(2):
                try:
                    if self._hb_conn is None or self._hb_conn.closed:
                        self._hb_conn = psycopg.connect(self._conninfo_for("heartbeat"), autocommit=True)
                    rows = self._hb_conn.execute(Q["heartbeat"], params).fetchall()
                    return {row[0] for row in rows}
                except psycopg.OperationalError as exc:
                    # The statement is idempotent: reconnect once (after a server restart, a dropped socket).
                    if self._hb_conn is not None:
                        self._hb_conn.close()
                        self._hb_conn = None
                    if attempt == 1:
                        raise StoreUnavailable(
                            f"heartbeat to PostgreSQL at {self.display_url} failed: {_first_line(exc)}"
                        ) from exc
        raise AssertionError("unreachable")

    async def held_leases(self, worker_id: str, leases: Sequence[Lease]) -> set[int]:
        if not leases:
            return set()
        rows = await self._fetch(
            Q["held_leases"],
            {
                "run": int_array(x.run_id for x in leases),
                "attempt": int_array(x.attempt for x in leases),
                "worker": worker_id,
                "now": self._now(),
            },
        )
        return {row[0] for row in rows}

    async def finish_attempts(self, finishes: Sequence[Finish], *, worker_id: str) -> list[bool]:
        if not finishes:
            return []
        batches = rounds(finishes, key=lambda f: f.run_id)
        topics = self._finish_topics(finishes)
        # Runs that may end here: their continuations are decided in the same transaction, by a statement
        # pipelined behind the finish (no extra round trip).
        ending = sorted({f.run_id for f in finishes if f.outcome != "retrying"})
        now = self._now()

        async def body(conn: AConn) -> tuple[list[bool], bool]:
            single = len(batches) == 1 and not ending
            async with contextlib.nullcontext() if single else one_trip(conn):
                finished, resolved = await self._send_finish(conn, batches, ending, worker_id, topics, now)
            return await self._collect_finish(finishes, finished, resolved)

        done, started = await self._run(body)
        if any(done):
            self.notifier.notify(*topics, *(["work"] if started and "work" not in topics else []))
        return done

    def _finish_topics(self, finishes: Sequence[Finish]) -> list[Topic]:
        topics: list[Topic] = ["change"]
        # `work` also when limits are in play: a freed slot lets workers held back by the limit claim.
        if any(f.outcome == "retrying" for f in finishes) or self.limits_active():
            topics.append("work")  # an idle worker sleeps until the earliest due time: it may now be sooner
        return topics

    async def _send_finish(
        self,
        conn: AConn,
        batches: list[list[tuple[int, Finish]]],
        ending: list[int],
        worker_id: str,
        topics: list[Topic],
        now: datetime | None,
    ) -> tuple[
        list[tuple[list[tuple[int, Finish]], psycopg.AsyncCursor[Any]]], psycopg.AsyncCursor[Any] | None
    ]:
        """Queue the finish statements (one per round) and the continuations' decision on ``conn``."""
        cursors = []
        for batch in batches:
            params = {
                **finish_params([f for _, f in batch]),
                "worker": worker_id,
                "now": now,
                "token": self._token,
                "channels": channel_array(*topics),
            }
            cursors.append((batch, await conn.execute(Q["finish_attempts"], params)))
        resolved = None
        if ending:
            resolved = await conn.execute(Q["resolve_continuations"], self._resolve_params(ending))
        return cursors, resolved

    @staticmethod
    async def _collect_finish(
        finishes: Sequence[Finish],
        cursors: list[tuple[list[tuple[int, Finish]], psycopg.AsyncCursor[Any]]],
        resolved: psycopg.AsyncCursor[Any] | None,
    ) -> tuple[list[bool], bool]:
        """Which finishes took effect, and whether some continuation became pending."""
        done = [False] * len(finishes)
        started = False
        if resolved is not None:
            started = any(status == "pending" for _, status in await resolved.fetchall())
        for batch, cur in cursors:
            finished = {row[0] for row in await cur.fetchall()}
            for index, f in batch:
                done[index] = f.run_id in finished
        return done, started

    async def release_runs(self, leases: Sequence[Lease], *, worker_id: str) -> list[int]:
        if not leases:
            return []
        rows = await self._fetch(
            Q["release_runs"],
            {
                "run": int_array(x.run_id for x in leases),
                "attempt": int_array(x.attempt for x in leases),
                "worker": worker_id,
                "now": self._now(),
                "token": self._token,
                "channels": channel_array("work", "change"),
            },
        )
        if rows:
            self.notifier.notify("work", "change")
        return sorted(row[0] for row in rows)

    async def _ending(self, query: LiteralString, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """A statement that may make runs terminal (its rows start with run ids), then their continuations'
        decision, in one transaction."""

        async def body(conn: AConn) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
            async with conn.transaction():
                cur = await conn.execute(query, params)
                rows = await cur.fetchall()
                decided = await self._resolve_continuations(conn, [row[0] for row in rows])
            return rows, decided

        rows, decided = await self._run(body)
        if any(status == "pending" for _, status in decided):
            self.notifier.notify("work", "change")
        return rows

    async def reap_expired_leases(self) -> list[int]:
        rows = await self._ending(
            Q["reap_expired_leases"],
            {"now": self._now(), "token": self._token, "channels": channel_array("work", "change", "cancel")},
        )
        if rows:
            self.notifier.notify("work", "change", "cancel")
        return sorted(row[0] for row in rows)

    async def expire_runs(self) -> list[int]:
        rows = await self._ending(
            Q["expire_runs"], {"now": self._now(), "token": self._token, "channels": channel_array("change")}
        )
        if rows:
            self.notifier.notify("change")
        return sorted(row[0] for row in rows)

    async def next_due_at(self, *, queues: Sequence[str], jobs: Sequence[str]) -> float | None:
        if not queues or not jobs:
            return None
        rows = await self._fetch(Q["next_due_at"], {"queues": text_array(queues), "jobs": text_array(jobs)})
        due: datetime | None = rows[0][0] if rows else None
        return None if due is None else due.timestamp()

    # -- housekeeping ---------------------------------------------------------------------------------------

    async def prune(self, older_than: float) -> int:
        rows = await self._fetch(Q["prune"], {"older_than": to_datetime(older_than)})
        return int(rows[0][0]) if rows else 0


def _is_disconnect(exc: psycopg.OperationalError) -> bool:
    """The connection itself failed (class 08, or the server shutting the session down), not the query."""
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in {"57P01", "57P02", "57P03"}
