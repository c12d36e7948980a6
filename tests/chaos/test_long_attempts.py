"""T06 long_attempt_heartbeat: jobs that hog their thread (CPU-bound sync job) or block the event loop (an
async job calling ``time.sleep``) for 10 x lease are never reclaimed, because heartbeats come from a thread the
job cannot block. CPU-bound sync jobs run where the plan's load needs them: most in job processes
(``executor="process"``, 60 per worker at full scale: in worker threads they starved the heartbeat of the
GIL), a few in worker threads (as many per worker as the machine has cores, the size the guide advises). A second variant freezes the heartbeat component of one worker and shows that its runs are
reclaimed within lease + 2 s: the detector still works."""

from __future__ import annotations

import time

import pytest
from harness.scenario import Scenario, scale

pytestmark = pytest.mark.serial  # CPU-heavy or measures latency: runs alone (scripts/test)

SLACK = 1.0


def test_long_attempt_heartbeat(scenario: Scenario) -> None:
    timing = scenario.timing
    lease = timing.lease_timeout
    runs = scale(16, 200)
    duration_ms = int(10 * lease * 1000)  # the plan: 10 x lease (full tier: 50 s with lease 5 s)
    # A job that blocks the event loop blocks every other attempt of its worker too, so each blocking run
    # gets a worker of its own (queue ``blocking``, concurrency 1); the CPU-bound runs share three workers.
    # (The plan runs its 200 runs on 4 workers; 6 loop blockers keep the worker count near that, and the
    # PostgreSQL connections of all workers within the server's 100.)
    blocking = scale(4, 6)
    threaded = scale(2, 6)
    spinners = 3
    scenario.trigger_many_logged(
        "spin_probe",
        [{"key": f"spin{i}", "duration_ms": duration_ms} for i in range(runs - blocking - threaded)],
    )
    scenario.trigger_many_logged(
        "spin_thread_probe", [{"key": f"thread{i}", "duration_ms": duration_ms} for i in range(threaded)]
    )
    scenario.trigger_many_logged(
        "block_loop_probe", [{"key": f"block{i}", "duration_ms": duration_ms} for i in range(blocking)]
    )
    # The frozen worker serves only ``limited_q``; the healthy ones only ``default``.
    scenario.trigger_many_logged(
        "queued_probe", [{"key": f"frozen{i}", "duration_ms": int(3 * lease * 1000)} for i in range(2)]
    )
    frozen = scenario.pool(
        1,
        concurrency=2,
        queues=["limited_q"],
        restart_delay=None,
        env=scenario.env(CHAOS_FREEZE_HEARTBEAT="1"),
    )
    scenario.pool(
        spinners, concurrency=-(-(runs - blocking) // spinners), queues=["default"], restart_delay=None
    )
    scenario.pool(blocking, concurrency=1, queues=["blocking"], restart_delay=None)

    # Variant 2: the frozen worker's runs are reclaimed within lease + 2 s of their start.
    deadline = time.time() + 60
    while time.time() < deadline:
        state = scenario.state()
        frozen_runs = [r for r in state.runs.values() if r.job == "queued_probe"]
        lost = [
            a for r in frozen_runs for a in state.attempts[r.id] if a.error and a.error.type == "WorkerLost"
        ]
        if len({a.number for a in lost}) >= 1 and len(lost) >= 2:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the frozen worker's runs were never reclaimed")
    for attempt in lost:
        assert attempt.finished_at is not None
        lag = (attempt.finished_at - attempt.started_at).total_seconds()
        assert lag <= lease + 2 + SLACK, f"reclaimed {lag:.1f} s after start (lease {lease} s)"
    frozen.kill(frozen.slots[0], "variant done")  # let a healthy worker finish them
    scenario.pool(1, concurrency=2, queues=["limited_q"], restart_delay=None)

    recovered = scenario.wait_terminal(duration_ms / 1000 * 3 + 60)
    report = scenario.check(recovered_at=recovered)
    state = scenario.state()
    scenario.record(report, long_runs=runs, lease_s=lease, attempt_s=duration_ms / 1000)
    print(report.summary())
    report.assert_ok(scenario.logs())
    for run in state.runs.values():
        if run.job == "queued_probe":
            continue
        assert run.status.value == "succeeded", run
        assert run.attempt == 1, (
            f"run {run.id} ({run.job}) took {run.attempt} attempts: {state.attempts[run.id]}"
        )
        executions = [e for e in scenario.ledger.executions() if e.run_id == run.id]
        assert len(executions) == 1, executions
