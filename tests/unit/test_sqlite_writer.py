"""The SQLite writer thread (group commit, savepoints, blocking callers) and the wake-up channel."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runlane.errors import StoreUnavailable
from runlane.store.notify import Topic
from runlane.store.sqlite.connection import Tx, Writer, connect
from runlane.store.sqlite.wakeup import WakeChannel, decode, encode, wake_dir
from runlane.store.sqlite.writelock import WriteLock

WAIT = 30.0  # generous: these waits end on an event, the timeout only catches a hang


def _exists(path: str) -> bool:
    return os.path.exists(path)


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[tuple[Writer, list[str], list[set[Topic]]]]:
    conn = connect(str(tmp_path / "w.db"), writer=True)
    conn.execute("CREATE TABLE t (v INTEGER UNIQUE)")
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    signalled: list[set[Topic]] = []
    w = Writer(conn, after_commit=signalled.append)
    yield w, statements, signalled
    w.close()
    conn.close()


def _insert(value: int) -> Callable[[Tx], int]:
    def op(tx: Tx) -> int:
        tx.conn.execute("INSERT INTO t (v) VALUES (?)", (value,))
        tx.topics.add("change")
        return value

    return op


async def test_queued_operations_commit_together_and_fail_alone(
    writer: tuple[Writer, list[str], list[set[Topic]]],
) -> None:
    w, statements, signalled = writer
    started, gate = threading.Event(), threading.Event()

    def blocker(tx: Tx) -> str:
        started.set()
        gate.wait(30)
        tx.topics.add("work")
        return "first"

    first = asyncio.ensure_future(w.run(blocker))
    assert await asyncio.to_thread(started.wait, 30)
    rest = [asyncio.ensure_future(w.run(_insert(v))) for v in (1, 2, 1, 3)]
    await asyncio.sleep(0)
    assert w._queue.qsize() == 4  # all four queued behind the blocker: they form the next group
    gate.set()
    assert await first == "first"
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert results[:2] == [1, 2] and results[3] == 3
    assert isinstance(results[2], sqlite3.IntegrityError)
    assert [r[0] for r in w.conn.execute("SELECT v FROM t ORDER BY v")] == [1, 2, 3]
    assert statements.count("BEGIN IMMEDIATE") == 2
    assert statements.count("COMMIT") == 2
    assert statements.count("ROLLBACK TO op") == 1
    assert signalled == [{"work"}, {"change"}]


async def test_a_failing_single_operation_rolls_back(
    writer: tuple[Writer, list[str], list[set[Topic]]],
) -> None:
    w, _, signalled = writer

    def fails(tx: Tx) -> None:
        tx.conn.execute("INSERT INTO t (v) VALUES (7)")
        tx.topics.add("work")
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        await w.run(fails)
    assert w.conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    assert signalled == []


def test_blocking_callers_from_plain_threads(writer: tuple[Writer, list[str], list[set[Topic]]]) -> None:
    w, _, _ = writer
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda v=v: results.append(w.run_blocking(_insert(v)))) for v in range(10)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == list(range(10))


def test_closed_writer_refuses_work(writer: tuple[Writer, list[str], list[set[Topic]]]) -> None:
    w, _, _ = writer
    w.close()
    w.close()
    with pytest.raises(StoreUnavailable):
        w.run_blocking(_insert(1))


def _recording(value: int, threads: list[str]) -> Callable[[Tx], int]:
    insert = _insert(value)

    def op(tx: Tx) -> int:
        threads.append(threading.current_thread().name)
        return insert(tx)

    return op


def test_run_here_runs_on_the_calling_thread_when_the_writer_is_idle(
    writer: tuple[Writer, list[str], list[set[Topic]]],
) -> None:
    w, statements, signalled = writer
    threads: list[str] = []
    assert w.run_here(_recording(1, threads)) == 1
    assert threads == [threading.current_thread().name]
    assert statements[-3:] == ["BEGIN IMMEDIATE", "INSERT INTO t (v) VALUES (1)", "COMMIT"]
    assert signalled == [{"change"}]
    with pytest.raises(sqlite3.IntegrityError):  # fails alone, rolled back, no wake-up
        w.run_here(_insert(1))
    assert statements[-1] == "ROLLBACK"
    assert w.conn.execute("SELECT v FROM t").fetchall() == [(1,)]
    assert signalled == [{"change"}]


def test_run_here_queues_behind_a_busy_writer(writer: tuple[Writer, list[str], list[set[Topic]]]) -> None:
    """While the thread writes, callers queue: they then share one commit instead of taking turns."""
    w, _, signalled = writer
    started, gate = threading.Event(), threading.Event()

    def blocker(tx: Tx) -> None:
        started.set()
        gate.wait(30)

    first = threading.Thread(target=w.run_blocking, args=(blocker,))
    first.start()
    assert started.wait(30)
    threads: list[str] = []
    results: list[int] = []
    callers = [
        threading.Thread(target=lambda v=v: results.append(w.run_here(_recording(v, threads))))
        for v in range(3)
    ]
    for t in callers:
        t.start()
    deadline = time.monotonic() + 30
    while w._queue.qsize() < 3 and time.monotonic() < deadline:  # all three queued behind the blocker
        time.sleep(0.005)
    gate.set()
    for t in [first, *callers]:
        t.join(30)
    assert sorted(results) == [0, 1, 2]
    assert set(threads) == {"runlane-sqlite-writer"}
    assert signalled == [{"change"}]  # the three committed together
    assert w._queued == 0  # counted out as they were delivered: the next run_here may run here again


def test_close_waits_for_a_run_here_in_progress(writer: tuple[Writer, list[str], list[set[Topic]]]) -> None:
    w, _, _ = writer
    started, gate = threading.Event(), threading.Event()

    def slow(tx: Tx) -> int:
        started.set()
        gate.wait(30)
        return _insert(5)(tx)

    results: list[int] = []
    caller = threading.Thread(target=lambda: results.append(w.run_here(slow)))
    caller.start()
    assert started.wait(30)
    closer = threading.Thread(target=w.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # the connection is still in use: close must not return yet
    gate.set()
    for t in (caller, closer):
        t.join(30)
    assert results == [5]
    with pytest.raises(StoreUnavailable):
        w.run_here(_insert(6))
    assert w.conn.execute("SELECT v FROM t").fetchall() == [(5,)]


class _InterruptAfterBegin(sqlite3.Connection):
    """A signal's KeyboardInterrupt landing on the caller's thread just after its BEGIN returned."""

    armed = False

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        cursor = super().execute(sql, *args)
        if sql == "BEGIN IMMEDIATE" and self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return cursor


def test_an_interrupt_in_run_here_leaves_no_transaction_and_no_lock(tmp_path: Path) -> None:
    path = str(tmp_path / "w.db")
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=_InterruptAfterBegin)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (v INTEGER UNIQUE)")
    lock = WriteLock(f"{path}-wlock")
    w = Writer(conn, after_commit=lambda topics: None, lock=lock)
    try:
        conn.armed = True
        with pytest.raises(KeyboardInterrupt):
            w.run_here(_insert(1))
        assert not conn.in_transaction  # rolled back: it would hold the database's write lock
        other = WriteLock(f"{path}-wlock")  # another process's writer can have the lock file
        assert other.acquire(1.0)
        other.release()
        other.close()
        threads: list[str] = []
        assert w.run_here(_recording(2, threads)) == 2  # the busy lock was let go
        assert threads == [threading.current_thread().name]
        assert w.run_blocking(_insert(3)) == 3
        assert conn.execute("SELECT v FROM t ORDER BY v").fetchall() == [(2,), (3,)]
    finally:
        w.close()
        w.close_lock()
        conn.close()


def test_close_from_a_signal_handler_during_run_here_does_not_wait_for_itself(
    writer: tuple[Writer, list[str], list[set[Topic]]],
) -> None:
    w, _, _ = writer

    def closing(tx: Tx) -> int:  # stands for a SIGTERM handler that closes the app mid-trigger
        w.close()
        return _insert(1)(tx)

    done: list[int] = []
    caller = threading.Thread(target=lambda: done.append(w.run_here(closing)), daemon=True)
    caller.start()
    caller.join(WAIT)
    assert done == [1], "close waited for the run_here it interrupted"


def test_run_here_leaves_wal_checkpoints_to_the_writer_thread(tmp_path: Path) -> None:
    path = str(tmp_path / "w.db")
    conn = connect(path, writer=True)
    conn.execute("CREATE TABLE t (v INTEGER UNIQUE)")
    w = Writer(conn, after_commit=lambda topics: None, wal_path=f"{path}-wal")
    checked = threading.Event()
    checkers: list[str] = []
    real = w._bound_wal

    def recording() -> None:
        checkers.append(threading.current_thread().name)
        checked.set()
        real()

    w._bound_wal = recording  # type: ignore[method-assign]
    try:
        w._next_wal_check = 0.0  # due now
        assert w.run_here(_insert(1)) == 1
        assert checked.wait(WAIT)
        assert set(checkers) == {"runlane-sqlite-writer"}
        assert w._queued == 0
    finally:
        w.close()
        conn.close()


# -- wake channel -------------------------------------------------------------------------------------------------


def test_topics_encode_to_letters() -> None:
    assert encode(["work", "cancel", "change"]) == b"cwx"
    assert decode(b"cwx?") == {"work", "change", "cancel"}


def test_wake_dir_is_next_to_the_database_unless_too_long(tmp_path: Path) -> None:
    assert wake_dir("/srv/app/runlane.db") == "/srv/app/runlane.db.wake"
    deep = wake_dir(str(tmp_path / ("d" * 120) / "x.db"))
    assert len(deep) < 80
    assert deep == wake_dir(str(tmp_path / ("d" * 120) / "x.db"))  # every process finds the same one


async def test_channels_on_one_database_wake_each_other(tmp_path: Path) -> None:
    got: list[set[Topic]] = []
    received = threading.Event()

    def on_topics(topics: set[Topic]) -> None:
        got.append(topics)
        received.set()

    a = WakeChannel(str(tmp_path / "x.db"), on_topics)
    b = WakeChannel(str(tmp_path / "x.db"), lambda topics: None)
    assert a.start() and b.start()
    try:
        b.send({"work", "change"})
        assert await asyncio.to_thread(received.wait, 10)
        assert got == [{"work", "change"}]
    finally:
        a.close()
        b.close()
    assert not _exists(a.path) and not _exists(b.path)
