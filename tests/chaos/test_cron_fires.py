"""T11 cron_exactly_once_chaos and T12 cron_crash_gap_and_catch_up: every worker process runs a scheduler,
and each (schedule, fire time) gets exactly one run however the processes die, stall or crash mid-fire.

Not run here (nightly only): T11's variants through PgBouncer in transaction mode, with every process
sharing one hostname, and with a process rejoining after a 10-minute pause. The full tier
(``RUNLANE_CHAOS_TIER=full``) runs T11 with 10 processes, 20 every-second and 30 every-minute schedules for
6 h, and T12's catch-up part with every-minute schedules and a 30-minute outage; CI takes every process
down for 10 s with every-second schedules (the same code path).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from harness.faults import Fault
from harness.fires import (
    LOG_ENV,
    PLAN_ENV,
    RECORD_ENV,
    STEPS,
    Plan,
    check_fires,
    cron_fires,
    read_crashes,
    read_plans,
    store_fire_counts,
    ts,
    wait_fired,
)
from harness.procs import WorkerPool, WorkerSlot
from harness.scenario import FULL, Scenario, every, scale, span

from runlane.models import Schedule
from runlane.scheduler.schedules import MISFIRE_GRACE

EVERY_SECOND = "* * * * * *"
EVERY_MINUTE = "0 * * * * *"


def _add(
    scenario: Scenario, specs: list[tuple[str, str, str, dict[str, Any]]], **options: Any
) -> dict[str, Schedule]:
    """Add (id, job, cron, args) schedules; returns them by id with their first fire."""
    return {
        sid: scenario.client.schedules.add(sid, job, cron, args, **options) for sid, job, cron, args in specs
    }


def _settle(scenario: Scenario, ids: list[str]) -> float:
    """Pause the schedules and wait until every run is terminal, so the checker sees final rows."""
    for sid in ids:
        scenario.client.schedules.pause(sid)
    return scenario.wait_terminal(30.0)


class Pauses:
    """SIGSTOPs that resume themselves ``seconds`` later; ``close`` resumes whatever is still stopped."""

    def __init__(self, pool: WorkerPool, seconds: float) -> None:
        self.pool = pool
        self.seconds = seconds
        self._held: list[tuple[WorkerSlot, Fault]] = []
        self._timers: list[threading.Timer] = []
        self._lock = threading.Lock()

    def take(self, slot: WorkerSlot, detail: str) -> None:
        fault = self.pool.pause(slot, detail)
        if fault is None:
            return
        with self._lock:
            self._held.append((slot, fault))
        timer = threading.Timer(self.seconds, self._resume, (slot, fault))
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _resume(self, slot: WorkerSlot, fault: Fault) -> None:
        with self._lock:
            if (slot, fault) not in self._held:
                return
            self._held.remove((slot, fault))
        self.pool.resume(slot, fault)

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        for slot, fault in list(self._held):
            self._resume(slot, fault)


@contextmanager
def _pauses(pool: WorkerPool, seconds: float) -> Iterator[Pauses]:
    pauses = Pauses(pool, seconds)
    try:
        yield pauses
    finally:
        pauses.close()


# -- T11 -----------------------------------------------------------------------------------------------------


@pytest.mark.timeout(8 * 3600 if FULL else 60)  # the full tier runs 6 h of chaos, past the chaos tier's hour
def test_cron_exactly_once_chaos(scenario: Scenario) -> None:
    """CI: 10 every-second schedules and one whose runs outlive their interval (overlap ``skip``) for ~20 s
    on 4 worker processes; every 5 s one is SIGKILLed (restarted 0.5 s later) and another SIGSTOPped for
    2 x lease. At least two processes are up at every moment, so no fire may be missing."""
    lease = scenario.timing.lease_timeout
    processes = scale(4, 10)
    chaos_for = span(16.0, 6 * 3600.0)  # strikes at 5, 10 and 15 s
    specs = [(f"sec-{i}", "tick", EVERY_SECOND, {}) for i in range(scale(10, 20))]
    specs += [(f"min-{i}", "tick", EVERY_MINUTE, {}) for i in range(scale(0, 30))]
    specs += [("slow", "slow_tick", EVERY_SECOND, {"duration_ms": 2_500})]  # outlives its 1 s interval
    ids = [s[0] for s in specs]

    pool = scenario.pool(processes, concurrency=8, restart_delay=0.5)
    pool.wait_started()
    schedules = _add(scenario, specs)
    rng = scenario.random
    with _pauses(pool, 2 * lease) as pauser:

        def strike() -> None:
            live = pool.live()
            if len(live) < 2:
                return
            victim, sleeper = rng.sample(live, 2)
            pool.kill(victim, "T11: every 5 s")
            pauser.take(sleeper, "T11: 2 x lease")

        with every(5.0, strike, rng=rng):
            time.sleep(chaos_for)
    stopped = time.time()
    wait_fired(scenario.client, schedules, stopped, 15.0, scenario.logs())
    recovered = _settle(scenario, ids)

    state = scenario.state()
    executions = scenario.ledger.executions()
    faults = scenario.faults.snapshot()
    first = {sid: s.next_fire_at for sid, s in schedules.items() if s.next_fire_at is not None}
    expected = {sid: cron_fires(cron, ts(first[sid]) - 0.5, stopped) for sid, _, cron, _ in specs}
    fires = check_fires(
        state, executions, store_fire_counts(scenario.url), expected, faults=faults, skip_schedules=["slow"]
    )
    report = scenario.check(recovered_at=recovered)
    print(fires.summary())
    print(report.summary())
    scenario.record(report, **{f"fire_{k}": v for k, v in fires.__dict__.items() if isinstance(v, int)})
    fires.assert_ok(scenario.logs())
    report.assert_ok(scenario.logs())
    assert scenario.faults.count("kill") >= 3 and scenario.faults.count("pause") >= 3, (
        "the nemesis never struck"
    )
    assert all(len(expected[sid]) >= chaos_for for sid in ids if sid.startswith("sec-"))
    slow_skipped = sum(
        1 for r in state.runs.values() if r.schedule_id == "slow" and r.status.value == "skipped"
    )
    assert slow_skipped > 0, "the slow schedule never overlapped: overlap skip was not exercised"


# -- T12 -----------------------------------------------------------------------------------------------------


def _plans_after(scenario: Scenario, since: float) -> dict[str, Plan]:
    """Each schedule's first recorded scheduler pass after ``since`` that created runs."""
    first: dict[str, Plan] = {}
    for plan in read_plans(scenario.ledger.path):
        if plan.t >= since and plan.created and plan.schedule_id not in first:
            first[plan.schedule_id] = plan
    return first


def test_cron_crash_gap_and_catch_up(scenario: Scenario) -> None:
    """Part 1: one worker process whose scheduler dies (``os._exit``) at each step boundary of the fire path
    in turn, restarted each time: every fire it was creating exists exactly once afterwards (created by the
    next process's first pass, or committed before the crash) and no fire is missing.

    Part 2: every process down for 10 s (CI; 30 min nightly): the first pass after it creates one catch-up
    run per ``misfire="latest"`` schedule and min(N, missed) per ``misfire="all"``, ``max_catch_up=N``
    schedule (the latest missed ones), each run executed with its own fire time."""
    catch_up = 3
    outage = span(10.0, 1800.0)
    crash_log = scenario.workdir / "crashes.jsonl"
    plan_file = scenario.workdir / "crash-plan"
    # Each process crashes on its second pass that reaches its step: its first pass creates the fires the
    # previous process died on, so every crash is followed by exactly one pass that must repair it.
    plan_file.write_text("".join(f"{step}:2\n" for step in STEPS))
    env = scenario.env(**{PLAN_ENV: str(plan_file), LOG_ENV: str(crash_log), RECORD_ENV: "1"})
    # Part 1: a crash at every step boundary, each repaired by the next process's first pass. One schedule:
    # a process dying mid-pass also leaves the rest of its pass undone, and back-to-back crashes could hold
    # other schedules past the misfire grace (a misfire by design, not a fire lost to a partial write).
    schedules = _add(scenario, [("crash-gap", "tick", EVERY_SECOND, {})], overlap="allow")
    pool = scenario.pool(1, concurrency=4, env=env, restart_delay=0.2)
    deadline = time.time() + 30
    while len(read_crashes(crash_log)) < len(STEPS) or pool.live() == []:
        assert time.time() < deadline, f"crashes so far: {read_crashes(crash_log)}\n{scenario.logs()}"
        time.sleep(0.1)
    crashes = read_crashes(crash_log)
    for crash in crashes:
        scenario.faults.add(Fault("crash", crash["pid"], crash["t"], crash["t"], crash["step"]))

    latest = ["crash-gap", *(f"latest-{i}" for i in range(2))]
    catching_up = [f"all-{i}" for i in range(2)]
    cron = EVERY_MINUTE if FULL else EVERY_SECOND  # the plan: every-minute schedules, a 30-minute outage
    schedules |= _add(scenario, [(sid, "tick", cron, {}) for sid in latest[1:]], overlap="allow")
    schedules |= _add(
        scenario,
        [(sid, "tick", cron, {}) for sid in catching_up],
        overlap="allow",
        misfire="all",
        max_catch_up=catch_up,
    )
    ids = list(schedules)
    wait_fired(scenario.client, schedules, max(c["t"] for c in crashes) + 1.0, 15.0, scenario.logs())

    # Part 2: every process down, then one back.
    pool.kill_all("T12: outage")
    down = time.time()
    time.sleep(outage)
    back = time.time()
    scenario.pool(1, concurrency=8, env=env, restart_delay=0.5)
    wait_fired(scenario.client, schedules, time.time() + 1.0, 20.0, scenario.logs())
    last_fires = [scenario.client.schedules.get(sid).last_fire_at for sid in ids]
    stopped = min(ts(at) for at in last_fires if at is not None)
    recovered = _settle(scenario, ids)

    state = scenario.state()
    executions = scenario.ledger.executions()
    counts = store_fire_counts(scenario.url)
    fires_by_schedule: dict[str, list[float]] = {sid: [] for sid in ids}
    for sid, at in counts:
        fires_by_schedule[sid].append(at)
    for times in fires_by_schedule.values():
        times.sort()

    # Every fire that a crashed process was creating exists exactly once; before the commit, a later
    # process's pass created it.
    plans = read_plans(scenario.ledger.path)
    for crash in crashes:
        # The restarted process must pass within the misfire grace, or the fire is a misfire by design.
        gap = min((p.now for p in plans if p.t > crash["t"]), default=float("inf")) - min(crash["fires"])
        for at in crash["fires"]:
            n = counts.get((crash["schedule"], round(at, 6)), 0)
            assert n == 1, (
                f"crash at {crash['step']}: fire {crash['schedule']} @ {at} has {n} runs (the next pass came "
                f"{gap:.1f} s after the fire; grace {MISFIRE_GRACE} s)\n{scenario.logs()}"
            )
            if crash["step"] != "committed":
                assert any(
                    p.pid != crash["pid"] and p.created and at in p.fires and p.t > crash["t"] for p in plans
                ), f"crash at {crash['step']}: no later pass created {crash['schedule']} @ {at}"

    # No fire missing before the outage; after it, only what the misfire policy leaves out.
    first_pass = _plans_after(scenario, back)
    expected: dict[str, list[float]] = {}
    problems: list[str] = []
    caught_up: list[tuple[str, float]] = []
    for sid, schedule in schedules.items():
        assert schedule.next_fire_at is not None
        before = [t for t in fires_by_schedule[sid] if t <= down]
        last_before = max(before)
        plan = first_pass.get(sid)
        assert plan is not None, f"{sid}: no scheduler pass after the outage created a run"
        cutoff = plan.now - MISFIRE_GRACE  # fires at or before it were missed
        cron = schedule.cron
        assert cron is not None
        missed = cron_fires(cron, last_before, cutoff)
        if not missed:
            problems.append(f"{sid}: the outage left no fire missed; the catch-up was not exercised")
        keep = 1 if sid in latest else min(catch_up, len(missed))
        got = [t for t in fires_by_schedule[sid] if last_before < t <= cutoff]
        caught_up += [(sid, t) for t in got]
        if got != missed[len(missed) - keep :]:
            problems.append(
                f"{sid}: {len(missed)} missed fires in ({last_before}, {cutoff:.3f}]; expected the latest "
                f"{keep} to run, got {len(got)}: {got}"
            )
        expected[sid] = cron_fires(cron, ts(schedule.next_fire_at) - 0.5, last_before)
        expected[sid] += cron_fires(cron, cutoff, stopped)
    assert not problems, "\n".join(problems) + "\n" + scenario.logs()

    report = scenario.check(recovered_at=recovered)
    fires = check_fires(state, executions, counts, expected, faults=scenario.faults.snapshot())
    print(f"crashes: {[(c['step'], c['schedule'], c['fires']) for c in crashes]}")
    print(fires.summary())
    print(report.summary())
    scenario.record(report, crashes=len(crashes), outage_s=round(back - down, 1))
    fires.assert_ok(scenario.logs())
    report.assert_ok(scenario.logs())
    assert sorted(c["step"] for c in crashes) == sorted(STEPS), crashes
    # Each catch-up run was executed, with its own fire time (ctx.scheduled_at, compared by check_fires).
    ran = {(e.key, round(e.scheduled_at, 6)) for e in executions if e.scheduled_at is not None}
    assert all(fire in ran for fire in caught_up), f"catch-up runs never ran: {set(caught_up) - ran}"
