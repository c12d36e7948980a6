"""Store contract for schedules, paused queues and limits, on every backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from store_helpers import T0, FakeClock, claim, finish, get, insert, lease

from runlane.errors import InvalidSchedule
from runlane.limits import JobLimits, QueueLimits, RateLimit
from runlane.models import Run, RunFilter, RunStatus
from runlane.store import Finish, NewRun, Store, create_store
from runlane.store.flow import FireRequest, ScheduleDef


def sdef(id: str = "s", *, overlap: str = "allow", next_fire_at: float = T0 + 1, **kw: Any) -> ScheduleDef:
    base: dict[str, Any] = dict(
        id=id,
        job="j",
        args={},
        cron="* * * * * *",
        interval=None,
        timezone="UTC",
        overlap=overlap,
        misfire="latest",
        max_catch_up=100,
        queue="default",
        priority=0,
        max_attempts=3,
        concurrency_key=None,
        source="runtime",
        next_fire_at=next_fire_at,
    )
    base.update(kw)
    return ScheduleDef(**base)


def fire(id: str, expected: float, *fires: float) -> FireRequest:
    return FireRequest(id, expected, tuple(fires), (fires[-1] if fires else expected) + 1)


# -- schedules -----------------------------------------------------------------------------------------------


async def test_a_fire_creates_one_run_carrying_its_fire_time(clocked_store: Store, clock: FakeClock) -> None:
    store = clocked_store
    await store.add_schedule(sdef(args={"x": 1}))
    clock.advance(2)
    runs = await store.fire_schedule(fire("s", T0 + 1, T0 + 1, T0 + 2))
    assert [r.not_before.timestamp() for r in runs if r.not_before] == [T0 + 1, T0 + 2]
    assert {(r.schedule_id, r.status, r.job) for r in runs} == {("s", RunStatus.PENDING, "j")}
    assert runs[0].args == {"x": 1}
    schedule = await store.get_schedule("s")
    assert schedule is not None and schedule.next_fire_at is not None
    assert schedule.next_fire_at.timestamp() == T0 + 3
    assert schedule.last_fire_at is not None and schedule.last_fire_at.timestamp() == T0 + 2


async def test_a_stale_pass_creates_nothing(clocked_store: Store, clock: FakeClock) -> None:
    store = clocked_store
    await store.add_schedule(sdef())
    clock.advance(2)
    assert len(await store.fire_schedule(fire("s", T0 + 1, T0 + 1))) == 1
    # A second scheduler that read the schedule before the first one advanced it.
    assert await store.fire_schedule(fire("s", T0 + 1, T0 + 1)) == []
    assert len([r async for r in _runs(store)]) == 1


async def test_the_unique_key_stops_a_duplicate_fire_even_past_the_check(
    clocked_store: Store, clock: FakeClock
) -> None:
    """A scheduler that crashed after inserting but before advancing (or a rewound schedule): the next pass
    plans the same fire again, and the unique (schedule, fire time) key makes it a no-op."""
    store = clocked_store
    await store.add_schedule(sdef())
    clock.advance(3)
    assert len(await store.fire_schedule(fire("s", T0 + 1, T0 + 1, T0 + 2))) == 2
    await store.set_schedule_enabled("s", False, next_fire_at=None)
    await store.set_schedule_enabled("s", True, next_fire_at=T0 + 1)  # rewound
    again = await store.fire_schedule(fire("s", T0 + 1, T0 + 1, T0 + 2, T0 + 3))
    assert [r.not_before.timestamp() for r in again if r.not_before] == [T0 + 3]


async def test_concurrent_schedulers_fire_exactly_once(store_url: str, clock: FakeClock) -> None:
    stores = [create_store(store_url, clock=clock) for _ in range(4)]
    for s in stores:
        await s.open()
    try:
        await stores[0].migrate()
        await stores[0].add_schedule(sdef())
        clock.advance(5)
        requests = [fire("s", T0 + 1, *(T0 + k for k in range(1, 6)))] * 4
        results = await asyncio.gather(*(s.fire_schedule(r) for s, r in zip(stores, requests, strict=True)))
        assert sorted(len(r) for r in results) == [0, 0, 0, 5]
        fire_times = [r.not_before for r in await stores[0].list_runs(_filter("s"), limit=100)]
        assert len(fire_times) == len(set(fire_times)) == 5
    finally:
        for s in stores:
            await s.close()


async def test_overlap_skip_records_skipped_runs(clocked_store: Store, clock: FakeClock) -> None:
    store = clocked_store
    await store.add_schedule(sdef(overlap="skip"))
    clock.advance(1)
    (first,) = await store.fire_schedule(fire("s", T0 + 1, T0 + 1))
    clock.advance(1)
    (second,) = await store.fire_schedule(fire("s", T0 + 2, T0 + 2))
    assert first.status is RunStatus.PENDING
    assert second.status is RunStatus.SKIPPED and second.finished_at is not None
    (running,) = await claim(store)
    await finish(store, running)
    clock.advance(1)
    (third,) = await store.fire_schedule(fire("s", T0 + 3, T0 + 3))
    assert third.status is RunStatus.PENDING


async def test_overlap_queue_holds_fires_until_the_previous_run_ends(
    clocked_store: Store, clock: FakeClock
) -> None:
    store = clocked_store
    await store.add_schedule(sdef(overlap="queue"))
    clock.advance(2)
    first, second = await store.fire_schedule(fire("s", T0 + 1, T0 + 1, T0 + 2))
    assert (first.status, second.status) == (RunStatus.PENDING, RunStatus.SCHEDULED)
    (running,) = await claim(store, lease_timeout=1000)  # still held when it finishes, 100 s later
    assert await store.release_queued_fires() == 0  # the first is still running
    clock.advance(100)
    assert await claim(store) == []  # a held fire is not promoted by time
    await finish(store, running)
    assert await store.release_queued_fires() == 1
    assert (await get(store, second.id)).status is RunStatus.PENDING
    assert await store.release_queued_fires() == 0


async def test_overlap_allow_runs_both(clocked_store: Store, clock: FakeClock) -> None:
    store = clocked_store
    await store.add_schedule(sdef(overlap="allow"))
    clock.advance(2)
    runs = await store.fire_schedule(fire("s", T0 + 1, T0 + 1, T0 + 2))
    assert {r.status for r in runs} == {RunStatus.PENDING}
    assert len(await claim(store)) == 2


async def test_code_sync_keeps_timing_disables_removed_and_keeps_a_pause(
    clocked_store: Store, clock: FakeClock
) -> None:
    store = clocked_store
    a, b = sdef("a", source="code"), sdef("b", source="code")
    await store.sync_code_schedules([a, b], removed_reason="gone")
    clock.advance(1)
    await store.fire_schedule(fire("a", T0 + 1, T0 + 1))
    await store.set_schedule_enabled("b", False, next_fire_at=None)
    # A restart with the same code: the stored next fire and the pause survive.
    await store.sync_code_schedules([a, b], removed_reason="gone")
    got = {s.id: s for s in await store.list_schedules()}
    assert got["a"].next_fire_at is not None and got["a"].next_fire_at.timestamp() == T0 + 2
    assert not got["b"].enabled
    # Changed code: a's cron changed (re-timed), b removed (disabled, not deleted, with the reason).
    a2 = sdef("a", source="code", cron="*/5 * * * * *", next_fire_at=T0 + 5)
    await store.sync_code_schedules([a2], removed_reason="removed from code")
    got = {s.id: s for s in await store.list_schedules()}
    assert got["a"].cron == "*/5 * * * * *" and got["a"].next_fire_at is not None
    assert got["a"].next_fire_at.timestamp() == T0 + 5
    assert got["b"].disabled_reason == "removed from code" and not got["b"].active
    clock.advance(100)
    assert [s.id for s in await store.due_schedules(clock())] == ["a"]
    # Declared again: back, re-timed.
    await store.sync_code_schedules([a2, sdef("b", source="code", next_fire_at=T0 + 200)], removed_reason="x")
    b_again = await store.get_schedule("b")
    assert b_again is not None and b_again.disabled_reason is None


async def test_runtime_schedules_cannot_take_a_code_id(clocked_store: Store) -> None:
    await clocked_store.sync_code_schedules([sdef("nightly", source="code")], removed_reason="x")
    with pytest.raises(InvalidSchedule):
        await clocked_store.add_schedule(sdef("nightly"))


async def test_pause_resume_remove(clocked_store: Store, clock: FakeClock) -> None:
    store = clocked_store
    await store.add_schedule(sdef())
    paused = await store.set_schedule_enabled("s", False, next_fire_at=None)
    assert paused is not None and not paused.enabled
    clock.advance(10)
    assert await store.due_schedules(clock()) == []
    assert await store.next_schedule_fire_at() is None
    resumed = await store.set_schedule_enabled("s", True, next_fire_at=T0 + 11)
    assert resumed is not None and resumed.next_fire_at is not None
    assert resumed.next_fire_at.timestamp() == T0 + 11
    assert await store.next_schedule_fire_at() == T0 + 11
    assert await store.set_schedule_enabled("missing", True, next_fire_at=None) is None
    assert await store.remove_schedule("s")
    assert not await store.remove_schedule("s")
    assert await store.get_schedule("s") is None


# -- queues and limits -----------------------------------------------------------------------------------------


async def test_paused_queue_accepts_runs_but_is_not_claimed(clocked_store: Store) -> None:
    store = clocked_store
    await store.set_queue_paused("default", True)
    run = await insert(store)
    assert await claim(store) == []
    (info,) = [q for q in await store.queue_stats() if q.name == "default"]
    assert info.paused and info.pending == 1
    await store.set_queue_paused("default", False)
    assert [r.id for r in await claim(store)] == [run.id]


async def test_job_concurrency_partitioned_by_key(clocked_store: Store) -> None:
    store = clocked_store
    await store.register_limits([JobLimits("j", max_concurrency=1)], [])
    for key in ("a", "a", "b", None, None):
        await insert(store, concurrency_key=key)
    first = await claim(store)
    assert sorted(str(r.id) for r in first) == ["1", "3", "4"]  # one per partition (a, b, unkeyed)
    assert await claim(store) == []
    await finish(store, first[0])  # frees partition "a"
    assert [r.id for r in await claim(store)] == [2]


async def test_saturated_key_does_not_block_others_behind_it(clocked_store: Store) -> None:
    store = clocked_store
    await store.register_limits([JobLimits("j", max_concurrency=1)], [])
    for _ in range(30):
        await insert(store, concurrency_key="busy", priority=5)
    late = await insert(store, concurrency_key="other")
    got = await claim(store, limit=5)
    assert sorted(r.id for r in got) == [1, late.id]


async def test_keyed_runs_are_claimed_while_the_unkeyed_partition_is_full(clocked_store: Store) -> None:
    """A job at its limit in its unkeyed partition still has room in its keyed ones, wherever they are in
    claim order (PostgreSQL leaves such a job out of its search only when no keyed run is pending)."""
    store = clocked_store
    await store.register_limits([JobLimits("j", max_concurrency=1)], [])
    unkeyed = [await insert(store, priority=5) for _ in range(20)]
    assert [r.id for r in await claim(store, limit=5)] == [unkeyed[0].id]
    assert await claim(store, limit=5) == []
    keyed = await insert(store, concurrency_key="a")
    assert [r.id for r in await claim(store, limit=5)] == [keyed.id]
    assert await claim(store, limit=5) == []


async def test_queue_concurrency_and_release_and_reaping_free_slots(
    clocked_store: Store, clock: FakeClock
) -> None:
    store = clocked_store
    await store.register_limits([], [QueueLimits("default", max_concurrency=2)])
    for _ in range(5):
        await insert(store)
        await insert(store, job="k")
    got = await claim(store, jobs=("j", "k"))
    assert len(got) == 2
    assert await claim(store, jobs=("j", "k")) == []
    await store.release_runs([lease(got[0])], worker_id="w1")
    assert len(await claim(store, jobs=("j", "k"))) == 1
    clock.advance(1000)  # leases expire: the reaper frees both slots
    await store.reap_expired_leases()
    assert len(await claim(store, jobs=("j", "k"))) == 2


async def test_rate_limit_sliding_window(clocked_store: Store, clock: FakeClock) -> None:
    store = clocked_store
    await store.register_limits([JobLimits("j", rate_limit=RateLimit(3, 10.0))], [])
    for _ in range(10):
        await insert(store)
    got = await claim(store)
    assert len(got) == 3
    for run in got:
        await finish(store, run)
    clock.advance(5)
    assert await claim(store) == []  # 3 starts in the last 10 s
    clock.advance(5.5)
    assert len(await claim(store)) == 3
    clock.advance(1)
    assert await claim(store) == []


async def test_queue_rate_limit(clocked_store: Store, clock: FakeClock) -> None:
    store = clocked_store
    await store.register_limits([], [QueueLimits("default", rate_limit=RateLimit(2, 1.0))])
    for _ in range(5):
        await insert(store)
    assert len(await claim(store)) == 2
    assert await claim(store) == []
    clock.advance(1.01)
    assert len(await claim(store)) == 2


async def test_limits_are_replaced_and_removed(clocked_store: Store) -> None:
    store = clocked_store
    await store.register_limits(
        [JobLimits("j", max_concurrency=1)], [QueueLimits("default", max_concurrency=5)]
    )
    await store.register_limits([JobLimits("j")], [QueueLimits("default")])  # limits dropped from code
    for _ in range(4):
        await insert(store)
    assert len(await claim(store)) == 4
    (info,) = [q for q in await store.queue_stats() if q.name == "default"]
    assert info.running == 4 and info.max_concurrency is None


async def test_concurrent_claimers_never_exceed_a_limit(store_url: str, clock: FakeClock) -> None:
    stores = [create_store(store_url, clock=clock) for _ in range(4)]
    for s in stores:
        await s.open()
    try:
        await stores[0].migrate()
        await stores[0].register_limits([JobLimits("j", max_concurrency=3)], [])
        await stores[0].insert_runs([_new() for _ in range(40)])
        for _ in range(5):
            results = await asyncio.gather(
                *(claim(s, f"w{i}", limit=3) for i, s in enumerate(stores) for _ in range(2))
            )
            claimed = [r for batch in results for r in batch]
            running = await stores[0].list_runs(_status("running"), limit=100)
            assert len(running) <= 3
            for i, s in enumerate(stores):
                mine = [r for r in claimed if r.worker_id == f"w{i}"]
                if mine:
                    finishes = [Finish(r.id, r.attempt, "succeeded") for r in mine]
                    await s.finish_attempts(finishes, worker_id=f"w{i}")
    finally:
        for s in stores:
            await s.close()


def _new() -> NewRun:
    return NewRun(job="j", args={})


def _filter(schedule_id: str) -> RunFilter:
    return RunFilter(schedule_id=schedule_id)


def _status(status: str) -> RunFilter:
    return RunFilter(status=status)


async def _runs(store: Store) -> AsyncIterator[Run]:
    for run in await store.list_runs(_filter("s"), limit=1000):
        yield run
