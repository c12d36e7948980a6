"""SQLite connections: the one writer thread with group commit, and the reader connections.

SQLite allows one writer at a time per file. Instead of letting every caller open its own write transaction
(and fight over the lock with "database is locked"), one thread per store owns the write connection and runs
every write. It drains whatever is queued, runs it in ONE ``BEGIN IMMEDIATE`` transaction with each
operation inside its own SAVEPOINT (a failing operation rolls back only itself), and commits once: one fsync
pays for the whole group, which is what makes ``synchronous=FULL`` affordable. Several processes sharing a
file still contend, but only these writer threads do, each with a 10 s busy timeout and an immediate
transaction that never has to upgrade a read lock (the case the busy handler cannot resolve). Before that they
queue in the kernel on a ``flock`` (writelock.py): SQLite's busy handler alone lets a long waiter starve.

Checkpoints: SQLite's automatic ones (every ~1000 WAL pages, run by the committing writer) are passive and
copy only the frames no reader still needs. When some reader always holds a snapshot (a dashboard polling in
overlapping read transactions) they never finish, the WAL is never reset and grows without bound. So a
writer that finds the WAL past ``WAL_CHECKPOINT_BYTES`` after a commit runs a TRUNCATE checkpoint, which
waits for the old snapshots to end and resets the file. It blocks every writer of the file while it waits, so
it waits at most ``CHECKPOINT_WAIT_MS`` (far below the writers' busy timeout) and, when readers win, is tried
again after a back-off that the processes of the file share (a reader may hold one snapshot for minutes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from runlane.errors import SchemaOutdated, StoreUnavailable
from runlane.store.notify import Topic
from runlane.store.sqlite.writelock import WriteLock

T = TypeVar("T")

log = logging.getLogger("runlane.store.sqlite")

BUSY_TIMEOUT_MS = 10_000
MAX_GROUP = 512
"""Operations per commit group: bounds the lock hold time and the memory of one transaction."""
STATEMENT_CACHE = 256
WAL_CHECKPOINT_BYTES = 16 * 1024 * 1024
"""A WAL file larger than this gets a TRUNCATE checkpoint (passive ones normally keep it near 4 MB)."""
CHECKPOINT_WAIT_MS = 1_000
"""How long a TRUNCATE checkpoint may wait for readers and writers (it holds the write lock meanwhile)."""
CHECKPOINT_RETRY_S = 1.0
CHECKPOINT_RETRY_MAX_S = 60.0
WAL_CHECK_INTERVAL_S = 0.1

CONNECT_HOOKS: list[Callable[[sqlite3.Connection, bool], None]] = []
"""Called as ``hook(conn, writer)`` with every connection ``connect`` opens, after its pragmas. A test seam:
the chaos tests audit through it that every writing transaction starts ``BEGIN IMMEDIATE``."""


def connect(path: str, *, writer: bool, uri: bool = False) -> sqlite3.Connection:
    """Open a connection with Runlane's pragmas. Raises StoreUnavailable when the file cannot be opened."""
    try:
        conn = sqlite3.connect(
            path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,  # we issue BEGIN IMMEDIATE / SAVEPOINT ourselves
            check_same_thread=False,  # each connection is used by one thread at a time; close() may be elsewhere
            cached_statements=STATEMENT_CACHE,
            uri=uri,
        )
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot open SQLite database {path!r}: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if path != ":memory:":
            # WAL: readers never block the writer nor the writer readers. Checkpoints: see the module doc.
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"could not switch to WAL journal mode (got {mode!r})")
        if writer:
            # FULL: an acknowledged trigger or completion survives power loss; group commit pays for the fsync.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        else:
            conn.execute("PRAGMA query_only = ON")
    except sqlite3.Error as exc:
        conn.close()
        raise StoreUnavailable(f"cannot use SQLite database {path!r}: {exc}") from exc
    for hook in CONNECT_HOOKS:
        hook(conn, writer)
    return conn


def store_error(exc: BaseException) -> BaseException:
    """Driver errors that mean "the database is unusable" become StoreUnavailable (SchemaOutdated for a
    database that was never migrated), with the driver error as ``__cause__``; the rest pass through."""
    if isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError:
        err: StoreUnavailable
        if "no such table" in str(exc):
            err = SchemaOutdated(
                f"the SQLite database has no Runlane schema ({exc}): run `runlane migrate` first"
            )
        else:
            err = StoreUnavailable(f"SQLite error: {exc}")
        err.__cause__ = exc
        return err
    return exc


@dataclass(slots=True)
class Tx:
    """What a write operation sees: the connection, inside a transaction, and the topics to signal."""

    conn: sqlite3.Connection
    topics: set[Topic] = field(default_factory=set)


@dataclass(slots=True)
class _Op(Generic[T]):
    fn: Callable[[Tx], T]
    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future[T] | concurrent.futures.Future[T]
    exclusive: bool = False  # runs alone, outside any transaction (it manages its own: migrations)


def _resolve_many(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, result, exc in items:
        if fut.done():  # the caller was cancelled; the write happened anyway
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


_STOP = object()
_BOUND_WAL = object()  # from run_here: the thread checks the WAL, off the caller's path


class Writer:
    """The thread that owns the write connection. ``after_commit`` receives the topics of each group;
    ``wal_path`` (None for ``:memory:``) is the WAL file it keeps bounded; ``lock`` (None for ``:memory:``)
    queues it with the writers of other processes."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        after_commit: Callable[[set[Topic]], None],
        name: str = "runlane-sqlite-writer",
        wal_path: str | None = None,
        lock: WriteLock | None = None,
    ) -> None:
        self.conn = conn
        self._wlock = lock
        self._after_commit = after_commit
        self._wal_path = wal_path
        self._next_wal_check = 0.0
        self._checkpoint_note = (0.0, 0.0)  # (not_before, backoff) when there is no lock file to share it
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._busy = threading.Lock()  # held while the connection is in use, by the thread or by run_here
        self._busy_caller: int | None = None  # the thread in run_here holding it
        self._queued = 0  # operations put and not yet taken up by the thread: run_here waits behind them
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- submitting -------------------------------------------------------------------------------------------

    def _put(self, op: _Op[Any]) -> None:
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the SQLite store is closed")
            self._queued += 1
            self._queue.put(op)

    def _taken(self, n: int) -> None:
        """The thread holds ``_busy`` for ``n`` operations it took off the queue: from now on run_here finds
        the connection busy instead of the count."""
        if n:
            with self._lock:
                self._queued -= n

    async def run(self, fn: Callable[[Tx], T], *, exclusive: bool = False) -> T:
        """Run ``fn`` in the next commit group and return its result once committed."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._put(_Op(fn, loop, fut, exclusive))
        return await fut

    def run_blocking(self, fn: Callable[[Tx], T], *, timeout: float | None = None) -> T:
        """The same from a plain thread (heartbeats while a job blocks the event loop)."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._put(_Op(fn, None, fut))
        return fut.result(timeout)

    def run_here(self, fn: Callable[[Tx], T]) -> T:
        """``run_blocking``, but run on the calling thread when nothing is queued or being written: a lone
        blocking caller then pays neither thread hand-over (two wake-ups, the larger part of a trigger after
        its commit). Otherwise it queues, behind what came first, and concurrent callers share commits.

        The caller may be the main thread, which signals interrupt: whatever an interrupt cuts short is
        rolled back and every lock let go, as on the writer thread, which never sees one."""
        if self._queued or not self._busy.acquire(blocking=False):
            return self.run_blocking(fn)
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            self._busy_caller = threading.get_ident()
            if self._closed:
                raise StoreUnavailable("the SQLite store is closed")
            try:
                self._run_group([_Op(fn, None, fut)])
            except BaseException:
                self._abandon()
                raise
            if self._wal_path is not None and time.monotonic() >= self._next_wal_check:
                self._queue.put(_BOUND_WAL)
        finally:
            self._busy_caller = None
            self._busy.release()
        return fut.result()

    def _abandon(self) -> None:
        """Roll back a transaction that an interrupt left open (it would hold the database's write lock)."""
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def close(self) -> None:
        """Finish what is queued, then stop the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join()
            if self._busy_caller != threading.get_ident():  # (not from a signal handler interrupting it)
                with self._busy:  # a run_here in progress finishes before the connection may be closed
                    pass

    def close_lock(self) -> None:
        """Close the write lock's file (after ``close``: the thread no longer takes it)."""
        if self._wlock is not None:
            self._wlock.close()

    # -- the thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            group: list[_Op[Any]] = []
            bound_wal = False
            item = self._queue.get()
            while True:
                if item is _STOP:
                    stop = True
                    break
                if item is _BOUND_WAL:
                    bound_wal = True
                elif item.exclusive:
                    with self._busy:
                        self._taken(len(group) + 1)
                        if group:  # run what came before it first, in order
                            self._run_group(group)
                        self._run_exclusive(item)
                    group = []
                else:
                    group.append(item)
                if len(group) >= MAX_GROUP:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if group or bound_wal:
                with self._busy:
                    self._taken(len(group))
                    if group:
                        self._run_group(group)
                    self._bound_wal()

    def _bound_wal(self) -> None:
        """TRUNCATE-checkpoint a WAL that passive checkpoints let grow (see the module docstring)."""
        now = time.monotonic()
        if self._wal_path is None or now < self._next_wal_check:
            return
        self._next_wal_check = now + WAL_CHECK_INTERVAL_S
        if not self._wal_too_large():
            return
        lock = self._wlock
        note = lock.checkpoint_note() if lock is not None else self._checkpoint_note
        if time.time() < note[0]:
            return
        if lock is not None and not lock.acquire(CHECKPOINT_WAIT_MS / 1000):
            return  # the writers of the file are busy: after the next commit
        try:
            note = lock.checkpoint_note() if lock is not None else self._checkpoint_note
            if time.time() < note[0]:  # another process just tried
                return
            if not self._wal_too_large():
                return  # another process reset it while this one waited for the lock
            if self._truncate_wal():
                new = (0.0, 0.0)
            else:  # readers held on: back off, together with the other processes of this file
                backoff = min(max(2 * note[1], CHECKPOINT_RETRY_S), CHECKPOINT_RETRY_MAX_S)
                new = (time.time() + backoff, backoff)
            if new != note:
                self._checkpoint_note = new
                if lock is not None:
                    lock.write_checkpoint_note(*new)
        finally:
            if lock is not None:
                lock.release()

    def _wal_too_large(self) -> bool:
        try:
            return self._wal_path is not None and os.stat(self._wal_path).st_size > WAL_CHECKPOINT_BYTES
        except OSError:
            return False

    def _truncate_wal(self) -> bool:
        conn = self.conn
        try:
            conn.execute(f"PRAGMA busy_timeout = {CHECKPOINT_WAIT_MS}")
            try:
                busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            finally:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except sqlite3.Error as exc:  # passive checkpoints still run at commits; this is tried again later
            log.warning("WAL checkpoint failed: %s", exc)
            return False
        return bool(busy == 0)

    def _run_exclusive(self, op: _Op[Any]) -> None:
        tx = Tx(self.conn)
        try:
            result = op.fn(tx)
        except BaseException as exc:
            if self.conn.in_transaction:
                self.conn.rollback()
            self._deliver([(op, None, store_error(exc))])
            return
        self._signal(tx.topics)
        self._deliver([(op, result, None)])

    def _run_group(self, group: list[_Op[Any]]) -> None:
        lock = self._wlock
        if lock is None:
            self._transact(group)
            return
        if not lock.acquire(BUSY_TIMEOUT_MS / 1000):
            seconds = BUSY_TIMEOUT_MS // 1000
            err = StoreUnavailable(
                f"SQLite write lock not obtained within {seconds} s (another process holds it)"
            )
            self._deliver([(op, None, err) for op in group])
            return
        try:
            self._transact(group)
        finally:
            lock.release()

    def _transact(self, group: list[_Op[Any]]) -> None:
        conn = self.conn
        outcomes: list[tuple[_Op[Any], Any, BaseException | None]] = []
        topics: set[Topic] = set()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            err = store_error(exc)
            self._deliver([(op, None, err) for op in group])
            return
        single = len(group) == 1  # no savepoint needed: the transaction itself is the op's rollback scope
        try:
            for op in group:
                tx = Tx(conn)
                if not single:
                    conn.execute("SAVEPOINT op")
                try:
                    result = op.fn(tx)
                except Exception as exc:
                    if not conn.in_transaction:  # a fatal error (I/O, full disk) ended the transaction
                        raise
                    if not single:
                        conn.execute("ROLLBACK TO op")
                        conn.execute("RELEASE op")
                    outcomes.append((op, None, store_error(exc)))
                    continue
                if not single:
                    conn.execute("RELEASE op")
                topics |= tx.topics
                outcomes.append((op, result, None))
            if single and outcomes[0][2] is not None:
                conn.execute("ROLLBACK")
            else:
                conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            err = store_error(exc)
            self._deliver([(op, None, err) for op in group])
            return
        self._signal(topics)
        self._deliver(outcomes)

    def _signal(self, topics: set[Topic]) -> None:
        # Before results are delivered, so a caller that sees its result also sees the generation moved.
        if topics:
            try:
                self._after_commit(topics)
            except Exception:  # a wake-up is an optimisation; it must never fail a committed write
                pass

    @staticmethod
    def _deliver(outcomes: Iterable[tuple[_Op[Any], Any, BaseException | None]]) -> None:
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]
        ] = {}
        for op, result, exc in outcomes:
            if op.loop is None:
                cf = op.future
                assert isinstance(cf, concurrent.futures.Future)
                if exc is not None:
                    cf.set_exception(exc)
                else:
                    cf.set_result(result)
            else:
                af = op.future
                assert isinstance(af, asyncio.Future)
                by_loop.setdefault(op.loop, []).append((af, result, exc))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_many, items)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass


class Readers:
    """A small thread pool, each thread with its own read-only connection, so reads never wait for writes."""

    def __init__(self, path: str, *, uri: bool = False, threads: int = 4) -> None:
        self._path = path
        self._uri = uri
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="runlane-sqlite-read")

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self._path, writer=False, uri=self._uri)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._conn())
        except sqlite3.Error as exc:
            err = store_error(exc)
            if err is exc:
                raise
            raise err from exc

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            fut = loop.run_in_executor(self._pool, self._call, fn)
        except RuntimeError as exc:  # the pool was shut down
            raise StoreUnavailable("the SQLite store is closed") from exc
        return await fut

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
