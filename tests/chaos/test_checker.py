"""The checker's own rules, on hand-made records (no processes)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from harness.checker import StoreState, _stopped_between, check
from harness.faults import Fault
from harness.ledger import Execution

from runlane.models import Attempt, ErrorInfo, Run, RunStatus


def test_limits_under_chaos_a_zombie_paused_again_is_not_executing_while_stopped() -> None:
    """T19 (full tier): a worker resumed from one pause was paused again (and again) before it noticed its lost
    lease; the zombie tail counted those pauses as execution (50 s against a 2 s bound)."""
    faults = [
        Fault("pause", 7, 10.0, 20.0),  # the pause the zombie tail starts after
        Fault("pause", 7, 21.0, 31.0),
        Fault("pause", 7, 25.0, 35.0),  # overlapping records of the same stop count once
        Fault("pause", 8, 22.0, 40.0),  # another process
        Fault("kill", 7, 50.0),
        Fault("pause", 7, 60.0),  # still paused when the execution ended
    ]
    assert _stopped_between(7, 20.0, 36.0, faults) == 14.0
    assert _stopped_between(7, 20.0, 21.0, faults) == 0.0
    assert _stopped_between(7, 20.0, 62.0, faults) == 14.0 + 2.0


AT = datetime.fromtimestamp(100.0, UTC)


def _two_solo_runs() -> dict[int, Run]:
    """Runs 1 and 2 of a job ``solo`` (the store's side of the overlap tests below)."""
    run = Run(
        id=1, job="solo", args={}, status=RunStatus.SUCCEEDED, queue="default", priority=0, attempt=1,
        max_attempts=3, not_before=None, not_after=None, dedup_id=None, tags=(), parent_run_id=None,
        root_run_id=1, batch_id=None, schedule_id=None, created_at=AT, started_at=AT, finished_at=AT,
        progress=None, progress_message=None, result=None, error=None, worker_id="w",
    )  # fmt: skip
    return {1: run, 2: dataclasses.replace(run, id=2, root_run_id=2)}


def test_a_limit_overlap_names_the_executions_in_progress() -> None:
    """A violation lists what was running at that instant, ledger and store side by side: the one flake of
    the limits test (CI of 2026-12-07) left only a count and a time."""
    runs = _two_solo_runs()
    attempts = {
        1: [Attempt(1, "w", AT, AT, RunStatus.SUCCEEDED, None)],
        2: [Attempt(1, "w", AT, AT, RunStatus.FAILED, ErrorInfo("WorkerLost", "gone"))],
    }
    executions = [
        Execution(1, 1, 1, "solo", None, "w", 11, 100.0, 101.0, "succeeded", None),
        Execution(2, 2, 1, "solo", None, "w", 12, 100.5, 102.0, "succeeded", None),
    ]
    report = check(StoreState(runs, attempts, {}), executions, [], [], limits={"job:solo": 1}, end_time=200.0)
    (overlap,) = report.overlaps
    assert overlap.startswith("job:solo: 2 overlapping executions at 100.500: ")
    assert "run 1 attempt 1 pid 11 counted 100.000-101.000" in overlap
    assert "run 2 attempt 1 pid 12 counted 100.500-102.000" in overlap
    assert "error WorkerLost" in overlap
    assert report.max_overlap["job:solo"] == 2


def test_an_execution_recorded_just_after_its_process_was_paused_is_a_zombie() -> None:
    """SIGSTOP takes effect when the kernel next interrupts the process: a job thread recorded its start 2 ms
    after the harness recorded the pause, then stopped for the pause's 4 s while its run was reclaimed and run
    elsewhere. It executed nothing meanwhile, so it counts against no limit (it used to, whole)."""
    runs = _two_solo_runs()
    lost = Attempt(1, "w", AT, AT, RunStatus.FAILED, ErrorInfo("WorkerLost", "gone"))
    attempts = {1: [Attempt(1, "w", AT, AT, RunStatus.SUCCEEDED, None)], 2: [lost]}
    executions = [
        Execution(1, 1, 1, "solo", None, "w", 11, 100.6, 101.0, "done", None),
        Execution(2, 2, 1, "solo", None, "w", 12, 100.502, 104.54, "cancelled", None),
    ]
    faults = [Fault("pause", 12, 100.5, 104.5)]
    state = StoreState(runs, attempts, {})
    report = check(state, executions, [], faults, limits={"job:solo": 1}, end_time=200.0)
    assert report.overlaps == []
    late = [dataclasses.replace(executions[1], t_start=100.5 + 0.2)]  # well after the pause: not explained
    report = check(state, [executions[0], *late], [], faults, limits={"job:solo": 1}, end_time=200.0)
    assert len(report.overlaps) == 1
