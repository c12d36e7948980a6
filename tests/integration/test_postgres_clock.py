"""Regression (T13 clock_skew_workers): a PostgreSQL scheduler planned fires with its process's wall clock, so
a worker 5 min ahead of the database created fires 5 min early and skipped the ones in between as misfires,
and one behind never saw them due. Every time decision on PostgreSQL now follows the database's clock."""

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
from runlane.store import NewRun
from runlane.store.flow import ScheduleDef
from runlane.store.postgres import PostgresStore

pytestmark = pytest.mark.postgres

EVERY_SECOND = "* * * * * *"


class SkewedClock:
    """This process's wall clock, off by ``offset`` seconds (what faketime does to a worker)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offset = 0.0
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + self.offset)


@pytest.fixture
def skew(monkeypatch: pytest.MonkeyPatch) -> SkewedClock:
    return SkewedClock(monkeypatch)


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(pg_url)
    await store.open()
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


def db_now(url: str) -> float:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
    assert row is not None
    return float(row[0])


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


@pytest.mark.parametrize("offset", [300.0, -300.0])
async def test_postgres_store_now_is_the_database_clock(
    pg_url: str, skew: SkewedClock, offset: float
) -> None:
    skew.offset = offset
    store = PostgresStore(pg_url)
    await store.open()
    try:
        assert abs(time.time() - db_now(pg_url) - offset) < 1.0  # the process's clock is off
        assert abs(store.now() - db_now(pg_url)) < 0.5  # the store's is not
        skew.offset = -3600.0  # an NTP step back mid-run moves the wall clock only
        assert abs(store.now() - db_now(pg_url)) < 0.5
    finally:
        await store.close()


@pytest.mark.parametrize("offset", [300.0, -300.0])
async def test_a_skewed_scheduler_fires_on_database_time(
    pg: PostgresStore, pg_url: str, skew: SkewedClock, offset: float
) -> None:
    skew.offset = offset
    schedule = await pg.add_schedule(every_second("s", first_fire(Cron(EVERY_SECOND), pg.now())))
    assert schedule.next_fire_at is not None
    first = schedule.next_fire_at.timestamp()
    assert abs(first - db_now(pg_url)) < 1.5  # the next second of the database, not of this process
    scheduler = Scheduler(pg)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and db_now(pg_url) < first + 2.2:
        await scheduler.tick()
        await asyncio.sleep(0.1)
    await scheduler.tick()
    until = db_now(pg_url)
    runs = await pg.list_runs(RunFilter(schedule_id="s"), limit=1000)
    fires = sorted(r.not_before.timestamp() for r in runs if r.not_before is not None)
    assert fires, "the schedule never fired"
    assert fires[0] == first  # nothing skipped as a misfire
    assert all(b - a == 1.0 for a, b in itertools.pairwise(fires))  # none missing
    assert fires[-1] <= until  # none created ahead of the database's clock
    assert until - fires[-1] < 1.5


async def test_relative_not_before_counts_from_the_database_clock(
    pg: PostgresStore, pg_url: str, skew: SkewedClock
) -> None:
    skew.offset = 300.0
    now = pg.now()
    (run,) = await pg.insert_runs([NewRun(job="j", args={}, not_before=now + 5.0)])
    assert run.not_before is not None
    assert abs(run.not_before.timestamp() - (db_now(pg_url) + 5.0)) < 1.0
    assert run.status.value == "scheduled"
    assert await pg.claim("w", queues=["default"], jobs=["j"], limit=1, lease_timeout=30) == []
