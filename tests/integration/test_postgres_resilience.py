"""PostgreSQL connections die (server restart, idle timeouts, pg_terminate_backend); workers carry on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import psycopg
import pytest

from runlane import Runlane, RunStatus


def terminate_backends(url: str) -> int:
    """Kill every session on the test database except our own: what a server restart does to a client."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    return int(row[0]) if row else 0


async def test_worker_survives_losing_every_connection_mid_run(pg_url: str) -> None:
    app = Runlane(pg_url, poll_interval=0.2, lease_timeout=10)
    release = asyncio.Event()
    started = asyncio.Event()

    @app.job
    async def hold() -> str:
        started.set()
        await release.wait()
        return "done"

    @app.job
    def after() -> str:
        return "after"

    await app.migrate()
    client = app.async_client
    try:
        async with app.worker():
            run = await client.trigger(hold)
            await asyncio.wait_for(started.wait(), 30)
            killed = await asyncio.to_thread(terminate_backends, pg_url)
            assert killed >= 2  # pool, listener and heartbeat connections at least
            release.set()
            done = await client.wait(run.id, timeout=30)
            assert done.status is RunStatus.SUCCEEDED
            assert done.attempt == 1  # the in-flight lease survived: no reclaim, no second attempt
            # the worker still claims (listener and pool reconnected without a restart)
            assert await client.run(after, timeout=30) == "after"
        attempts = await client.attempts(run.id)
        assert [a.status for a in attempts] == [RunStatus.SUCCEEDED]
    finally:
        await client.aclose()
        await app.aclose()


async def test_stalled_limited_claimer_does_not_stall_other_workers(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (found by chaos T19): a worker SIGSTOPped inside a limited claim held the limit's advisory
    lock until it resumed, so every other worker's limited claims waited for it (90 s stalls under chaos).
    The server now ends a claim transaction left idle, releasing the lock. The claim is pipelined since, and
    the server arms that timeout only at a sync: its trips end with one (T19 again, with flushes alone)."""
    import threading
    import time

    from runlane.errors import StoreUnavailable
    from runlane.scheduler.schedules import sync_app
    from runlane.store.postgres import flow

    app = Runlane(pg_url)

    @app.job(max_concurrency=2)
    def limited() -> None: ...

    await app.migrate()
    await sync_app(app, await app.open_store(), "test")
    client = app.async_client
    stalled = threading.Event()
    outcome: list[object] = []

    class StoppedAdmission(flow.Admission):
        def count_running(self, rows: Iterable[tuple[str, str, str | None, int]]) -> None:
            if threading.current_thread().name == "stalled-claimer":
                stalled.set()  # stopped here, between its transaction's trips, holding the limit's lock
                time.sleep(3.0)  # a stopped process: no round trip happens meanwhile
            super().count_running(rows)

    def stalled_claimer() -> None:
        try:
            outcome.append(asyncio.run(_claim_once(pg_url, "stalled")))
        except StoreUnavailable as exc:
            outcome.append(exc)  # its session was ended by the server: nothing claimed, nothing held

    monkeypatch.setattr(flow, "Admission", StoppedAdmission)
    try:
        await client.trigger(limited)
        await client.trigger(limited)
        thread = threading.Thread(target=stalled_claimer, name="stalled-claimer")
        thread.start()
        assert await asyncio.to_thread(stalled.wait, 10)
        begun = time.monotonic()
        got = await _claim_once(pg_url, "other")
        waited = time.monotonic() - begun
        await asyncio.to_thread(thread.join, 10)
        assert len(got) == 1
        assert waited < 2.0, f"the other claimer waited {waited:.1f} s for a stalled one"
        assert outcome and isinstance(outcome[0], StoreUnavailable), outcome
    finally:
        await client.aclose()
        await app.aclose()


async def _claim_once(url: str, worker: str) -> list[object]:
    from runlane.store import create_store

    store = create_store(url)
    await store.open()
    try:
        return list(await store.claim_limited(worker, ["default"], ["limited"], 1, lease_timeout=2.0))
    finally:
        await store.close()


async def test_worker_stopped_mid_transaction_does_not_hold_back_the_reclaim(pg_url: str) -> None:
    """Regression (found by chaos T03 in CI): a worker SIGSTOPped inside a transaction of its own (a progress
    append, a finish) held its runs' rows; the reaper skips locked rows, so those runs were reclaimed only
    when the worker woke (6 s after the pause, against lease + 2 reaper intervals = 4 s). Every connection
    now carries an idle-in-transaction timeout, so the server ends such a transaction and the reaper goes on."""
    from runlane.errors import StoreUnavailable
    from runlane.store import NewRun
    from runlane.store.postgres import PostgresStore

    store = PostgresStore(pg_url)
    await store.open()
    await store.migrate()
    resume = asyncio.Event()
    locked = asyncio.Event()
    try:
        assert store.options.idle_in_transaction_timeout == 1.0
        (run,) = await store.insert_runs([NewRun("a", {})])
        (claimed,) = await store.claim("stopped", queues=["default"], jobs=["a"], limit=1, lease_timeout=0.5)
        assert claimed.id == run.id

        async def stopped_mid_write(conn: psycopg.AsyncConnection[object]) -> None:
            async with conn.transaction():
                await conn.execute("SELECT 1 FROM runlane_runs WHERE id = %s FOR UPDATE", (run.id,))
                locked.set()
                await resume.wait()  # SIGSTOP: no round trip happens meanwhile
                await conn.execute("SELECT 1")

        stopped = asyncio.create_task(store._run(stopped_mid_write))
        await asyncio.wait_for(locked.wait(), 10)
        reaped: list[int] = []
        async with asyncio.timeout(30):  # without the bound: never, while the worker stays stopped
            while not reaped:
                await asyncio.sleep(0.1)
                reaped = await store.reap_expired_leases()
        assert reaped == [run.id]
        assert not stopped.done()  # the reclaim did not wait for the worker to wake
        resume.set()
        with pytest.raises(StoreUnavailable, match="idle"):
            await stopped  # it wakes to find its transaction ended (rolled back), not to commit
        after = await store.get_run(run.id)
        assert after is not None and after.status is RunStatus.PENDING and after.attempt == 1
    finally:
        resume.set()
        await store.close()
