"""PostgreSQL connections die (server restart, idle timeouts, pg_terminate_backend); workers carry on."""

from __future__ import annotations

import asyncio

import psycopg

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
