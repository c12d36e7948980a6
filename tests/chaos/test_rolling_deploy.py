"""T23 graceful_shutdown_rolling_deploy: workers started through the documented ``exec`` launcher get SIGTERM
one after another (one of them twice) while attempts of 2-8 s run.

A single SIGTERM must hand unfinished runs back to ``pending`` within ``shutdown_timeout`` + 1 s without using
an attempt (no failed attempt recorded) and exit within ``shutdown_timeout`` + 5 s; a second SIGTERM must exit
within 1 s, its runs coming back after their lease. Nothing is lost; re-executions only for released or
interrupted runs.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from harness.procs import Timing
from harness.scenario import Scenario, scale

LAUNCHER = Path(__file__).resolve().parents[2] / "docs" / "deploy" / "runlane-worker.sh"


def _ts(at: datetime) -> float:
    return at.timestamp()


def test_graceful_shutdown_rolling_deploy(scenario: Scenario) -> None:
    scenario.timing = Timing(shutdown_timeout=3.0)
    shutdown = scenario.timing.shutdown_timeout
    runs = scale(60, 3_000)
    terms = scale(3, 30)
    rng = scenario.random
    durations = {f"k{i}": rng.randint(2_000, 8_000) for i in range(runs)}
    scenario.trigger_many_logged(
        "ledger_probe", [{"key": key, "duration_ms": ms} for key, ms in durations.items()]
    )
    launcher = ["sh", str(LAUNCHER), "--concurrency", "8"]
    env = scenario.env(RUNLANE_APP="harness.chaos_app:app", PYTHON=sys.executable)
    pool = scenario.pool(4, command=launcher, env=env, restart_delay=0.5)

    singles: list[tuple[int, float, float]] = []  # pid, SIGTERM time, exit time
    doubles: list[tuple[int, float, float]] = []  # pid, second SIGTERM time, exit time
    for n in range(terms):
        double = n == 1 or (n > 2 and rng.random() < 0.1)
        # A worker running attempts that outlast the drain (the second SIGTERM must find them still running).
        left = 2.5 if double else 0.0
        deadline = time.time() + 30
        slot = None
        while time.time() < deadline:
            now = time.time()
            busy = {
                e.pid
                for e in scenario.ledger.executions()
                if e.t_end is None and e.t_start + durations[str(e.key)] / 1000 > now + left
            }
            candidates = [s for s in pool.live() if s.pid in busy]
            if candidates:
                slot = rng.choice(candidates)
                break
            time.sleep(0.1)
        assert slot is not None and slot.proc is not None, "no busy worker to terminate"
        proc: subprocess.Popen[bytes] = slot.proc
        first = scenario.faults.instant("term", proc.pid, "deploy").t_start
        proc.terminate()
        if double:
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                second = scenario.faults.instant("term", proc.pid, "second SIGTERM").t_start
                proc.terminate()
                proc.wait(timeout=10)
                doubles.append((proc.pid, second, time.time()))
            else:
                singles.append((proc.pid, first, time.time()))
        else:
            proc.wait(timeout=shutdown + 10)
            singles.append((proc.pid, first, time.time()))
        time.sleep(scale(1, 60) if n + 1 < terms else 0)

    recovered = scenario.wait_terminal(120.0)
    state = scenario.state()
    report = scenario.check(recovered_at=recovered)
    scenario.record(report, sigterms=len(singles) + len(doubles), double_sigterms=len(doubles))
    print(report.summary(), "singles", singles, "doubles", doubles)
    report.assert_ok(scenario.logs())
    assert doubles, "the double-SIGTERM case was not exercised"

    for pid, at, exited in singles:
        assert exited - at <= shutdown + 5, f"worker {pid} took {exited - at:.1f} s to exit after SIGTERM"
    for pid, at, exited in doubles:
        assert exited - at <= 1.0 + 0.5, (
            f"worker {pid} took {exited - at:.1f} s to exit after a second SIGTERM"
        )

    # Runs handed back by a single SIGTERM: back in pending in time, and no attempt used up for them.
    single_pids = {pid: at for pid, at, _ in singles}
    double_pids = {pid for pid, _, _ in doubles}
    released = 0
    for run_id, events in state.events.items():
        for event in events:
            data = event.data or {}
            reason = str(data.get("reason") or "")
            if event.kind == "status" and data.get("to") == "pending" and reason.startswith("released"):
                released += 1
                # Both stores name the releasing worker in the reason (worker ids embed the pid).
                pid = next((p for p in single_pids if f"-{p}-" in reason), None)
                assert pid is not None, f"run {run_id} released by an unknown worker: {reason}"
                lag = _ts(event.at) - single_pids[pid]
                assert lag <= shutdown + 1.0, f"run {run_id} released {lag:.1f} s after SIGTERM"
    assert released > 0, "no run was released: the SIGTERMs hit idle workers"
    for run_id, attempts in state.attempts.items():
        for attempt in attempts:
            if attempt.status.value != "failed":
                continue
            owner = attempt.worker_id
            # Only a worker stopped by a second SIGTERM may leave attempts to expire (failed / worker lost).
            assert any(f"-{pid}-" in owner for pid in double_pids), (
                f"run {run_id} attempt {attempt.number} failed ({attempt.error}) on {owner}, "
                "which was not stopped twice"
            )
