"""SQLite-specific behaviour of the store: URLs, :memory:, several stores and processes on one file,
cross-process wake-ups, thread hygiene, and driver errors mapped to StoreUnavailable."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import sys
import threading
from pathlib import Path

import pytest

from runlane.errors import RunConflict, SchemaOutdated, StoreUnavailable
from runlane.models import RunFilter, RunStatus
from runlane.store import Finish, Lease, NewRun, create_store
from runlane.store.migrations import latest_version
from runlane.store.sqlite import SQLiteStore
from runlane.store.sqlite.store import parse_url
from runlane.store.sqlite.wakeup import wake_dir

REPO = Path(__file__).resolve().parents[2]

LATEST = latest_version("runlane.store.sqlite.migrations")


def _exists(path: str) -> bool:
    return os.path.exists(path)


def sqlite_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("runlane-sqlite")]


async def open_store(url: str) -> SQLiteStore:
    store = create_store(url)
    assert isinstance(store, SQLiteStore)
    await store.open()
    await store.migrate()
    return store


def test_url_forms() -> None:
    assert parse_url("sqlite:///runlane.db") == "runlane.db"
    assert parse_url("sqlite:///sub/dir/x.db") == "sub/dir/x.db"
    assert parse_url("sqlite:////abs/path/x.db") == "/abs/path/x.db"
    assert parse_url("sqlite:///:memory:") == ":memory:"
    for bad in ("sqlite://", "sqlite:///", "sqlite://relative.db"):
        with pytest.raises(StoreUnavailable):
            parse_url(bad)


async def test_relative_url_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = await open_store("sqlite:///rel.db")
    try:
        await store.insert_runs([NewRun("j", {})])
    finally:
        await store.close()
    assert (tmp_path / "rel.db").exists()
    with sqlite3.connect(tmp_path / "rel.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_memory_store_works_end_to_end() -> None:
    store = await open_store("sqlite:///:memory:")
    try:
        assert await store.schema_version() == (LATEST, LATEST)
        (run,) = await store.insert_runs([NewRun("j", {"x": 1})])
        (_claimed,) = await store.claim("w", queues=["default"], jobs=["j"], limit=5, lease_timeout=30)
        held = await asyncio.to_thread(store.heartbeat_blocking, "w", [Lease(run.id, 1)], 30)
        assert held == {run.id}
        assert await store.finish_attempts([Finish(run.id, 1, "succeeded", result=2)], worker_id="w") == [
            True
        ]
        done = await store.get_run(run.id)
        assert done is not None and done.status is RunStatus.SUCCEEDED and done.result == 2
        assert [r.id for r in await store.list_runs(RunFilter(status="succeeded"))] == [run.id]
        assert len(await store.events(run.id)) == 2
    finally:
        await store.close()
    assert sqlite_threads() == []


async def test_an_unopenable_file_raises_store_unavailable(tmp_path: Path) -> None:
    store = create_store(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    with pytest.raises(StoreUnavailable) as info:
        await store.open()
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    with pytest.raises(StoreUnavailable):
        await store.get_run(1)
    with pytest.raises(StoreUnavailable):
        await create_store(f"sqlite:///{tmp_path}").open()
    assert sqlite_threads() == []


async def test_schema_version_of_an_empty_file_is_zero(tmp_path: Path) -> None:
    store = create_store(f"sqlite:///{tmp_path / 'x.db'}")
    await store.open()
    try:
        assert await store.schema_version() == (0, LATEST)
        with pytest.raises(SchemaOutdated, match="migrate"):
            await store.check_schema()
        with pytest.raises(SchemaOutdated, match="migrate"):
            await store.get_run(1)
        with pytest.raises(SchemaOutdated, match="migrate"):
            await store.insert_runs([NewRun("j", {})])
        assert await store.migrate() == list(range(1, LATEST + 1))
        assert await store.schema_version() == (LATEST, LATEST)
    finally:
        await store.close()


async def test_two_stores_migrating_at_once_apply_each_migration_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    a, b = create_store(url), create_store(url)
    await a.open()
    await b.open()
    try:
        applied = await asyncio.gather(a.migrate(), b.migrate())
        assert sorted(applied[0] + applied[1]) == list(range(1, LATEST + 1))
    finally:
        await a.close()
        await b.close()


async def test_close_stops_every_thread_and_is_idempotent(tmp_path: Path) -> None:
    assert sqlite_threads() == []
    store = await open_store(f"sqlite:///{tmp_path / 'x.db'}")
    await store.insert_runs([NewRun("j", {})])
    await asyncio.gather(*(store.list_runs(RunFilter()) for _ in range(8)))
    assert sqlite_threads()
    wake = store._wake
    assert wake is not None and _exists(wake.path)
    await store.close()
    await store.close()
    assert sqlite_threads() == []
    assert not _exists(wake.path)
    with pytest.raises(StoreUnavailable):
        await store.insert_runs([NewRun("j", {})])
    with pytest.raises(StoreUnavailable):
        store.heartbeat_blocking("w", [], 30)


async def test_writes_wait_for_another_connection_holding_the_lock(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path / 'x.db'}")
    other = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        insert = asyncio.ensure_future(store.insert_runs([NewRun("j", {})]))
        await asyncio.sleep(0.05)  # not a timing assertion: lets the insert reach the lock and wait
        assert not insert.done()
        other.execute("COMMIT")
        (run,) = await insert
        assert run.id == 1
    finally:
        other.close()
        await store.close()


async def test_heartbeat_while_the_event_loop_is_blocked(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        await store.insert_runs([NewRun("j", {})])
        (run,) = await store.claim("w", queues=["default"], jobs=["j"], limit=1, lease_timeout=30)
        held: list[set[int]] = []
        thread = threading.Thread(
            target=lambda: held.append(store.heartbeat_blocking("w", [Lease(run.id, 1)], 30))
        )
        thread.start()
        thread.join(timeout=30)  # blocks this event loop on purpose, as a sync job would
        assert held == [{run.id}]
    finally:
        await store.close()


async def test_one_failing_operation_does_not_fail_its_commit_group(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        await store.insert_runs([NewRun("j", {}, dedup_id="taken")])
        items = [NewRun("j", {"i": i}, dedup_id="taken" if i % 5 == 0 else None) for i in range(40)]
        results = await asyncio.gather(*(store.insert_runs([item]) for item in items), return_exceptions=True)
        conflicts = [r for r in results if isinstance(r, RunConflict)]
        assert len(conflicts) == 8
        assert all(r.existing_run_id == 1 for r in conflicts)
        assert len(await store.list_runs(RunFilter(), limit=1000)) == 1 + 32
    finally:
        await store.close()


# -- several stores and processes on one file ---------------------------------------------------------------------------


def _hammer(url: str, worker: str, rounds: int, errors: list[BaseException]) -> None:
    """Insert, claim and finish in a loop on a store of its own, in its own thread and event loop."""

    async def main() -> None:
        store = await open_store(url)
        try:
            for i in range(rounds):
                await store.insert_runs([NewRun("j", {"w": worker, "i": i}), NewRun("j", {})])
                claimed = await store.claim(worker, queues=["default"], jobs=["j"], limit=2, lease_timeout=30)
                await store.finish_attempts(
                    [Finish(r.id, r.attempt, "succeeded") for r in claimed], worker_id=worker
                )
        finally:
            await store.close()

    try:
        asyncio.run(main())
    except BaseException as exc:
        errors.append(exc)


async def test_stores_in_several_threads_share_a_file_without_lock_errors(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    await (await open_store(url)).close()
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_hammer, args=(url, f"w{i}", 60, errors)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    store = await open_store(url)
    try:
        assert len(await store.list_runs(RunFilter(), limit=10_000)) == 3 * 60 * 2
    finally:
        await store.close()


_CHILD = """
import asyncio, sys
from runlane.store import NewRun, create_store

async def main():
    store = create_store(sys.argv[1])
    await store.open()
    await store.migrate()
    try:
        for i in range(int(sys.argv[2])):
            await store.insert_runs([NewRun("child", {"i": i})])
    finally:
        await store.close()

asyncio.run(main())
"""


@pytest.mark.slow
async def test_two_processes_write_one_file_concurrently(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, url, "300", env=env, stderr=asyncio.subprocess.PIPE
    )
    store = await open_store(url)
    try:
        for i in range(300):
            await store.insert_runs([NewRun("parent", {"i": i})])
        _, stderr = await asyncio.wait_for(child.communicate(), timeout=120)
        assert child.returncode == 0, stderr.decode()
        assert len(await store.list_runs(RunFilter(job="child"), limit=1000)) == 300
        assert len(await store.list_runs(RunFilter(job="parent"), limit=1000)) == 300
    finally:
        await store.close()


# -- cross-process wake-ups ---------------------------------------------------------------------------------------------


async def test_a_commit_wakes_the_other_stores_on_the_same_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    a, b = await open_store(url), await open_store(url)
    try:
        work = a.notifier.generation("work")
        await b.insert_runs([NewRun("j", {})])
        assert await a.notifier.wait("work", work, timeout=10)
        (run,) = await a.claim("w", queues=["default"], jobs=["j"], limit=1, lease_timeout=30)
        cancel = a.notifier.generation("cancel")
        await b.cancel_runs([run.id])
        assert await a.notifier.wait("cancel", cancel, timeout=10)
    finally:
        await a.close()
        await b.close()


async def test_sockets_of_dead_processes_are_removed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    store = await open_store(url)
    try:
        stale = os.path.join(wake_dir(store.path), "999999-dead.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(stale)
        sock.close()  # the file stays, nobody receives: what a killed process leaves behind
        assert _exists(stale)
        await store.insert_runs([NewRun("j", {})])
        assert not _exists(stale)
    finally:
        await store.close()


async def test_memory_store_has_no_wake_channel() -> None:
    store = await open_store("sqlite:///:memory:")
    try:
        assert store._wake is None
        work = store.notifier.generation("work")
        await store.insert_runs([NewRun("j", {})])
        assert store.notifier.generation("work") > work
    finally:
        await store.close()
