"""T01 / T02: workers SIGKILLed every 2 s and restarted; nothing lost, duplicates only after a death, the
limited job never over its limit, every killed attempt recorded as ``worker lost``. The same with short runs
that workers claim ahead (prefetch): a worker killed with runs it never started loses them to the reaper like
running ones, and nothing else changes."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import pytest
from harness.scenario import Scenario, every, scale

LIMITS = {"job:limited_probe": 5}


def _load(scenario: Scenario, runs: int) -> None:
    rng = scenario.random
    plain, limited = [], []
    for i in range(runs):
        args = {"key": f"k{i}", "duration_ms": rng.randint(10, 500)}
        (limited if i % 10 == 0 else plain).append(args)
    scenario.trigger_many_logged("ledger_probe", plain)
    scenario.trigger_many_logged("limited_probe", limited)


def _kill_loop(scenario: Scenario, runs: int, kill_every: float = 2.0, **pool_options: Any) -> None:
    pool = scenario.pool(4, **{"concurrency": 8, "restart_delay": 0.5, **pool_options})

    def kill_one() -> None:
        live = pool.live()
        if live:
            pool.kill(scenario.random.choice(live), f"every {kill_every} s")

    deadline = time.time() + (600 if scale(0, 1) else 120)
    with every(kill_every, kill_one, rng=scenario.random):
        # Keep killing while work remains (the plan: kills throughout the drain).
        while time.time() < deadline:
            done = scenario.ledger.count()
            if done >= runs:
                break
            time.sleep(0.5)
    recovered = scenario.wait_terminal(60.0)
    report = scenario.check(limits=LIMITS if "queues" not in pool_options else None, recovered_at=recovered)
    scenario.record(report, kills=scenario.faults.count("kill"))
    print(report.summary())
    report.assert_ok(scenario.logs())
    assert scenario.faults.count("kill") >= 2, "the nemesis never struck"
    assert report.recovery_s is not None and report.recovery_s <= 60


@pytest.mark.postgres
def test_chaos_kill9_pg(pg_scenario: Scenario) -> None:
    runs = scale(1_000, 20_000)
    _load(pg_scenario, runs)
    _kill_loop(pg_scenario, runs)


def test_chaos_kill9_sqlite(sqlite_scenario: Scenario) -> None:
    runs = scale(600, 10_000)
    _load(sqlite_scenario, runs)
    _kill_loop(sqlite_scenario, runs)
    state = sqlite_scenario.state()
    for attempts in state.attempts.values():
        for attempt in attempts:
            message = str(attempt.error or "")
            assert "locked" not in message and "SQLITE_BUSY" not in message, message
    path = sqlite_scenario.url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def _load_fast(scenario: Scenario, runs: int) -> None:
    rng = scenario.random
    args = [{"key": f"f{i}", "duration_ms": rng.choice([0, 0, 0, 1, 2, 5, 20])} for i in range(runs)]
    scenario.trigger_many_logged("fast_probe", args)


def _lost_unstarted(scenario: Scenario) -> int:
    """Attempts the store gave a killed worker that never reached a job body: runs claimed ahead."""
    executed = {(e.run_id, e.attempt) for e in scenario.ledger.executions()}
    state = scenario.state()
    return sum(
        1
        for run_id, attempts in state.attempts.items()
        for a in attempts
        if a.error is not None and a.error.type == "WorkerLost" and (run_id, a.number) not in executed
    )


def _claimed_ahead_kill_loop(scenario: Scenario) -> None:
    runs = scale(8_000, 60_000)
    _load_fast(scenario, runs)
    _kill_loop(scenario, runs, kill_every=0.7, queues=["fast"])  # short runs drain fast: kill more often
    lost = _lost_unstarted(scenario)
    print(f"attempts lost before their body started: {lost}")
    assert lost > 0, "no worker was killed holding runs claimed ahead: the test did not test prefetch"


@pytest.mark.postgres
def test_chaos_kill9_with_runs_claimed_ahead_pg(pg_scenario: Scenario) -> None:
    _claimed_ahead_kill_loop(pg_scenario)


def test_chaos_kill9_with_runs_claimed_ahead_sqlite(sqlite_scenario: Scenario) -> None:
    _claimed_ahead_kill_loop(sqlite_scenario)
