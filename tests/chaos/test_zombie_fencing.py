"""T03 zombie_pause_fencing: a worker holding running attempts is SIGSTOPped for 3 x lease, then resumed.

Its runs must be reclaimed within lease + 2 x reaper interval; once it wakes up, nothing it writes for the
stale attempts (progress, events, result, failure) may be accepted; it must notice the lost lease within a
heartbeat interval and stop; each affected run executes at most twice and ends with the newer attempt.

On SQLite a worker stopped while it holds the file's write lock is an outage for every writer, the reapers
included (nothing can take a lock from a stopped process); the harness sees it in /proc/locks, and the
bound then counts from the resume.
"""

from __future__ import annotations

import threading
import time

from harness.faults import Fault
from harness.ledger import Execution
from harness.procs import WorkerSlot
from harness.scenario import Scenario, scale

SLACK = 1.0  # scheduling noise on two shared cores


def _busiest(scenario: Scenario, slots: list[WorkerSlot], exclude: set[int], at_least: int) -> WorkerSlot:
    deadline = time.time() + 30
    while time.time() < deadline:
        open_by_pid: dict[int, int] = {}
        for e in scenario.ledger.executions():
            if e.t_end is None:
                open_by_pid[e.pid] = open_by_pid.get(e.pid, 0) + 1
        ranked = sorted(
            (s for s in slots if s.pid is not None and s.pid not in exclude and s.alive and not s.paused),
            key=lambda s: -open_by_pid.get(s.pid or 0, 0),
        )
        if ranked and open_by_pid.get(ranked[0].pid or 0, 0) >= at_least:
            return ranked[0]
        time.sleep(0.05)
    raise AssertionError("no worker got busy enough to pause")


def test_zombie_pause_fencing(scenario: Scenario) -> None:
    timing = scenario.timing
    lease = timing.lease_timeout
    runs = scale(100, 2_000)
    pauses = scale(2, 5)
    concurrency = scale(8, 24)
    rng = scenario.random
    low, high = (1_000, 2_000) if not scale(0, 1) else (5_000, 10_000)
    scenario.trigger_many_logged(
        "progress_probe", [{"key": f"k{i}", "duration_ms": rng.randint(low, high)} for i in range(runs)]
    )
    # Pauses overlap (each lasts 3 x lease, the next starts 0.5 s later) and each takes a distinct worker, so two
    # more workers than pauses keep the reaper and the reclaims going while they are all stopped.
    pool = scenario.pool(pauses + 2, concurrency=concurrency, restart_delay=None)

    paused: list[tuple[int, Fault]] = []
    threads: list[threading.Thread] = []
    used: set[int] = set()
    for _ in range(pauses):
        slot = _busiest(scenario, pool.slots, used, at_least=min(4, concurrency))
        assert slot.pid is not None
        used.add(slot.pid)
        fault = pool.pause(slot, "3 x lease")
        assert fault is not None
        paused.append((slot.pid, fault))

        def later(slot: WorkerSlot = slot, fault: Fault = fault) -> None:
            time.sleep(3 * lease)
            pool.resume(slot, fault)

        thread = threading.Thread(target=later, daemon=True)
        thread.start()
        threads.append(thread)
        time.sleep(0.5)
    for thread in threads:
        thread.join()

    recovered = scenario.wait_terminal(120.0)
    report = scenario.check(recovered_at=recovered)
    state = scenario.state()
    executions = scenario.ledger.executions()
    by_run: dict[int, list[Execution]] = {}
    for e in executions:
        by_run.setdefault(e.run_id, []).append(e)

    bound = lease + 2 * timing.reaper_interval + SLACK
    locked = [f for f in scenario.faults.snapshot() if f.kind == "sqlite_write_locked"]

    def reclaim_from(t: float) -> float:
        """On SQLite a worker stopped while it holds the file's write lock stops every writer, the reaper
        included, until it resumes: a store outage (RELIABILITY.md), after which the bound counts again."""
        moved = True
        while moved:
            moved = False
            for f in locked:
                if f.t_start <= t + bound and f.until > t:
                    t, moved = f.until, True
        return t

    stale_total = 0
    for pid, fault in paused:
        assert fault.t_end is not None
        stale = [
            e
            for e in executions
            if e.pid == pid and e.t_start < fault.t_start and (e.t_end is None or e.t_end > fault.t_start)
        ]
        for e in stale:
            attempts = {a.number: a for a in state.attempts[e.run_id]}
            stale_attempt = attempts[e.attempt]
            run = state.runs[e.run_id]
            if stale_attempt.status.value == "succeeded" and run.attempt == e.attempt:
                # It finished just as the pause began (its end was already on the wire): not a zombie.
                assert stale_attempt.finished_at is not None
                assert stale_attempt.finished_at.timestamp() <= fault.t_start + 0.5
                continue
            stale_total += 1
            # Reclaimed, in time, and the reclaim stuck: no stale result or failure overwrote it.
            assert stale_attempt.status.value == "failed", (e, stale_attempt)
            assert stale_attempt.error is not None and stale_attempt.error.type == "WorkerLost"
            assert stale_attempt.finished_at is not None
            reclaim_lag = stale_attempt.finished_at.timestamp() - reclaim_from(fault.t_start)
            assert reclaim_lag <= bound, (e.run_id, reclaim_lag)
            # The newer attempt decided the run.
            assert run.status.value == "succeeded" and run.attempt > e.attempt, run
            assert len(by_run[e.run_id]) <= 2, by_run[e.run_id]
            # The resumed worker saw the lost lease and stopped within a heartbeat interval.
            assert e.t_end is not None, f"stale execution of run {e.run_id} never ended"
            stop_lag = e.t_end - fault.t_end
            assert stop_lag <= timing.heartbeat_interval + SLACK, (e.run_id, stop_lag)
            # No progress the zombie reported after waking was accepted.
            late = [
                ev
                for ev in state.events[e.run_id]
                if ev.kind == "progress"
                and (ev.data or {}).get("message") == f"attempt {e.attempt}"
                and ev.at.timestamp() >= fault.t_end
            ]
            assert not late, f"run {e.run_id}: stale progress accepted: {late}"

    scenario.record(
        report, pauses=len(paused), zombie_attempts=stale_total, paused_holding_write_lock=len(locked)
    )
    print(report.summary(), f"zombie attempts={stale_total}")
    report.assert_ok(scenario.logs())
    assert stale_total >= pauses, "the pauses caught no running attempt"
