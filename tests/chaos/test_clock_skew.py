"""T13 clock_skew_workers: worker processes whose wall clocks are 5 min behind, 5 min ahead, and jumping back
1 h mid-test, while the database keeps true time.

The skew is emulated at harness level (``harness/skew.py``: the process's ``time.time`` is shifted, like
``faketime`` with monotonic clocks left alone; the database server and the test keep true time). On
PostgreSQL every decision that involves time follows the database's clock: leases, claims, ``not_before``
and ``not_after``, and which fires are due (the store reads the server's clock; see
``tests/integration/test_postgres_clock.py`` for the regression this test found).

On SQLite there is no server clock: the database's clock is the host's, which every process reads, and a
worker's leases are timed by it by design. The SQLite variant therefore keeps the workers on true time and
skews processes that run only the scheduler: one 5 min behind and one that jumps back 1 h mid-test (an NTP
step). A scheduler 5 min *ahead* is left out on SQLite on purpose: with no clock but its own, it cannot tell
"my clock is ahead" from "nobody fired for 5 minutes" (identical store and clock readings), so it applies
the misfire policy as after an outage. One host cannot give one of its processes a different clock without
faketime, and on PostgreSQL the same worker is tested and must be harmless.

Pass: 0 premature reclaims (no attempt lost its lease while its worker was alive), 0 duplicate executions,
0 duplicate and 0 missing fires, no fire created ahead of its time, and 0 starts before ``not_before`` or
after ``not_after``.
"""

from __future__ import annotations

import re
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from harness.fires import RECORD_ENV, check_fires, cron_fires, read_plans, store_fire_counts, ts, wait_fired
from harness.scenario import FULL, Scenario, scale, span
from harness.skew import FILE_ENV, OFFSET_ENV, set_offset

from runlane.models import RunFilter, Schedule

EVERY_SECOND = "* * * * * *"
EVERY_MINUTE = "0 * * * * *"
SKEWS = {0: {OFFSET_ENV: "-300"}, 1: {OFFSET_ENV: "300"}}  # slot 2 jumps: its offset lives in a file
WORKER_LOST = "WorkerLost"
WORKER_SLOTS = 20  # per worker process; the runs sleep, so slots cost little


def _load(scenario: Scenario, runs: int) -> float:
    """Runs of 1-4 s (1-5 s in the full tier; longer than the 2 s lease, so only heartbeats keep them),
    triggered as a backlog; then a third more that wait for a ``not_before`` up to 8 s away, and a tenth with
    a low priority and a ``not_after`` that falls while the backlog drains, so that many of them expire (the
    first surely: its ``not_after`` is 0.5 s away).
    Returns the seconds of work triggered."""
    rng = scenario.random
    backlog = [{"key": f"k{i}", "duration_ms": rng.randint(1_000, scale(4_000, 5_000))} for i in range(runs)]
    scenario.trigger_many_logged("ledger_probe", backlog)
    work_ms = sum(args["duration_ms"] for args in backlog)
    for i in range(runs, runs + runs // 3):
        args = {"key": f"k{i}", "duration_ms": rng.randint(1_000, scale(4_000, 5_000))}
        delay = timedelta(seconds=rng.uniform(0.5, 8.0))
        scenario.clientlog.trigger(scenario.client, "ledger_probe", args, not_before=delay)
        work_ms += args["duration_ms"]
    first = runs + runs // 3
    for i in range(first, first + runs // 10):
        args = {"key": f"k{i}", "duration_ms": rng.randint(1_000, scale(4_000, 5_000))}
        # The first one surely expires: the backlog outnumbers the slots and holds each for at least 1 s, and
        # its leftovers outrank this run. With 1-6 s only, a seed of short bodies and long ttls let the
        # backlog drain in time for all of them (CHAOS_SEED=520099790, SQLite: none expired).
        ttl = timedelta(seconds=0.5 if i == first else rng.uniform(1.0, 6.0))
        scenario.clientlog.trigger(scenario.client, "ledger_probe", args, not_after=ttl, priority=-1)
    return work_ms / 1000


def _run(
    scenario: Scenario,
    jump_file: Path,
    jump_pids: list[int],
    *,
    database_clock: bool,
    duration: float,
    runs: int,
    slots: int,
) -> None:
    ids = [f"tick-{i}" for i in range(10)]
    cron = EVERY_MINUTE if FULL else EVERY_SECOND  # the plan: every-minute schedules for 30 min
    schedules: dict[str, Schedule] = {sid: scenario.client.schedules.add(sid, "tick", cron) for sid in ids}
    started = time.time()
    work_s = _load(scenario, runs)
    time.sleep(max(duration / 2 - (time.time() - started), 0))
    set_offset(jump_file, -3600.0)
    for pid in jump_pids:
        scenario.faults.instant("clock_jump", pid, "-1 h")  # not an interrupting fault: justifies nothing
    time.sleep(max(duration - (time.time() - started), 0))
    stopped = time.time()
    wait_fired(scenario.client, schedules, stopped, 15.0, scenario.logs())
    for sid in ids:
        scenario.client.schedules.pause(sid)
    # A scheduler planning with a clock ahead of the database's creates fires before their time. (Checked
    # before waiting: such a fire would keep its run pending until its time, minutes away.) On SQLite a run's
    # created_at is its creator's clock, skewed here by design (a pass that straddles the jump stamps a fire
    # due at true time with the jumped clock): there, fires are judged by their starts below.
    ahead = [
        f"{r.schedule_id} @ {ts(r.not_before):.3f} created {ts(r.not_before) - ts(r.created_at):.1f} s early"
        for sid in ids
        for r in scenario.client.list_runs(RunFilter(schedule_id=sid), limit=100_000)
        if database_clock and r.not_before is not None and ts(r.not_before) > ts(r.created_at) + 1.0
    ]
    assert not ahead, f"fires created ahead of the database's clock: {len(ahead)}, e.g. {ahead[:5]}"
    # The backlog is sized for the plan's 30 min; a box capped shorter (RUNLANE_CHAOS_SPAN_CAP) ends before it
    # has drained, so the wait allows for what is left of it at full use of the workers' slots.
    drain_left = work_s / slots - (time.time() - started)
    recovered = scenario.wait_terminal(40.0 + max(0.0, 1.5 * drain_left))

    state = scenario.state()
    executions = scenario.ledger.executions()
    expected = {
        sid: cron_fires(cron, ts(s.next_fire_at) - 0.5, stopped)
        for sid, s in schedules.items()
        if s.next_fire_at is not None
    }
    fires = check_fires(state, executions, store_fire_counts(scenario.url), expected)
    report = scenario.check(lease_expiry_justifies=False, recovered_at=recovered)
    print(fires.summary())
    print(report.summary())

    premature = [
        f"run {run_id} attempt {a.number}: {a.error}"
        for run_id, attempts in state.attempts.items()
        for a in attempts
        if a.error is not None and a.error.type == WORKER_LOST
    ]
    early, late, expired = [], [], 0
    starts: dict[int, list[float]] = {}
    for e in executions:
        starts.setdefault(e.run_id, []).append(e.t_start)
    for (
        run
    ) in state.runs.values():  # fires too: a fire's not_before is its time (ledger starts are true time)
        if run.not_before is not None:
            for t in starts.get(run.id, []):
                if t < ts(run.not_before):
                    early.append(f"run {run.id} started {ts(run.not_before) - t:.3f} s before not_before")
            for a in state.attempts.get(run.id, []):
                if ts(a.started_at) < ts(run.not_before):
                    early.append(f"run {run.id} attempt {a.number} claimed before not_before")
        if run.not_after is not None:
            for a in state.attempts.get(run.id, []):
                if ts(a.started_at) >= ts(run.not_after):
                    late.append(f"run {run.id} attempt {a.number} claimed after not_after")
            if run.status.value == "cancelled":
                expired += 1
                if run.id in starts:
                    late.append(f"run {run.id} expired but was executed")
    plans = read_plans(scenario.ledger.path)
    off_clock = [
        f"pid {p.pid} planned {p.schedule_id} with a clock {p.now - p.t:+.1f} s off"
        for p in plans
        if abs(p.now - p.t) > 60.0  # the skews are 300 s and 3600 s; a pass under load takes seconds
    ]
    scenario.record(
        report, premature_reclaims=len(premature), early=len(early), late=len(late), expired=expired
    )

    context = scenario.logs()
    fires.assert_ok(context)
    report.assert_ok(context)
    assert not premature, f"premature reclaims: {premature[:10]}\n{context}"
    assert not early and not late, f"not_before/not_after violated: {(early + late)[:10]}"
    if database_clock:  # the root cause of fires missed under skew: planning with the process's clock
        assert not off_clock, f"schedulers planned with their own clock: {off_clock[:10]}"
    assert plans, "no scheduler pass was recorded"
    assert scenario.ledger.count() >= runs, "the backlog did not run"
    assert expired > 0, "no run expired: not_after was not exercised"
    print(f"expired by not_after: {expired}; scheduler passes recorded: {len(plans)}")


@pytest.mark.postgres
def test_clock_skew_workers(pg_scenario: Scenario) -> None:
    """Three workers: 5 min behind, 5 min ahead, and one whose clock jumps back 1 h halfway through."""
    scenario = pg_scenario
    jump = scenario.workdir / "clock-offset"
    set_offset(jump, 0.0)
    env = scenario.env(**{RECORD_ENV: "1"})
    env_for = {**SKEWS, 2: {FILE_ENV: str(jump)}}
    pool = scenario.pool(3, concurrency=WORKER_SLOTS, env=env, env_for=env_for, restart_delay=None)
    pool.wait_started()
    # 200 runs + a third delayed + a tenth expiring: ~300 (CI) / 5,000 for 20 s / 30 min.
    _run(
        scenario,
        jump,
        [pool.slots[2].pid or 0],
        database_clock=True,
        duration=span(20.0, 1800.0),
        runs=scale(200, 3_500),
        slots=3 * WORKER_SLOTS,
    )


def test_clock_skew_scheduler_sqlite(sqlite_scenario: Scenario) -> None:
    """Two true-time workers, a scheduler-only process 5 min behind and one jumping back 1 h (module doc)."""
    scenario = sqlite_scenario
    jump = scenario.workdir / "clock-offset"
    set_offset(jump, 0.0)
    env = scenario.env(**{RECORD_ENV: "1"})
    workers = scenario.pool(2, concurrency=WORKER_SLOTS, env=env, restart_delay=None)
    schedulers = scenario.pool(
        2,
        env=env,
        env_for={0: SKEWS[0], 1: {FILE_ENV: str(jump)}},
        command=[sys.executable, "-m", "harness.scheduler_only"],
        restart_delay=None,
    )
    workers.wait_started()
    schedulers.wait_started()
    # The workers keep true time here, so a smaller load suffices; the fires are what is under test.
    _run(
        scenario,
        jump,
        [schedulers.slots[1].pid or 0],
        database_clock=False,
        duration=span(12.0, 1800.0),
        runs=scale(60, 3_500),
        slots=2 * WORKER_SLOTS,
    )


def test_runlane_reads_the_wall_clock_only_through_time_time() -> None:
    """The skew emulation patches ``time.time``; a wall-clock read it cannot see would make T13 blind."""
    root = Path(__file__).resolve().parents[2] / "runlane"
    forbidden = re.compile(
        r"datetime\.now\(|datetime\.utcnow\(|date\.today\(|time_ns\(|from time import|localtime\("
    )
    offenders: list[str] = []
    for path in root.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if forbidden.search(line):
                offenders.append(f"{path.relative_to(root.parent)}:{n}: {line.strip()}")
    assert not offenders, "wall-clock reads that harness/skew.py does not shift:\n" + "\n".join(offenders)
