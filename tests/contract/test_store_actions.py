"""Store contract: user actions (cancel, retry), events, housekeeping, schema, catalogue and wake-ups."""

from __future__ import annotations

import pytest
from store_helpers import FakeClock, claim, claim_one, finish, get, insert, lease, new, status_changes

from runlane.errors import RunConflict, RunNotFound
from runlane.models import ErrorInfo, JobInfo, RunStatus
from runlane.store import EventDraft, Store
from runlane.store.notify import Topic

# -- cancel -------------------------------------------------------------------------------------------------------


async def test_cancel_cascades_over_the_tree(store: Store) -> None:
    root = await insert(store, "root")
    child = await insert(store, "kid", parent_run_id=root.id)
    grandchild = await insert(store, "kid", parent_run_id=child.id, not_before=store.now() + 3600)
    done_child = await insert(store, "kid", parent_run_id=root.id)
    bystander = await insert(store, "other")
    running_root = await claim_one(store, jobs=("root",))
    running_child = await claim_one(store, "w2", jobs=("kid",))
    assert running_child.id == child.id
    await store.cancel_runs([done_child.id])

    cancelled = await store.cancel_runs([root.id])

    assert sorted(cancelled) == sorted([root.id, child.id, grandchild.id])
    for run_id in cancelled:
        run = await get(store, run_id)
        assert run.status is RunStatus.CANCELLED
        assert run.error is not None and run.error.type == "Cancelled"
        assert run.finished_at is not None
    assert (await get(store, root.id)).error == ErrorInfo("Cancelled", "cancelled by user")
    assert (await get(store, bystander.id)).status is RunStatus.PENDING
    # Running attempts are marked cancelled and their fences fall.
    for run, worker in ((running_root, "w1"), (running_child, "w2")):
        (attempt,) = await store.attempts(run.id)
        assert attempt.status is RunStatus.CANCELLED
        assert attempt.error is not None and attempt.error.type == "Cancelled"
        assert await store.held_leases(worker, [lease(run)]) == set()
        assert await finish(store, run, worker=worker) is False
    assert await status_changes(store, grandchild.id) == [("scheduled", "cancelled")]
    (event,) = await store.events(grandchild.id)
    assert set(event.data) == {"from", "to", "attempt", "reason"}


async def test_cancel_cascades_through_a_terminal_middle_run(store: Store) -> None:
    root = await insert(store, "root")
    middle = await insert(store, "kid", parent_run_id=root.id)
    leaf = await insert(store, "leaf", parent_run_id=middle.id)
    assert await finish(store, await claim_one(store, jobs=("kid",)))
    assert sorted(await store.cancel_runs([root.id])) == sorted([root.id, leaf.id])
    assert (await get(store, middle.id)).status is RunStatus.SUCCEEDED
    assert (await get(store, leaf.id)).status is RunStatus.CANCELLED


async def test_cancel_of_terminal_or_missing_runs_does_nothing(store: Store) -> None:
    run = await insert(store)
    assert await store.cancel_runs([run.id]) == [run.id]
    assert await store.cancel_runs([run.id, 424242]) == []
    assert await status_changes(store, run.id) == [("pending", "cancelled")]


async def test_cancel_of_a_terminal_run_leaves_its_active_descendants_alone(store: Store) -> None:
    """Regression (T17 state machine): PostgreSQL seeded the cascade with terminal runs too, so cancelling a
    run that had already ended returned no id but cancelled its still-active children and continuations."""
    parent = await insert(store, "parent")
    child = await insert(store, "kid", parent_run_id=parent.id)
    assert await store.cancel_runs([child.id]) == [child.id]
    assert await store.retry_run(child.id)
    (after,) = await store.insert_runs([new("next", parent_run_id=parent.id, continue_when="finished")])
    assert sorted(await store.cancel_runs([parent.id])) == sorted([parent.id, child.id])
    assert (await get(store, after.id)).status is RunStatus.PENDING  # decided by the continuation rule
    assert await store.retry_run(child.id)
    assert await store.cancel_runs([parent.id]) == []
    assert (await get(store, child.id)).status is RunStatus.PENDING
    assert (await get(store, after.id)).status is RunStatus.PENDING


async def test_cancel_with_a_reason(store: Store) -> None:
    run = await insert(store)
    await store.cancel_runs([run.id], reason="no longer needed")
    assert (await get(store, run.id)).error == ErrorInfo("Cancelled", "no longer needed")


# -- retry --------------------------------------------------------------------------------------------------------


async def test_retry_run_brings_a_failed_run_back_with_one_more_attempt(store: Store) -> None:
    await insert(store, max_attempts=1)
    run = await claim_one(store)
    assert await finish(store, run, "failed", error=ErrorInfo("E", "x"))
    assert await store.retry_run(run.id) is True
    back = await get(store, run.id)
    assert back.status is RunStatus.PENDING
    assert back.attempt == 1
    assert back.finished_at is None
    again = await claim_one(store)
    assert (again.id, again.attempt) == (run.id, 2)
    assert await status_changes(store, run.id) == [
        ("pending", "running"),
        ("running", "failed"),
        ("failed", "pending"),
        ("pending", "running"),
    ]


async def test_retry_run_of_a_cancelled_run(store: Store) -> None:
    run = await insert(store)
    await store.cancel_runs([run.id])
    assert await store.retry_run(run.id) is True
    assert (await claim_one(store)).id == run.id


async def test_retry_run_refuses_other_states(store: Store) -> None:
    pending = await insert(store)
    assert await store.retry_run(pending.id) is False
    running = await claim_one(store)
    assert await store.retry_run(running.id) is False
    assert await finish(store, running)
    assert await store.retry_run(running.id) is False
    with pytest.raises(RunNotFound):
        await store.retry_run(987_654)


async def test_retry_run_conflicts_when_its_dedup_id_is_taken(store: Store) -> None:
    old = await insert(store, dedup_id="d")
    await store.cancel_runs([old.id])
    new_holder = await insert(store, dedup_id="d")
    with pytest.raises(RunConflict) as info:
        await store.retry_run(old.id)
    assert info.value.existing_run_id == new_holder.id
    assert (await get(store, old.id)).status is RunStatus.CANCELLED


# -- events -------------------------------------------------------------------------------------------------------


async def test_event_ids_are_per_run_from_one_and_replayable(store: Store) -> None:
    a, b = await store.insert_runs([new(), new()])
    assert await store.append_events([EventDraft(a.id, "input", {"n": i}) for i in range(3)]) == set()
    assert await store.append_events([EventDraft(b.id, "input", "x")]) == set()
    assert [e.id for e in await store.events(a.id)] == [1, 2, 3]
    assert [(e.id, e.run_id, e.data) for e in await store.events(b.id)] == [(1, b.id, "x")]
    assert [e.data for e in await store.events(a.id, since=1)] == [{"n": 1}, {"n": 2}]
    assert [e.id for e in await store.events(a.id, since=0, limit=2)] == [1, 2]
    assert await store.events(a.id, since=3) == []
    run = await claim_one(store)
    assert run.id == a.id
    status = (await store.events(a.id, since=3))[0]
    assert (status.id, status.kind) == (4, "status")
    assert status.at.tzinfo is not None


async def test_unfenced_events_are_refused_for_terminal_or_missing_runs(store: Store) -> None:
    live, dead = await store.insert_runs([new(), new()])
    await store.cancel_runs([dead.id])
    refused = await store.append_events(
        [EventDraft(live.id, "input", 1), EventDraft(dead.id, "input", 2), EventDraft(999_999, "input", 3)]
    )
    assert refused == {dead.id, 999_999}
    assert len(await store.events(live.id)) == 1


async def test_fenced_events_need_the_running_attempt_and_its_worker(store: Store) -> None:
    await insert(store)
    run = await claim_one(store, "w1")
    ok = EventDraft(run.id, "log", "hello", attempt=run.attempt)
    assert await store.append_events([ok], worker_id="w2") == {run.id}
    assert await store.append_events([ok]) == {run.id}
    assert await store.append_events(
        [EventDraft(run.id, "log", "x", attempt=run.attempt + 1)], worker_id="w1"
    ) == {run.id}
    assert await store.append_events([ok], worker_id="w1") == set()
    assert [e.kind for e in await store.events(run.id)] == ["status", "log"]


async def test_progress_event_sets_the_run_progress(store: Store) -> None:
    await insert(store)
    run = await claim_one(store)
    drafts = [
        EventDraft(run.id, "progress", {"percent": 10.0, "message": "start"}, attempt=1),
        EventDraft(run.id, "progress", {"percent": 55.5, "message": "half"}, attempt=1),
    ]
    assert await store.append_events(drafts, worker_id="w1") == set()
    current = await get(store, run.id)
    assert (current.progress, current.progress_message) == (55.5, "half")


async def test_event_time_defaults_to_the_store_clock(clocked_store: Store, clock: FakeClock) -> None:
    run = await insert(clocked_store)
    await clocked_store.append_events(
        [EventDraft(run.id, "input", 1), EventDraft(run.id, "input", 2, at=clock() - 5)]
    )
    first, second = await clocked_store.events(run.id)
    assert first.at.timestamp() == clock()
    assert second.at.timestamp() == clock() - 5


# -- housekeeping -------------------------------------------------------------------------------------------------


async def test_prune_deletes_old_terminal_runs_with_their_events(
    clocked_store: Store, clock: FakeClock
) -> None:
    store = clocked_store
    old_done = await insert(store)
    parent = await insert(store, "parent")
    old_child_live = await insert(store, parent_run_id=parent.id, not_before=clock() + 10_000)
    pending = await insert(store, "idle")
    run = await claim_one(store)
    assert run.id == old_done.id
    await store.append_events([EventDraft(run.id, "log", "x", attempt=1)], worker_id="w1")
    assert await finish(store, run)
    assert await finish(store, await claim_one(store, jobs=("parent",)))
    clock.advance(100)
    recent = await insert(store)
    await store.cancel_runs([recent.id])

    assert await store.prune(clock() - 50) == 1

    assert await store.get_run(old_done.id) is None
    assert await store.events(old_done.id) == []
    assert await store.attempts(old_done.id) == []
    assert await store.get_run(parent.id) is not None  # it has a live descendant
    assert await store.get_run(old_child_live.id) is not None
    assert await store.get_run(pending.id) is not None
    assert await store.get_run(recent.id) is not None
    assert await store.prune(clock() - 50) == 0


async def test_migrate_is_idempotent_and_schema_is_current(store: Store) -> None:
    assert await store.migrate() == []
    current, latest = await store.schema_version()
    assert current == latest >= 1
    await store.check_schema()


async def test_job_catalogue_upserts_by_name(store: Store) -> None:
    assert await store.get_job("emails.send") is None
    await store.register_jobs([JobInfo("emails.send", "mail", {"max_attempts": 3}, {"type": "object"})])
    await store.register_jobs([JobInfo("emails.send", "mail2", {"max_attempts": 5}, {"type": "object"})])
    assert await store.get_job("emails.send") == JobInfo(
        "emails.send", "mail2", {"max_attempts": 5}, {"type": "object"}
    )


async def test_workers_register_heartbeat_and_deregister(store: Store) -> None:
    await store.register_worker("w1", {"host": "h", "pid": 1, "queues": ["default"], "concurrency": 4})
    await store.register_worker("w1", {"host": "h", "pid": 1, "queues": ["default"], "concurrency": 8})
    assert store.heartbeat_blocking("w1", [], 30) == set()
    await store.deregister_worker("w1")
    await store.deregister_worker("w1")


# -- wake-ups -----------------------------------------------------------------------------------------------------


async def _signalled(store: Store, topic: Topic, since: int) -> bool:
    return await store.notifier.wait(topic, since, timeout=10)


async def test_notifier_wakes_work_change_and_cancel(store: Store) -> None:
    n = store.notifier
    work = n.generation("work")
    await insert(store)
    assert await _signalled(store, "work", work)

    change = n.generation("change")
    run = await claim_one(store)
    assert await _signalled(store, "change", change)

    work = n.generation("work")
    await store.release_runs([lease(run)], worker_id="w1")
    assert await _signalled(store, "work", work)

    run = await claim_one(store)
    cancel, change = n.generation("cancel"), n.generation("change")
    await store.cancel_runs([run.id])
    assert await _signalled(store, "cancel", cancel)
    assert await _signalled(store, "change", change)

    work = n.generation("work")
    await store.retry_run(run.id)
    assert await _signalled(store, "work", work)


async def test_notifier_wakes_work_when_a_retry_or_scheduled_run_becomes_due(
    clocked_store: Store, clock: FakeClock
) -> None:
    store = clocked_store
    await insert(store)
    run = await claim_one(store)
    await finish(store, run, "retrying", error=ErrorInfo("E", "x"), retry_delay=0)
    work = store.notifier.generation("work")
    assert len(await claim(store, "w2")) == 1  # promotes, then claims
    assert await _signalled(store, "work", work)
