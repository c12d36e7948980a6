"""Store contract: the worker verbs — claim, fencing, finish, heartbeat, release, reap, expire."""

from __future__ import annotations

import asyncio

import pytest
from store_helpers import LEASE, FakeClock, claim, claim_one, finish, get, insert, lease, new, status_changes

from runlane.models import ErrorInfo, RunStatus
from runlane.store import EventDraft, Finish, Lease, Store

# -- claim --------------------------------------------------------------------------------------------------------


async def test_claim_order_is_priority_then_due_time_then_id(clocked_store: Store, clock: FakeClock) -> None:
    store = clocked_store
    low = await insert(store, priority=0)
    high_late = await insert(store, priority=5, not_before=clock() - 1)
    high_early = await insert(store, priority=5, not_before=clock() - 10)
    low_2 = await insert(store, priority=0)
    high_same_due = await insert(store, priority=5, not_before=clock() - 10)
    claimed = await claim(store, limit=10)
    assert [r.id for r in claimed] == [high_early.id, high_same_due.id, high_late.id, low.id, low_2.id]


async def test_claim_respects_limit_and_never_claims_twice(store: Store) -> None:
    runs = await store.insert_runs([new() for _ in range(5)])
    first = await claim(store, "w1", limit=2)
    second = await claim(store, "w2", limit=10)
    assert [r.id for r in first] == [runs[0].id, runs[1].id]
    assert [r.id for r in second] == [r.id for r in runs[2:]]
    assert await claim(store, "w3") == []
    assert await claim(store, "w3", limit=0) == []


async def test_claim_only_given_jobs_and_queues(store: Store) -> None:
    a = await insert(store, "a", queue="q1")
    await insert(store, "b", queue="q1")
    c = await insert(store, "a", queue="q2", priority=1)
    await insert(store, "a", queue="q3")
    assert await claim(store, jobs=("a",), queues=()) == []
    assert await claim(store, jobs=(), queues=("q1",)) == []
    claimed = await claim(store, jobs=("a",), queues=("q1", "q2"))
    assert [r.id for r in claimed] == [c.id, a.id]


AWKWARD_NAMES = ('q "quoted"', "back\\slash", "comma,{brace}", "NULL", "", " spaced ", "ünïcödé")


async def test_claim_heartbeat_and_finish_with_awkward_queue_and_job_names(store: Store) -> None:
    # The PostgreSQL store passes queue, job and id lists as array literals: every name must survive quoting.
    runs = [await insert(store, name, queue=name) for name in AWKWARD_NAMES]
    await insert(store, "plain", queue="default")
    claimed = await claim(store, jobs=AWKWARD_NAMES, queues=AWKWARD_NAMES, limit=20)
    assert sorted(r.id for r in claimed) == [r.id for r in runs]
    assert {(r.job, r.queue) for r in claimed} == {(n, n) for n in AWKWARD_NAMES}
    leases = [lease(r) for r in claimed]
    assert await store.held_leases("w1", leases) == {r.id for r in runs}
    assert await asyncio.to_thread(store.heartbeat_blocking, "w1", leases, LEASE) == {r.id for r in runs}
    done = await store.finish_attempts(
        [Finish(r.id, r.attempt, "succeeded") for r in claimed], worker_id="w1"
    )
    assert done == [True] * len(claimed)


async def test_claim_makes_the_run_running_with_an_attempt(clocked_store: Store, clock: FakeClock) -> None:
    run = await insert(clocked_store)
    clock.advance(5)
    claimed = await claim_one(clocked_store, "w1")
    assert claimed.id == run.id
    assert claimed.status is RunStatus.RUNNING
    assert claimed.attempt == 1
    assert claimed.worker_id == "w1"
    assert claimed.started_at is not None and claimed.started_at.timestamp() == clock()
    assert await get(clocked_store, run.id) == claimed
    (attempt,) = await clocked_store.attempts(run.id)
    assert (attempt.number, attempt.worker_id, attempt.status) == (1, "w1", RunStatus.RUNNING)
    assert attempt.started_at.timestamp() == clock() and attempt.finished_at is None
    (event,) = await clocked_store.events(run.id)
    assert event.kind == "status"
    assert event.data == {"from": "pending", "to": "running", "attempt": 1, "reason": None}


async def test_claim_never_before_due_and_promotes_scheduled_runs(
    clocked_store: Store, clock: FakeClock
) -> None:
    store = clocked_store
    run = await insert(store, not_before=clock() + 60)
    assert await claim(store) == []
    assert await store.next_due_at(queues=["default"], jobs=["j"]) == clock() + 60
    clock.advance(59.5)
    assert await claim(store) == []
    clock.advance(1)
    claimed = await claim_one(store)
    assert claimed.id == run.id
    assert await status_changes(store, run.id) == [("scheduled", "pending"), ("pending", "running")]
    assert await store.next_due_at(queues=["default"], jobs=["j"]) is None


async def test_claim_never_after_not_after(clocked_store: Store, clock: FakeClock) -> None:
    store = clocked_store
    await insert(store, not_after=clock() + 10)
    clock.advance(10)
    assert await claim(store) == []


async def test_next_due_at_only_for_given_jobs_and_queues(clocked_store: Store, clock: FakeClock) -> None:
    store = clocked_store
    await insert(store, "a", not_before=clock() + 30)
    await insert(store, "b", not_before=clock() + 10)
    await insert(store, "a", queue="other", not_before=clock() + 5)
    assert await store.next_due_at(queues=["default"], jobs=["a"]) == clock() + 30
    assert await store.next_due_at(queues=["default"], jobs=["a", "b"]) == clock() + 10
    assert await store.next_due_at(queues=["default", "other"], jobs=["a"]) == clock() + 5
    assert await store.next_due_at(queues=["nothing"], jobs=["a"]) is None


# -- finishing and fencing ------------------------------------------------------------------------------------------


async def test_finish_succeeded_stores_the_result(clocked_store: Store, clock: FakeClock) -> None:
    await insert(clocked_store)
    run = await claim_one(clocked_store)
    clock.advance(2)
    assert await finish(clocked_store, run, result={"answer": 42})
    done = await get(clocked_store, run.id)
    assert done.status is RunStatus.SUCCEEDED
    assert done.result == {"answer": 42}
    assert done.finished_at is not None and done.finished_at.timestamp() == clock()
    assert done.error is None
    (attempt,) = await clocked_store.attempts(run.id)
    assert attempt.status is RunStatus.SUCCEEDED and attempt.finished_at == done.finished_at
    assert await status_changes(clocked_store, run.id) == [("pending", "running"), ("running", "succeeded")]


async def test_finish_failed_ends_the_run_with_its_error(store: Store) -> None:
    await insert(store)
    run = await claim_one(store)
    error = ErrorInfo("ValueError", "boom", "Traceback…")
    assert await finish(store, run, "failed", error=error)
    done = await get(store, run.id)
    assert done.status is RunStatus.FAILED
    assert done.error == error
    assert done.finished_at is not None
    (attempt,) = await store.attempts(run.id)
    assert attempt.status is RunStatus.FAILED and attempt.error == error


async def test_finish_retrying_makes_the_run_due_after_the_delay(
    clocked_store: Store, clock: FakeClock
) -> None:
    store = clocked_store
    await insert(store)
    run = await claim_one(store)
    error = ErrorInfo("IOError", "flaky")
    assert await finish(store, run, "retrying", error=error, retry_delay=30)
    waiting = await get(store, run.id)
    assert waiting.status is RunStatus.RETRYING
    assert waiting.finished_at is None
    (attempt,) = await store.attempts(run.id)
    assert attempt.status is RunStatus.FAILED and attempt.error == error
    assert await store.next_due_at(queues=["default"], jobs=["j"]) == clock() + 30
    clock.advance(29)
    assert await claim(store) == []
    clock.advance(1)
    again = await claim_one(store, "w2")
    assert (again.id, again.attempt, again.worker_id) == (run.id, 2, "w2")
    assert [a.number for a in await store.attempts(run.id)] == [1, 2]
    assert await status_changes(store, run.id) == [
        ("pending", "running"),
        ("running", "retrying"),
        ("retrying", "pending"),
        ("pending", "running"),
    ]


async def test_finish_is_fenced_by_attempt_and_worker(store: Store) -> None:
    await insert(store)
    run = await claim_one(store, "w1")
    wrong_attempt = Finish(run.id, run.attempt + 1, "succeeded")
    right = Finish(run.id, run.attempt, "succeeded", result=1)
    assert await store.finish_attempts([wrong_attempt], worker_id="w1") == [False]
    assert await store.finish_attempts([right], worker_id="w2") == [False]
    assert (await get(store, run.id)).status is RunStatus.RUNNING
    assert await store.finish_attempts([right, right], worker_id="w1") == [True, False]
    assert (await get(store, run.id)).result == 1


async def test_finish_batch_applies_each_under_its_own_fence(store: Store) -> None:
    await store.insert_runs([new(), new(), new()])
    a, b, c = await claim(store, "w1")
    results = await store.finish_attempts(
        [
            Finish(a.id, a.attempt, "succeeded", result="a"),
            Finish(
                b.id, b.attempt + 5, "succeeded", events=(EventDraft(b.id, "log", "lost", attempt=b.attempt),)
            ),
            Finish(c.id, c.attempt, "failed", error=ErrorInfo("E", "c")),
        ],
        worker_id="w1",
    )
    assert results == [True, False, True]
    assert (await get(store, b.id)).status is RunStatus.RUNNING
    assert [e.kind for e in await store.events(b.id)] == ["status"]


async def test_finish_writes_buffered_events_before_the_status_event(store: Store) -> None:
    await insert(store)
    run = await claim_one(store)
    drafts = (
        EventDraft(run.id, "output", {"item": 1}, attempt=run.attempt),
        EventDraft(run.id, "progress", {"percent": 100.0, "message": "done"}, attempt=run.attempt),
    )
    assert await finish(store, run, events=drafts)
    events = await store.events(run.id)
    assert [(e.id, e.kind) for e in events] == [(1, "status"), (2, "output"), (3, "progress"), (4, "status")]
    assert events[1].data == {"item": 1}
    done = await get(store, run.id)
    assert (done.progress, done.progress_message) == (100.0, "done")


async def test_a_stale_attempt_cannot_finish_or_append(clocked_store: Store, clock: FakeClock) -> None:
    store = clocked_store
    await insert(store)
    stale = await claim_one(store, "w1", lease_timeout=10)
    clock.advance(11)
    assert await store.reap_expired_leases() == [stale.id]
    fresh = await claim_one(store, "w2")
    assert fresh.attempt == 2
    refused = await store.append_events([EventDraft(stale.id, "log", "late", attempt=1)], worker_id="w1")
    assert refused == {stale.id}
    assert await finish(store, stale, worker="w1") is False
    assert await store.append_events([EventDraft(fresh.id, "log", "ok", attempt=2)], worker_id="w2") == set()
    assert await finish(store, fresh, worker="w2")


async def test_an_expired_lease_fences_before_the_reaper_comes(
    clocked_store: Store, clock: FakeClock
) -> None:
    """Regression (T08 store_outage_longer_than_lease): statements a worker sent before it lost the store
    reached the server after the heal, renewed leases that had expired but were not reaped yet, and
    committed results of attempts that their worker had already given up."""
    store = clocked_store
    await insert(store)
    stale = await claim_one(store, "w1", lease_timeout=10)
    clock.advance(10.5)  # expired; no reaper has run
    assert store.heartbeat_blocking("w1", [lease(stale)], 10) == set()
    assert await store.held_leases("w1", [lease(stale)]) == set()
    refused = await store.append_events([EventDraft(stale.id, "log", "late", attempt=1)], worker_id="w1")
    assert refused == {stale.id}
    assert await finish(store, stale, worker="w1") is False
    assert (await get(store, stale.id)).status is RunStatus.RUNNING
    assert await store.reap_expired_leases() == [stale.id]
    fresh = await claim_one(store, "w2")
    assert fresh.attempt == 2 and await finish(store, fresh, worker="w2")


# -- heartbeat, held leases, release ----------------------------------------------------------------------------------


async def test_heartbeat_returns_only_the_leases_still_held(clocked_store: Store, clock: FakeClock) -> None:
    store = clocked_store
    await store.insert_runs([new(), new(), new()])
    a, b, c = await claim(store, "w1", lease_timeout=10)
    await store.cancel_runs([b.id])
    held = store.heartbeat_blocking("w1", [lease(a), lease(b), Lease(c.id, c.attempt + 1)], 10)
    assert held == {a.id}
    assert store.heartbeat_blocking("w2", [lease(a)], 10) == set()
    assert await store.held_leases("w1", [lease(a), lease(b), lease(c)]) == {a.id, c.id}
    assert await store.held_leases("w2", [lease(a)]) == set()
    # The heartbeat extended a's lease from now; c's lease was not extended.
    clock.advance(9)
    assert store.heartbeat_blocking("w1", [lease(a)], 10) == {a.id}
    clock.advance(9)
    assert await store.reap_expired_leases() == [c.id]
    assert (await get(store, a.id)).status is RunStatus.RUNNING


async def test_heartbeat_works_from_a_plain_thread(store: Store) -> None:
    import asyncio

    await insert(store)
    run = await claim_one(store)
    held = await asyncio.to_thread(store.heartbeat_blocking, "w1", [lease(run)], LEASE)
    assert held == {run.id}


async def test_release_gives_the_run_back_without_using_an_attempt(store: Store) -> None:
    await store.insert_runs([new(), new()])
    a, b = await claim(store, "w1")
    assert await store.release_runs([lease(a), Lease(b.id, b.attempt + 1)], worker_id="w1") == [a.id]
    assert await store.release_runs([lease(b)], worker_id="w2") == []
    released = await get(store, a.id)
    assert released.status is RunStatus.PENDING
    assert released.attempt == 0
    assert await store.attempts(a.id) == []
    assert await store.held_leases("w1", [lease(a)]) == set()
    assert await status_changes(store, a.id) == [("pending", "running"), ("running", "pending")]
    again = await claim_one(store, "w2")
    assert (again.id, again.attempt) == (a.id, 1)
    assert [x.worker_id for x in await store.attempts(a.id)] == ["w2"]


async def test_progress_belongs_to_the_attempt_that_reported_it(store: Store) -> None:
    await store.insert_runs([new(max_attempts=3)])
    run = await claim_one(store, "w1")
    progress = EventDraft(run.id, "progress", {"percent": 80.0, "message": "step 8"}, attempt=run.attempt)
    assert await store.append_events([progress], worker_id="w1") == set()
    assert (await get(store, run.id)).progress == 80.0
    assert await store.release_runs([lease(run)], worker_id="w1") == [run.id]
    released = await get(store, run.id)
    assert (released.progress, released.progress_message) == (None, None)  # a pending run shows no stale 80 %
    again = await claim_one(store, "w2")
    again_progress = EventDraft(
        again.id, "progress", {"percent": 30.0, "message": "step 3"}, attempt=again.attempt
    )
    assert await store.append_events([again_progress], worker_id="w2") == set()
    assert await finish(store, again, "retrying", worker="w2", error=ErrorInfo("E", "x")) is True
    third = await claim_one(store, "w3")
    assert (third.progress, third.progress_message) == (None, None)  # a new attempt starts from nothing
    assert (await get(store, third.id)).progress is None


# -- reaping and expiry -----------------------------------------------------------------------------------------------


async def test_reap_expired_lease_requeues_with_worker_lost(clocked_store: Store, clock: FakeClock) -> None:
    store = clocked_store
    await insert(store, max_attempts=2)
    run = await claim_one(store, "w-dead", lease_timeout=10)
    clock.advance(9)
    assert await store.reap_expired_leases() == []
    clock.advance(2)
    assert await store.reap_expired_leases() == [run.id]
    assert await store.reap_expired_leases() == []
    requeued = await get(store, run.id)
    assert requeued.status is RunStatus.PENDING
    assert requeued.attempt == 1
    (attempt,) = await store.attempts(run.id)
    assert attempt.status is RunStatus.FAILED
    assert attempt.error is not None and attempt.error.type == "WorkerLost"
    assert "w-dead" in attempt.error.message
    assert await store.held_leases("w-dead", [lease(run)]) == set()
    # The last attempt lost too: the run fails.
    second = await claim_one(store, "w-dead-too", lease_timeout=10)
    assert second.attempt == 2
    clock.advance(11)
    assert await store.reap_expired_leases() == [run.id]
    failed = await get(store, run.id)
    assert failed.status is RunStatus.FAILED
    assert failed.error is not None and failed.error.type == "WorkerLost"
    assert failed.finished_at is not None
    assert await status_changes(store, run.id) == [
        ("pending", "running"),
        ("running", "pending"),
        ("pending", "running"),
        ("running", "failed"),
    ]


async def test_expire_runs_cancels_runs_not_started_in_time(clocked_store: Store, clock: FakeClock) -> None:
    store = clocked_store
    waiting = await insert(store, not_after=clock() + 10)
    scheduled = await insert(store, not_before=clock() + 5, not_after=clock() + 10)
    started = await insert(store, not_after=clock() + 10, priority=9)
    keeps = await insert(store, not_after=clock() + 100)
    assert (await claim_one(store)).id == started.id
    assert await store.expire_runs() == []
    clock.advance(10)
    assert sorted(await store.expire_runs()) == sorted([waiting.id, scheduled.id])
    for run_id in (waiting.id, scheduled.id):
        expired = await get(store, run_id)
        assert expired.status is RunStatus.CANCELLED
        assert expired.error is not None and expired.error.type == "Expired"
    assert (await get(store, started.id)).status is RunStatus.RUNNING
    assert (await get(store, keeps.id)).status is RunStatus.PENDING


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
async def test_terminal_runs_are_not_reaped_or_expired(
    clocked_store: Store, clock: FakeClock, outcome: str
) -> None:
    await insert(clocked_store, not_after=clock() + 20)
    run = await claim_one(clocked_store, lease_timeout=10)
    assert await finish(
        clocked_store, run, outcome, error=ErrorInfo("E", "x") if outcome == "failed" else None
    )
    clock.advance(100)
    assert await clocked_store.reap_expired_leases() == []
    assert await clocked_store.expire_runs() == []
    assert (await get(clocked_store, run.id)).status == outcome


# -- finish and claim in one call ----------------------------------------------------------------------------------


async def test_finish_and_claim_finishes_then_claims(clocked_store: Store, clock: FakeClock) -> None:
    store = clocked_store
    a, b = await store.insert_runs([new(), new()])
    ca = await claim_one(store, "w1")
    c = await insert(store, continue_when="succeeded", parent_run_id=a.id)
    retry = Finish(ca.id, ca.attempt, "succeeded", result={"x": 1})
    stale = Finish(b.id, 7, "succeeded")  # b is not this worker's: fenced off
    done, runs = await store.finish_and_claim(
        [retry, stale], worker_id="w1", queues=("default",), jobs=("j",), limit=5, lease_timeout=LEASE
    )
    assert done == [True, False]
    # b was pending; c became pending through the finish of its parent, in the same call
    assert [r.id for r in runs] == [b.id, c.id]
    assert all(r.status is RunStatus.RUNNING and r.worker_id == "w1" for r in runs)
    finished = await get(store, ca.id)
    assert finished.status is RunStatus.SUCCEEDED and finished.result == {"x": 1}
    assert await status_changes(store, ca.id) == [("pending", "running"), ("running", "succeeded")]
    assert await status_changes(store, c.id) == [("scheduled", "pending"), ("pending", "running")]
    (attempt,) = await store.attempts(ca.id)
    assert attempt.status is RunStatus.SUCCEEDED


async def test_finish_and_claim_with_nothing_to_finish_or_claim(store: Store) -> None:
    run = await insert(store)
    assert await store.finish_and_claim(
        [], worker_id="w1", queues=("default",), jobs=("j",), limit=0, lease_timeout=LEASE
    ) == ([], [])
    claimed = await claim_one(store, "w1")
    done, runs = await store.finish_and_claim(
        [Finish(claimed.id, claimed.attempt, "failed", error=ErrorInfo("E", "boom"))],
        worker_id="w1",
        queues=("default",),
        jobs=("j",),
        limit=3,
        lease_timeout=LEASE,
    )
    assert (done, runs) == ([True], [])
    assert (await get(store, run.id)).status is RunStatus.FAILED


async def test_finish_and_claim_claims_a_retry_due_at_once(store: Store) -> None:
    run = await insert(store, max_attempts=3)
    claimed = await claim_one(store, "w1")
    done, runs = await store.finish_and_claim(
        [Finish(claimed.id, claimed.attempt, "retrying", error=ErrorInfo("E", "again"), retry_delay=0.0)],
        worker_id="w1",
        queues=("default",),
        jobs=("j",),
        limit=1,
        lease_timeout=LEASE,
    )
    assert done == [True]
    assert [(r.id, r.attempt) for r in runs] == [(run.id, 2)]
