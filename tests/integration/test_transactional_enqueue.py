"""Transactional enqueue: a run triggered with the caller's connection exists iff that transaction commits."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runlane import InvalidConnection, RunConflict, Runlane, RunStatus, StoreUnavailable
from runlane.testing import drain


@pytest.fixture
async def pg_app(pg_url: str) -> AsyncIterator[Runlane]:
    app = Runlane(pg_url, poll_interval=0.2)

    @app.job
    def record(n: int) -> int:
        return n

    await app.migrate()
    yield app
    await app.async_client.aclose()
    await app.aclose()


async def test_run_exists_iff_the_transaction_commits(pg_app: Runlane, pg_url: str) -> None:
    client = pg_app.async_client
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        async with conn.transaction():
            run = await client.trigger("record", {"n": 1}, connection=conn)
            await conn.execute("SELECT 1")  # the caller's own work in the same transaction
            assert await client.get_run(run.id) is None  # invisible to everyone else before commit
            await drain(pg_app)  # and no worker can claim it
        assert (await client.get_run(run.id)) is not None
        await drain(pg_app)
        assert await client.result(run.id, timeout=30) == 1

        async with conn.transaction():
            doomed = await client.trigger("record", {"n": 2}, connection=conn)
            raise psycopg.Rollback()  # the caller's business rule said no
        assert await client.get_run(doomed.id) is None


async def test_trigger_many_in_a_transaction(pg_app: Runlane, pg_url: str) -> None:
    client = pg_app.async_client
    async with await psycopg.AsyncConnection.connect(pg_url) as conn, conn.transaction():
        runs = await client.trigger_many("record", [{"n": i} for i in range(50)], connection=conn)
    await drain(pg_app)
    assert [await client.result(r.id, timeout=30) for r in runs] == list(range(50))


def test_sync_client_with_a_sync_connection(pg_app: Runlane, pg_url: str) -> None:
    client = pg_app.client
    try:
        with psycopg.connect(pg_url) as conn:
            with conn.transaction():
                run = client.trigger("record", {"n": 5}, connection=conn)
                assert client.get_run(run.id) is None
            committed = client.get_run(run.id)
            assert committed is not None
            assert committed.status is RunStatus.PENDING
            with conn.transaction():
                gone = client.trigger("record", {"n": 6}, connection=conn)
                raise psycopg.Rollback()  # leaves the transaction block, rolled back
        assert client.get_run(gone.id) is None
    finally:
        client.close()


def test_sync_transactional_trigger_waiting_for_a_dedup_id_blocks_only_its_caller(
    pg_app: Runlane, pg_url: str
) -> None:
    """Regression (T14): the blocking client drove a caller's sync connection on its shared loop, so a
    transactional trigger waiting for a dedup id held by another open transaction stalled every thread's
    calls, the holder's next one included: the holder never committed and both waited for ever."""
    client = pg_app.client
    outcome: dict[str, Any] = {}

    def second_trigger(conn: psycopg.Connection[Any]) -> None:
        try:
            with conn.transaction():
                client.trigger("record", {"n": 2}, dedup_id="once", connection=conn)
        except RunConflict as exc:
            outcome["conflict with"] = exc.existing_run_id

    def holders_next_call(run_id: int) -> None:
        outcome["holder read"] = client.get_run(run_id)

    try:
        with (
            psycopg.connect(pg_url) as holder,
            psycopg.connect(pg_url) as other,
            psycopg.connect(pg_url, autocommit=True) as observer,
        ):
            with holder.transaction():
                run = client.trigger("record", {"n": 1}, dedup_id="once", connection=holder)
                waiter = threading.Thread(target=second_trigger, args=(other,), daemon=True)
                waiter.start()
                deadline = time.monotonic() + 10
                while not observer.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
                    (other.info.backend_pid,),
                ).fetchone():
                    assert time.monotonic() < deadline, "the second trigger never waited for the first"
                    time.sleep(0.01)
                reader = threading.Thread(target=holders_next_call, args=(run.id,), daemon=True)
                reader.start()
                reader.join(10)
                assert not reader.is_alive(), (
                    "the holder's next client call is stuck behind the waiting trigger"
                )
            waiter.join(10)
            assert not waiter.is_alive()
        assert outcome == {"holder read": None, "conflict with": run.id}
    finally:
        client.close()


async def test_unusable_connections_are_refused(pg_app: Runlane, pg_url: str) -> None:
    client = pg_app.async_client
    conn = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    with pytest.raises(InvalidConnection, match="autocommit"):
        await client.trigger("record", {"n": 1}, connection=conn)
    await conn.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await client.trigger("record", {"n": 1}, connection=conn)
    assert [r async for r in client.list_runs()] == []


async def test_sqlite_refuses_transactional_enqueue(tmp_path: Path, pg_url: str) -> None:
    app = Runlane(f"sqlite:///{tmp_path / 'x.db'}")

    @app.job
    def record(n: int) -> int:
        return n

    await app.migrate()
    try:
        async with await psycopg.AsyncConnection.connect(pg_url) as conn:
            with pytest.raises(InvalidConnection, match="PostgreSQL"):
                await app.async_client.trigger(record, {"n": 1}, connection=conn)
    finally:
        await app.aclose()
