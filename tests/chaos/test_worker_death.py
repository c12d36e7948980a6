"""T01 / T02: workers SIGKILLed every 2 s and restarted; nothing lost, duplicates only after a death, the
limited job never over its limit, every killed attempt recorded as ``worker lost``."""

from __future__ import annotations

import sqlite3
import time

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


def _kill_loop(scenario: Scenario, runs: int) -> None:
    pool = scenario.pool(4, concurrency=8, restart_delay=0.5)

    def kill_one() -> None:
        live = pool.live()
        if live:
            pool.kill(scenario.random.choice(live), "every 2 s")

    deadline = time.time() + (600 if scale(0, 1) else 120)
    with every(2.0, kill_one, rng=scenario.random):
        # Keep killing while work remains (the plan: kills throughout the drain).
        while time.time() < deadline:
            done = scenario.ledger.count()
            if done >= runs:
                break
            time.sleep(0.5)
    recovered = scenario.wait_terminal(60.0)
    report = scenario.check(limits=LIMITS, recovered_at=recovered)
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
