"""Regression (T11 cron_exactly_once_chaos): a scheduler SIGSTOPped inside a fire transaction held its
schedule row lock, and every other scheduler's pass waited on that row, so *all* schedules stopped firing
for as long as the process was stopped (fires came late by the pause; a pause longer than the misfire grace
turned them into misfires). Passes now skip a schedule being fired, and the server ends a fire transaction
left idle, so the stopped scheduler's schedule is taken over too."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import psycopg
import pytest

from runlane.models import RunFilter
from runlane.scheduler.cron import Cron
from runlane.scheduler.schedules import Scheduler, first_fire
from runlane.store.flow import ScheduleDef
from runlane.store.postgres import PostgresStore
from runlane.store.postgres.flow import FIRE_IDLE_TIMEOUT, F

pytestmark = pytest.mark.postgres

EVERY_SECOND = "* * * * * *"


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(pg_url)
    await store.open()
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


def every_second(sid: str, next_fire_at: float | None) -> ScheduleDef:
    return ScheduleDef(
        id=sid,
        job="tick",
        args={},
        cron=EVERY_SECOND,
        interval=None,
        timezone="UTC",
        overlap="allow",
        misfire="latest",
        max_catch_up=100,
        queue="default",
        priority=0,
        max_attempts=1,
        concurrency_key=None,
        source="runtime",
        next_fire_at=next_fire_at,
    )


async def fires(pg: PostgresStore, sid: str) -> list[float]:
    runs = await pg.list_runs(RunFilter(schedule_id=sid), limit=1000)
    return sorted(r.not_before.timestamp() for r in runs if r.not_before is not None)


async def test_a_scheduler_stopped_mid_fire_holds_back_no_other_schedule(
    pg: PostgresStore, pg_url: str
) -> None:
    first = first_fire(Cron(EVERY_SECOND), pg.now())
    for sid in ("a", "b"):
        await pg.add_schedule(every_second(sid, first))
    # A scheduler that began firing "a" and then stopped: its transaction holds the row, idle.
    stopped = await psycopg.AsyncConnection.connect(pg_url)
    await stopped.execute(F["bound_idle"], {"idle_timeout": FIRE_IDLE_TIMEOUT})
    assert await (await stopped.execute(F["fire_state"], {"id": "a"})).fetchall()
    held_since = time.monotonic()

    scheduler = Scheduler(pg)
    await asyncio.sleep(max(first - pg.now(), 0) + 0.05)
    created = await asyncio.wait_for(scheduler.tick(), timeout=1.5)  # used to wait on the locked row
    assert {r.schedule_id for r in created} == {"b"}

    # The server ends the stopped scheduler's transaction; the next passes fire "a" from where it was.
    deadline = time.monotonic() + 10
    while not await fires(pg, "a"):
        assert time.monotonic() < deadline, "schedule a stayed locked"
        await asyncio.wait_for(scheduler.tick(), timeout=1.5)
        await asyncio.sleep(0.2)
    assert time.monotonic() - held_since < 4.5  # within the misfire grace (5 s) of the stop
    with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
        await stopped.execute("SELECT 1")  # its late statements find the session gone
    await stopped.close()
    got = await fires(pg, "a")
    assert got[0] == first  # nothing missed
    assert all(b - a == 1.0 for a, b in itertools.pairwise(got))


async def test_a_fire_ended_by_the_server_is_store_unavailable(pg: PostgresStore) -> None:
    """The stopped scheduler, once resumed, sees a StoreUnavailable (its loop retries), not a driver error
    that would kill its worker's scheduler task."""
    from runlane.errors import StoreUnavailable

    async def idle_fire(conn: psycopg.AsyncConnection[object]) -> None:
        async with conn.transaction():
            await conn.execute("SELECT set_config('idle_in_transaction_session_timeout', '200ms', true)")
            await asyncio.sleep(0.6)  # SIGSTOP
            await conn.execute("SELECT 1")

    with pytest.raises(StoreUnavailable, match="idle"):
        await pg._run(idle_fire)
    assert await pg.list_schedules() == []  # and the store carries on
