"""Store contract: inserting, deduplicating and reading runs. Runs on every backend."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from store_helpers import FakeClock, claim_one, finish, get, insert, new

from runlane.errors import RunConflict, RunNotFound
from runlane.models import RunFilter, RunStatus
from runlane.store import Store


async def test_insert_returns_runs_and_get_run_reads_them(store: Store) -> None:
    (run,) = await store.insert_runs(
        [
            new(
                "emails.send",
                {"to": "a@b.c", "n": [1, 2]},
                queue="mail",
                priority=3,
                max_attempts=5,
                tags=("x", "y"),
            )
        ]
    )
    assert run.id > 0
    assert run.job == "emails.send"
    assert run.args == {"to": "a@b.c", "n": [1, 2]}
    assert run.status is RunStatus.PENDING
    assert (run.queue, run.priority, run.attempt, run.max_attempts) == ("mail", 3, 0, 5)
    assert run.tags == ("x", "y")
    assert run.root_run_id == run.id
    assert run.parent_run_id is None
    assert run.created_at.tzinfo is not None
    assert run.started_at is None and run.finished_at is None and run.worker_id is None
    assert run.result is None and run.error is None and run.progress is None
    assert await store.get_run(run.id) == run


async def test_get_run_of_a_missing_id_is_none(store: Store) -> None:
    assert await store.get_run(123456) is None


async def test_insert_many_keeps_input_order_and_get_runs_skips_missing(store: Store) -> None:
    runs = await store.insert_runs([new(args={"i": i}) for i in range(20)])
    assert [r.args["i"] for r in runs] == list(range(20))
    assert len({r.id for r in runs}) == 20
    found = await store.get_runs([runs[3].id, runs[7].id, 999_999])
    assert sorted(r.id for r in found) == sorted([runs[3].id, runs[7].id])
    assert await store.get_runs([]) == []


async def test_insert_chunks_keeps_input_order_across_chunks(store: Store) -> None:
    chunks = [[new(args={"i": 5 * c + i}) for i in range(5)] for c in range(4)] + [[new(args={"i": 20})]]
    runs = await store.insert_chunks(chunks)
    assert [r.args["i"] for r in runs] == list(range(21))
    ids = [r.id for r in runs]
    assert ids == sorted(ids) and len(set(ids)) == 21  # chunk k+1 starts after chunk k committed
    assert sorted(await store.get_runs(ids), key=lambda r: r.id) == runs


async def test_insert_chunks_stops_at_the_chunk_that_fails(store: Store) -> None:
    """The chunks before the failing one stay inserted, the failing one and those after it are not: the same
    as inserting one chunk at a time, even where a store overlaps the next chunk with the previous one."""
    bad = new(args={"i": object()})  # refused when the chunk is serialised, after the first chunk was sent
    chunks = [[new("first", {"i": i}) for i in range(3)], [new("second"), bad], [new("third")]]
    with pytest.raises(TypeError):
        await store.insert_chunks(chunks)
    listed = await store.list_runs(RunFilter())
    assert sorted(r.job for r in listed) == ["first"] * 3
    # The store stays usable afterwards.
    assert len(await store.insert_chunks([[new("after")], [new("after")]])) == 2


async def test_run_is_scheduled_until_not_before(clocked_store: Store, clock: FakeClock) -> None:
    later = await insert(clocked_store, not_before=clock() + 60)
    past = await insert(clocked_store, not_before=clock() - 60)
    assert later.status is RunStatus.SCHEDULED
    assert later.not_before == datetime.fromtimestamp(clock() + 60, UTC)
    assert past.status is RunStatus.PENDING
    assert later.created_at == datetime.fromtimestamp(clock(), UTC)


async def test_parent_and_root_ids(store: Store) -> None:
    root = await insert(store)
    child = await insert(store, parent_run_id=root.id)
    grandchild = await insert(store, parent_run_id=child.id)
    assert (child.parent_run_id, child.root_run_id) == (root.id, root.id)
    assert (grandchild.parent_run_id, grandchild.root_run_id) == (child.id, root.id)
    assert (await get(store, grandchild.id)).root_run_id == root.id


async def test_missing_parent_raises_and_inserts_nothing(store: Store) -> None:
    with pytest.raises(RunNotFound) as info:
        await store.insert_runs([new(args={"ok": 1}), new(parent_run_id=987_654)])
    assert info.value.run_id == 987_654
    assert await store.list_runs(RunFilter()) == []


# -- deduplication ----------------------------------------------------------------------------------------------


async def test_dedup_conflict_raises_with_the_existing_run(store: Store) -> None:
    first = await insert(store, dedup_id="d1")
    with pytest.raises(RunConflict) as info:
        await insert(store, dedup_id="d1")
    assert info.value.existing_run_id == first.id
    assert info.value.dedup_id == "d1"
    assert [r.id for r in await store.list_runs(RunFilter())] == [first.id]


async def test_dedup_conflict_inserts_nothing_of_the_batch(store: Store) -> None:
    first = await insert(store, dedup_id="d1")
    with pytest.raises(RunConflict):
        await store.insert_runs([new(args={"a": 1}), new(dedup_id="d1"), new(args={"b": 2})])
    assert [r.id for r in await store.list_runs(RunFilter())] == [first.id]


async def test_dedup_return_existing_returns_it_in_position(store: Store) -> None:
    first = await insert(store, dedup_id="d1")
    runs = await store.insert_runs(
        [new(args={"a": 1}), new(dedup_id="d1"), new(dedup_id="d2")], on_conflict="return_existing"
    )
    assert runs[1] == first
    assert runs[0].id not in (first.id, runs[2].id)
    assert runs[2].dedup_id == "d2" and runs[2].id != first.id
    assert len(await store.list_runs(RunFilter())) == 3


async def test_dedup_ids_repeated_within_one_call_conflict(store: Store) -> None:
    with pytest.raises(RunConflict):
        await store.insert_runs([new(dedup_id="same"), new(dedup_id="same")])
    assert await store.list_runs(RunFilter()) == []
    a, b = await store.insert_runs(
        [new(dedup_id="same"), new(dedup_id="same")], on_conflict="return_existing"
    )
    assert a.id == b.id
    assert len(await store.list_runs(RunFilter())) == 1


async def test_dedup_id_is_free_again_once_the_run_is_terminal(store: Store) -> None:
    first = await insert(store, dedup_id="d1")
    await store.cancel_runs([first.id])
    second = await insert(store, dedup_id="d1")
    assert second.id != first.id
    claimed = await claim_one(store)
    assert claimed.id == second.id
    assert await finish(store, claimed)
    third = await insert(store, dedup_id="d1")
    assert third.id not in (first.id, second.id)


async def test_dedup_id_stays_held_while_running_retrying_or_scheduled(
    clocked_store: Store, clock: FakeClock
) -> None:
    store = clocked_store
    scheduled = await insert(store, dedup_id="s", not_before=clock() + 100)
    running = await insert(store, dedup_id="r")
    retrying = await insert(store, dedup_id="t")
    claimed = {
        r.id: r for r in await store.claim("w", queues=["default"], jobs=["j"], limit=10, lease_timeout=30)
    }
    assert set(claimed) == {running.id, retrying.id}
    assert await finish(store, claimed[retrying.id], "retrying", worker="w", retry_delay=50)
    assert (await get(store, retrying.id)).status is RunStatus.RETRYING
    for dedup_id, holder in (("s", scheduled), ("r", running), ("t", retrying)):
        with pytest.raises(RunConflict) as info:
            await insert(store, dedup_id=dedup_id)
        assert info.value.existing_run_id == holder.id


# -- listing ------------------------------------------------------------------------------------------------------


async def test_list_runs_filters(store: Store) -> None:
    a = await insert(store, "a", queue="q1", tags=("red", "big"), batch_id=None)
    b = await insert(store, "b", queue="q2", tags=("red",), schedule_id="nightly")
    c = await insert(store, "a", queue="q2", parent_run_id=a.id)
    await store.cancel_runs([b.id])

    async def ids(**kw: object) -> list[int]:
        return [r.id for r in await store.list_runs(RunFilter(**kw))]  # type: ignore[arg-type]

    assert await ids() == [c.id, b.id, a.id]
    assert await ids(job="a") == [c.id, a.id]
    assert await ids(queue="q2") == [c.id, b.id]
    assert await ids(status="cancelled") == [b.id]
    assert await ids(status=RunStatus.PENDING) == [c.id, a.id]
    assert await ids(status=(RunStatus.PENDING, RunStatus.CANCELLED)) == [c.id, b.id, a.id]
    assert await ids(tag="red") == [b.id, a.id]
    assert await ids(tag="big") == [a.id]
    assert await ids(tag="blue") == []
    assert await ids(parent_run_id=a.id) == [c.id]
    assert await ids(root_run_id=a.id) == [c.id, a.id]
    assert await ids(schedule_id="nightly") == [b.id]
    assert await ids(job="a", queue="q1") == [a.id]


async def test_list_runs_by_batch(store: Store) -> None:
    runs = await store.insert_runs([new(batch_id=7), new(batch_id=7), new(batch_id=8), new()])
    found = await store.list_runs(RunFilter(batch_id=7))
    assert [r.id for r in found] == [runs[1].id, runs[0].id]
    assert all(r.batch_id == 7 for r in found)


async def test_list_runs_created_range_is_exclusive(clocked_store: Store, clock: FakeClock) -> None:
    times = []
    runs = []
    for _ in range(4):
        times.append(clock())
        runs.append(await insert(clocked_store))
        clock.advance(10)

    def at(i: int) -> datetime:
        return datetime.fromtimestamp(times[i], UTC)

    after = await clocked_store.list_runs(RunFilter(created_after=at(1)))
    assert [r.id for r in after] == [runs[3].id, runs[2].id]
    before = await clocked_store.list_runs(RunFilter(created_before=at(2)))
    assert [r.id for r in before] == [runs[1].id, runs[0].id]
    between = await clocked_store.list_runs(RunFilter(created_after=at(0), created_before=at(3)))
    assert [r.id for r in between] == [runs[2].id, runs[1].id]


async def test_list_runs_keyset_pagination(store: Store) -> None:
    runs = await store.insert_runs([new(args={"i": i}) for i in range(7)])
    expected = [r.id for r in reversed(runs)]
    seen: list[int] = []
    before_id = None
    while True:
        page = await store.list_runs(RunFilter(), limit=3, before_id=before_id)
        if not page:
            break
        assert len(page) <= 3
        seen.extend(r.id for r in page)
        before_id = page[-1].id
    assert seen == expected
    assert [r.id for r in await store.list_runs(RunFilter(), limit=2)] == expected[:2]
