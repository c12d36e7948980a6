"""The SQLite store's cross-process write queue (``flock``) and its WAL bound.

Regressions found by chaos T22 (many processes on one file, a reader that always holds a snapshot): writers
starved in SQLite's busy handler for seconds and lost their leases, and the WAL grew past 100 MB because
passive checkpoints never finish while a snapshot is open.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from runlane.store import NewRun, create_store
from runlane.store.sqlite import SQLiteStore, connection
from runlane.store.sqlite.writelock import WriteLock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock")


def test_write_locks_on_one_file_exclude_each_other_and_hand_over(tmp_path: Path) -> None:
    a, b = WriteLock(str(tmp_path / "x-wlock")), WriteLock(str(tmp_path / "x-wlock"))
    try:
        assert a.acquire(1)
        assert not b.acquire(0.05)  # held elsewhere: the wait times out like SQLITE_BUSY
        got: list[bool] = []
        waiter = threading.Thread(target=lambda: got.append(b.acquire(30)))
        waiter.start()
        time.sleep(0.05)  # not a timing assertion: lets the waiter block in the kernel
        assert got == []
        a.release()
        waiter.join(30)
        assert got == [True]
        assert not a.acquire(0.05)
        b.release()
        assert a.acquire(1)
        a.release()
    finally:
        a.close()
        b.close()


def test_an_abandoned_wait_does_not_keep_the_lock(tmp_path: Path) -> None:
    path = str(tmp_path / "x-wlock")
    a, b, c = WriteLock(path), WriteLock(path), WriteLock(path)
    try:
        assert a.acquire(1)
        assert not b.acquire(0.05)  # b's helper now sleeps in flock for nobody
        a.release()
        deadline = time.monotonic() + 30
        while not c.acquire(0.1):  # b's helper gets the lock, sees nobody waits, lets go
            assert time.monotonic() < deadline, "an abandoned wait kept the lock"
        c.release()
        assert b.acquire(5)  # and b itself can still take it later
        b.release()
    finally:
        for lock in (a, b, c):
            lock.close()


def test_an_interrupted_wait_lets_go_of_a_lock_handed_meanwhile(tmp_path: Path) -> None:
    """A caller on the main thread (the blocking client's trigger) can be interrupted while it waits; the
    helper may have taken the lock for it by then, and must not keep it from other processes."""
    path = str(tmp_path / "x-wlock")
    lock, other, third = WriteLock(path), WriteLock(path), WriteLock(path)
    assert other.acquire(1.0)
    real_wait_for = lock._cond.wait_for

    caller = threading.current_thread()

    def interrupted(predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        if threading.current_thread() is not caller:  # the helper waits on the same condition
            return real_wait_for(predicate, timeout)
        other.release()
        assert real_wait_for(lambda: lock._handed, 10)  # the helper now holds the lock for this caller
        raise KeyboardInterrupt

    lock._cond.wait_for = interrupted  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            lock.acquire(10)
        assert third.acquire(5.0)
        third.release()
    finally:
        for each in (lock, other, third):
            each.close()


def test_the_lock_of_a_killed_process_is_released(tmp_path: Path) -> None:
    path = str(tmp_path / "x-wlock")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from runlane.store.sqlite.writelock import WriteLock\n"
            f"lock = WriteLock({path!r}); assert lock.acquire(5); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    lock = WriteLock(path)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        assert not lock.acquire(0.05)
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert lock.acquire(10)
        lock.release()
    finally:
        lock.close()
        if holder.poll() is None:
            holder.kill()
        holder.communicate()


async def test_store_writes_queue_behind_another_process_holding_the_write_lock(tmp_path: Path) -> None:
    store = create_store(f"sqlite:///{tmp_path / 'x.db'}")
    assert isinstance(store, SQLiteStore)
    await store.open()
    await store.migrate()
    other = WriteLock(str(tmp_path / "x.db-wlock"))
    try:
        assert other.acquire(1)
        insert = asyncio.ensure_future(store.insert_runs([NewRun("j", {})]))
        await asyncio.sleep(0.05)  # not a timing assertion: lets the insert reach the lock and wait
        assert not insert.done()
        other.release()
        (run,) = await insert
        assert run.id == 1
    finally:
        other.close()
        await store.close()


async def test_wal_stays_bounded_while_readers_always_hold_a_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dashboard polling in overlapping read transactions starves passive checkpoints; the writer's
    TRUNCATE checkpoint must still keep the WAL near its threshold."""
    limit = 128 * 1024
    monkeypatch.setattr(connection, "WAL_CHECKPOINT_BYTES", limit)
    monkeypatch.setattr(connection, "WAL_CHECK_INTERVAL_S", 0.0)
    # No back-off: a loaded machine may lose an attempt to the readers, and a timed pause lets the WAL grow by
    # however many commits fit into it. Retried at every commit, each lost attempt costs one commit's pages.
    monkeypatch.setattr(connection, "CHECKPOINT_RETRY_S", 0.0)
    monkeypatch.setattr(connection, "CHECKPOINT_RETRY_MAX_S", 0.0)
    db = tmp_path / "x.db"
    store = create_store(f"sqlite:///{db}")
    assert isinstance(store, SQLiteStore)
    await store.open()
    await store.migrate()
    stop = threading.Event()

    def reader() -> None:
        conns = [sqlite3.connect(db, isolation_level=None, check_same_thread=False) for _ in range(2)]
        i = 0
        while not stop.is_set():  # two snapshots, each opened before the other one ends
            conn = conns[i % 2]
            conn.execute("BEGIN")
            conn.execute("SELECT count(*) FROM runlane_runs").fetchone()
            time.sleep(0.02)
            other = conns[(i + 1) % 2]
            if other.in_transaction:
                other.execute("COMMIT")
            i += 1
        for conn in conns:
            if conn.in_transaction:
                conn.execute("COMMIT")
            conn.close()

    thread = threading.Thread(target=reader)
    thread.start()
    wal = f"{db}-wal"
    largest = 0
    try:
        for _ in range(120):  # about 4 MB of WAL
            await store.insert_runs([NewRun("j", {"pad": "x" * 2000}) for _ in range(2)])
            largest = max(largest, await asyncio.to_thread(os.path.getsize, wal))
    finally:
        stop.set()
        thread.join(30)
        await store.close()
    # Without the forced checkpoints it passes 4 MB; a loaded machine may lose an attempt or two.
    assert largest < 8 * limit, f"the WAL reached {largest} bytes"


def test_failed_forced_checkpoints_back_off_for_every_process_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader holding one snapshot for minutes must not make each process stall the writers in turn."""
    db = tmp_path / "x.db"
    lock = WriteLock(f"{db}-wlock")
    other = WriteLock(f"{db}-wlock")
    conn = connection.connect(str(db), writer=True)
    conn.execute("CREATE TABLE t (x)")
    reader = sqlite3.connect(db, isolation_level=None)
    writer = connection.Writer(conn, after_commit=lambda topics: None, wal_path=f"{db}-wal", lock=lock)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM t").fetchone()  # a snapshot that outlives the test
        conn.execute("INSERT INTO t VALUES (zeroblob(1000000))")
        monkeypatch.setattr(connection, "WAL_CHECKPOINT_BYTES", 1000)
        monkeypatch.setattr(connection, "CHECKPOINT_WAIT_MS", 50)
        writer._bound_wal()  # the writer thread's step after a commit, run here to see its outcome
        not_before, backoff = other.checkpoint_note()  # what every other process of the file reads
        assert backoff == connection.CHECKPOINT_RETRY_S
        assert not_before > time.time()
    finally:
        writer.close()
        reader.close()
        conn.close()
        lock.close()
        other.close()


def test_a_checkpoint_that_waited_for_the_lock_skips_a_wal_already_reset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (T22 at full scale): every process that saw the WAL past its threshold queued for the lock,
    and each reset it in turn; the WAL was empty by then, but each reset still waited for the readers' open
    snapshots, holding every writer back (two or three 0.45 s stalls in a row, every two seconds)."""
    db = tmp_path / "x.db"
    lock = WriteLock(f"{db}-wlock")
    other = WriteLock(f"{db}-wlock")
    conn = connection.connect(str(db), writer=True)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (zeroblob(1000000))")
    writer = connection.Writer(conn, after_commit=lambda topics: None, wal_path=f"{db}-wal", lock=lock)
    monkeypatch.setattr(connection, "WAL_CHECKPOINT_BYTES", 1000)
    queued = threading.Event()
    resets: list[bool] = []
    acquire, truncate = lock.acquire, writer._truncate_wal

    def queue_for_the_lock(timeout: float) -> bool:
        queued.set()
        return acquire(timeout)

    def counted_truncate() -> bool:
        resets.append(True)
        return truncate()

    monkeypatch.setattr(lock, "acquire", queue_for_the_lock)
    monkeypatch.setattr(writer, "_truncate_wal", counted_truncate)
    checkpoint = threading.Thread(target=writer._bound_wal)  # the writer thread's step after a commit
    try:
        assert other.acquire(1)  # another process is resetting the WAL
        checkpoint.start()
        assert queued.wait(30)
        plain = sqlite3.connect(db, isolation_level=None)
        assert plain.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        plain.close()
        other.release()
        checkpoint.join(30)
        assert not checkpoint.is_alive()
        assert resets == []  # it found the WAL small once it had the lock
        assert os.path.getsize(f"{db}-wal") == 0
    finally:
        other.release()
        writer.close()
        conn.close()
        lock.close()
        other.close()
