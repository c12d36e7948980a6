"""T23 graceful_shutdown_rolling_deploy: workers started through the documented ``exec`` launcher get SIGTERM
one after another (one of them twice) while attempts run: 2-8 s with ``shutdown_timeout`` 3 s in the smoke
tier; in the full tier the plan's 5-40 s attempts, ``shutdown_timeout`` 10 s, a SIGTERM every 60 s and 3,000
runs fed evenly over 30 min (a capped time box feeds the same rate for a shorter time).

A single SIGTERM must hand unfinished runs back to ``pending`` within ``shutdown_timeout`` + 1 s without using
an attempt (no failed attempt recorded) and exit within ``shutdown_timeout`` + 5 s; a second SIGTERM must exit
within 1 s, its runs coming back after their lease. Nothing is lost; re-executions only for released or
interrupted runs.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from harness.procs import FULL, Timing
from harness.scenario import Scenario, scale, span

LAUNCHER = Path(__file__).resolve().parents[2] / "docs" / "deploy" / "runlane-worker.sh"


def _ts(at: datetime) -> float:
    return at.timestamp()


def _feed(scenario: Scenario, args: list[dict[str, object]], seconds: float, stop: threading.Event) -> None:
    """Trigger ``args`` evenly over ``seconds``, a second's worth at a time."""
    started = time.time()
    sent = 0
    while sent < len(args) and not stop.is_set():
        due = min(len(args), int((time.time() - started) / seconds * len(args)) + 1)
        if due > sent:
            scenario.trigger_many_logged("ledger_probe", args[sent:due])
            sent = due
        stop.wait(1.0)


def test_graceful_shutdown_rolling_deploy(scenario: Scenario) -> None:
    scenario.timing = Timing(shutdown_timeout=float(scale(3, 10)))
    shutdown = scenario.timing.shutdown_timeout
    box = span(0.0, 1_800.0)  # the full tier's 30 min of deploys; the smoke tier triggers everything at once
    runs = scale(60, int(3_000 * box / 1_800))
    terms = scale(3, int(box // 60))
    rng = scenario.random
    low, high = scale(2_000, 5_000), scale(8_000, 40_000)
    durations = {f"k{i}": rng.randint(low, high) for i in range(runs)}
    args: list[dict[str, object]] = [{"key": key, "duration_ms": ms} for key, ms in durations.items()]
    stop_feeding = threading.Event()
    feeder = threading.Thread(target=_feed, args=(scenario, args, box, stop_feeding), daemon=True)
    if FULL:
        feeder.start()  # 1.7 runs/s of 22 s on average: about 37 attempts in flight
    else:
        scenario.trigger_many_logged("ledger_probe", args)
    launcher = ["sh", str(LAUNCHER), "--concurrency", str(scale(8, 12))]
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
        if double:  # the second SIGTERM arrives 2 s after the first (the plan's)
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
            try:
                proc.wait(timeout=shutdown + 10)
            except subprocess.TimeoutExpired:  # say how far its shutdown got (pytest keeps few temp dirs)
                raise AssertionError(
                    f"worker {proc.pid} still running {shutdown + 10:.0f} s after SIGTERM\n{pool.logs()}"
                ) from None
            singles.append((proc.pid, first, time.time()))
        time.sleep(scale(1, 60) if n + 1 < terms else 0)

    if FULL:
        feeder.join(timeout=box + 60)
    stop_feeding.set()
    recovered = scenario.wait_terminal(scale(120, 600))
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
