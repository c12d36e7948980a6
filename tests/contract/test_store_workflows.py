"""Store contract: batches and their counters, continuations, cascades that meet continuations, races."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from store_helpers import FakeClock, claim, claim_one, finish, get, insert, lease, new

from runlane.errors import RunNotFound
from runlane.models import Batch, Run, RunFilter, RunStatus
from runlane.store import Finish, Store

TERMINAL = ("succeeded", "failed", "cancelled")


async def recount(store: Store, batch_id: int) -> dict[RunStatus, int]:
    """The children's statuses counted the slow way, to compare with the counters."""
    counts = dict.fromkeys(RunStatus, 0)
    for run in await store.list_runs(RunFilter(batch_id=batch_id), limit=100_000):
        counts[run.status] += 1
    return counts


async def batch(store: Store, batch_id: int) -> Batch:
    found = await store.get_batch(batch_id)
    assert found is not None
    return found


async def assert_counters_match(store: Store, batch_id: int) -> Batch:
    b = await batch(store, batch_id)
    assert b.counts == await recount(store, batch_id)
    assert b.total == sum(b.counts.values())
    return b


# -- batches ------------------------------------------------------------------------------------------------------


async def test_insert_batch_creates_children_in_order_under_one_batch(store: Store) -> None:
    parent = await insert(store, "parent")
    created, children = await store.insert_batch(
        [new("kid", {"i": i}) for i in range(5)], parent_run_id=parent.id
    )
    assert [c.args["i"] for c in children] == list(range(5))
    assert [c.id for c in children] == sorted(c.id for c in children)
    assert {(c.batch_id, c.parent_run_id, c.root_run_id) for c in children} == {
        (created.id, parent.id, parent.id)
    }
    assert created.parent_run_id == parent.id
    assert (created.total, created.counts[RunStatus.PENDING], created.finish_seq) == (5, 5, 0)
    assert created.status is RunStatus.PENDING and not created.is_finished
    assert await store.get_batch(created.id) == created
    assert await store.get_batch(created.id + 1000) is None
    listed = await store.list_runs(RunFilter(batch_id=created.id))
    assert sorted(r.id for r in listed) == [c.id for c in children]
    with pytest.raises(RunNotFound):
        await store.insert_batch([new("kid")], parent_run_id=987654)


async def test_empty_batch(store: Store) -> None:
    created, children = await store.insert_batch([])
    assert children == [] and created.total == 0 and created.is_finished


async def test_batch_counters_follow_every_verb(clocked_store: Store, clock: FakeClock) -> None:
    store = clocked_store
    created, children = await store.insert_batch(
        [
            new("j"),
            new("j"),
            new("j"),
            new("j"),
            new("j", not_before=clock() + 60),
            new("j", not_after=clock() + 5),
        ]
    )
    await assert_counters_match(store, created.id)
    a, b, c, d = await claim(store, limit=4)  # claim: pending -> running
    assert (await assert_counters_match(store, created.id)).counts[RunStatus.RUNNING] == 4
    assert await finish(store, a, "succeeded", result=1)
    assert await finish(store, b, "retrying", retry_delay=1)
    assert await finish(store, c, "failed")
    await assert_counters_match(store, created.id)
    assert await store.release_runs([lease(d)], worker_id="w1") == [d.id]
    await assert_counters_match(store, created.id)
    assert await store.retry_run(c.id)  # failed -> pending
    clock.advance(10)
    assert await store.expire_runs()  # the not_after child
    await claim(store, limit=10)  # promotes the retrying one, claims what is due
    await assert_counters_match(store, created.id)
    clock.advance(100)
    assert sorted(await store.reap_expired_leases())  # every lease expired: requeued or failed
    await assert_counters_match(store, created.id)
    await store.cancel_runs([child.id for child in children])
    final = await assert_counters_match(store, created.id)
    assert final.is_finished and final.finished == 6
    # every terminal transition was numbered: a, c (then retried), the expired one, then the cancels
    assert final.finish_seq >= 6


async def test_batch_runs_returns_finished_children_in_finish_order(store: Store) -> None:
    created, _ = await store.insert_batch([new("j") for _ in range(4)])
    first, second, third, fourth = await claim(store, limit=4)
    for run in (third, first):
        assert await finish(store, run)
    b = await batch(store, created.id)
    assert b.finish_seq == 2
    assert [(seq, r.id) for seq, r in await store.batch_runs(created.id)] == [(1, third.id), (2, first.id)]
    assert [r.id for _, r in await store.batch_runs(created.id, after_seq=1)] == [first.id]
    assert await store.batch_runs(created.id, after_seq=0, up_to_seq=0) == []
    assert await finish(store, second, "failed")
    await store.retry_run(
        second.id
    )  # ended, then retried: it comes back with a new number when it ends again
    rows = await store.batch_runs(created.id)  # numbered 3 when it failed, pending now
    assert [(r.id, r.status) for _, r in rows] == [
        (third.id, RunStatus.SUCCEEDED),
        (first.id, RunStatus.SUCCEEDED),
        (second.id, RunStatus.PENDING),
    ]
    await store.cancel_runs([second.id, fourth.id])
    rows = await store.batch_runs(created.id, after_seq=2)
    assert sorted(r.id for _, r in rows) == sorted([second.id, fourth.id])
    assert [seq for seq, _ in rows] == [4, 5]


async def test_cancel_batch_cancels_only_unfinished_children(store: Store) -> None:
    created, children = await store.insert_batch([new("j") for _ in range(3)])
    grandchild = await insert(store, "j", parent_run_id=children[2].id)
    done = await claim_one(store)
    assert await finish(store, done)
    assert await store.cancel_batch(created.id) == 2
    assert (await get(store, grandchild.id)).status is RunStatus.CANCELLED
    assert (await assert_counters_match(store, created.id)).is_finished
    assert await store.cancel_batch(created.id) == 0


# -- continuations --------------------------------------------------------------------------------------------------


async def continuation(store: Store, parent: Run, when: str, **options: Any) -> Run:
    (run,) = await store.insert_runs([new("next", parent_run_id=parent.id, continue_when=when, **options)])
    return run


async def end(store: Store, run: Run, outcome: str) -> None:
    if outcome == "cancelled":
        assert run.id in await store.cancel_runs([run.id])
        return
    claimed = await claim_one(store, jobs=(run.job,))
    assert claimed.id == run.id
    assert await finish(store, claimed, outcome, result=1)


@pytest.mark.parametrize("outcome", TERMINAL)
@pytest.mark.parametrize("when", ["succeeded", "failed", "cancelled", "finished"])
async def test_continuation_matrix(store: Store, when: str, outcome: str) -> None:
    parent = await insert(store, "parent")
    waiting = await continuation(store, parent, when)
    assert (waiting.status, waiting.parent_run_id, waiting.root_run_id) == (
        RunStatus.SCHEDULED,
        parent.id,
        parent.id,
    )
    assert await store.next_due_at(queues=["default"], jobs=["next"]) is None
    assert await claim(store, jobs=("next",)) == []  # never claimed while it waits
    await end(store, parent, outcome)
    decided = await get(store, waiting.id)
    if when in (outcome, "finished"):
        assert decided.status is RunStatus.PENDING
        assert [r.id for r in await claim(store, jobs=("next",))] == [waiting.id]
    else:
        assert decided.status is RunStatus.CANCELLED
        assert decided.error is not None and decided.error.type == "Cancelled"
        assert f"parent run {parent.id} {outcome}" in decided.error.message
    # decided at once when the parent has already ended
    late = await continuation(store, parent, when)
    assert late.status is decided.status


async def test_continuation_waits_while_the_parent_retries(clocked_store: Store, clock: FakeClock) -> None:
    store = clocked_store
    parent = await insert(store, "parent", max_attempts=2)
    on_success = await continuation(store, parent, "succeeded")
    on_failure = await continuation(store, parent, "failed")
    attempt = await claim_one(store, jobs=("parent",))
    assert await finish(store, attempt, "retrying", retry_delay=5)
    clock.advance(1)
    await claim(store, jobs=("parent",))  # not yet due
    assert (await get(store, on_success.id)).status is RunStatus.SCHEDULED
    assert (await get(store, on_failure.id)).status is RunStatus.SCHEDULED
    clock.advance(10)
    attempt = await claim_one(store, jobs=("parent",))
    assert await finish(store, attempt, "failed")
    assert (await get(store, on_success.id)).status is RunStatus.CANCELLED
    assert (await get(store, on_failure.id)).status is RunStatus.PENDING
    # Retrying the parent does not re-decide its continuations: they were decided when it ended.
    assert await store.retry_run(parent.id)
    attempt = await claim_one(store, jobs=("parent",))
    assert await finish(store, attempt, "succeeded")
    assert (await get(store, on_success.id)).status is RunStatus.CANCELLED


async def test_continuation_with_not_before_waits_for_it_after_its_parent(
    clocked_store: Store, clock: FakeClock
) -> None:
    store = clocked_store
    parent = await insert(store, "parent")
    later = await continuation(store, parent, "succeeded", not_before=clock() + 60)
    await end(store, parent, "succeeded")
    assert (await get(store, later.id)).status is RunStatus.SCHEDULED
    assert await store.next_due_at(queues=["default"], jobs=["next"]) == pytest.approx(clock() + 60)
    clock.advance(61)
    assert [r.id for r in await claim(store, jobs=("next",))] == [later.id]


async def test_continuation_chains_are_decided_in_one_transaction(store: Store) -> None:
    parent = await insert(store, "parent")
    first = await continuation(store, parent, "succeeded")
    second = await continuation(store, first, "cancelled")  # runs if `first` is cancelled
    third = await continuation(store, first, "succeeded")
    fourth = await continuation(store, second, "succeeded")
    await end(store, parent, "failed")
    assert (await get(store, first.id)).status is RunStatus.CANCELLED
    assert (await get(store, second.id)).status is RunStatus.PENDING
    assert (await get(store, third.id)).status is RunStatus.CANCELLED
    assert (await get(store, fourth.id)).status is RunStatus.SCHEDULED  # waits for `second`
    await end(store, await get(store, second.id), "succeeded")
    assert (await get(store, fourth.id)).status is RunStatus.PENDING


async def test_reaped_and_expired_parents_decide_their_continuations(
    clocked_store: Store, clock: FakeClock
) -> None:
    store = clocked_store
    lost = await insert(store, "parent", max_attempts=1)
    late = await insert(store, "parent", not_before=clock() + 10, not_after=clock() + 20)
    after_lost = await continuation(store, lost, "failed")
    after_late = await continuation(store, late, "cancelled")
    await claim_one(store, jobs=("parent",), lease_timeout=5)
    clock.advance(30)
    assert await store.reap_expired_leases() == [lost.id]
    assert (await get(store, after_lost.id)).status is RunStatus.PENDING
    assert await store.expire_runs() == [late.id]
    assert (await get(store, after_late.id)).status is RunStatus.PENDING


async def test_cancel_cascade_lets_the_continuation_rule_decide(store: Store) -> None:
    root = await insert(store, "parent")
    child = await insert(store, "kid", parent_run_id=root.id)
    on_cancel = await continuation(store, root, "cancelled")
    on_success = await continuation(store, root, "succeeded")
    chained = await continuation(store, on_cancel, "finished")
    cancelled = await store.cancel_runs([root.id])
    assert sorted(cancelled) == sorted([root.id, child.id, on_success.id])
    error = (await get(store, child.id)).error
    assert error is not None and "cascade" in error.message and f"run {root.id}" in error.message
    assert (await get(store, on_cancel.id)).status is RunStatus.PENDING
    assert (await get(store, on_success.id)).status is RunStatus.CANCELLED
    assert (await get(store, chained.id)).status is RunStatus.SCHEDULED
    # A waiting continuation cancelled directly is cancelled, and its own continuations follow the rule.
    await store.cancel_runs([on_cancel.id])
    assert (await get(store, chained.id)).status is RunStatus.PENDING


async def test_an_explicitly_cancelled_continuation_is_cancelled(store: Store) -> None:
    parent = await insert(store, "parent")
    waiting = await continuation(store, parent, "finished")
    assert await store.cancel_runs([waiting.id]) == [waiting.id]
    await end(store, parent, "succeeded")
    assert (await get(store, waiting.id)).status is RunStatus.CANCELLED


# -- races ---------------------------------------------------------------------------------------------------------


async def test_cascade_racing_with_completing_children(store_url: str) -> None:
    """A cancel of the root while workers finish its children: each child ends exactly once, either finished
    by its worker (whose write then counts) or cancelled (whose worker's finish is fenced off), and the batch
    counters agree with the children."""
    from runlane.store import create_store

    stores = [create_store(store_url) for _ in range(3)]
    for s in stores:
        await s.open()
    await stores[0].migrate()
    try:
        main = stores[0]
        root = await insert(main, "root")
        created, _ = await main.insert_batch([new("kid") for _ in range(60)], parent_run_id=root.id)
        workers = [(stores[1], "w1"), (stores[2], "w2")]
        claims = [await claim(s, w, jobs=("kid",), limit=30) for s, w in workers]

        async def finish_all(s: Store, worker: str, runs: list[Run]) -> list[bool]:
            done: list[bool] = []
            for start in range(0, len(runs), 5):
                chunk = runs[start : start + 5]
                done += await s.finish_attempts(
                    [Finish(r.id, r.attempt, "succeeded", result=r.id) for r in chunk], worker_id=worker
                )
            return done

        results = await asyncio.gather(
            finish_all(stores[1], "w1", claims[0]),
            main.cancel_runs([root.id]),
            finish_all(stores[2], "w2", claims[1]),
        )
        finished = {
            r.id
            for runs, done in zip(claims, (results[0], results[2]), strict=True)
            for r, ok in zip(runs, done, strict=True)
            if ok
        }
        cancelled = set(results[1]) - {root.id}
        assert not finished & cancelled
        assert finished | cancelled == {r.id for runs in claims for r in runs}
        for run_id in finished:
            assert (await get(main, run_id)).status is RunStatus.SUCCEEDED
        for run_id in cancelled:
            assert (await get(main, run_id)).status is RunStatus.CANCELLED
        b = await assert_counters_match(main, created.id)
        assert b.is_finished
        assert b.counts[RunStatus.SUCCEEDED] == len(finished)
        assert b.finish_seq == 60
    finally:
        for s in stores:
            await s.close()
