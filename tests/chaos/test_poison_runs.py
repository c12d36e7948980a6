"""T16 poison_runs: three kinds of poison mixed into healthy load.

- a job that ``os._exit(137)``s its worker process: reclaims consume attempts, so it ends ``failed`` after
  exactly ``max_attempts`` (3) within 3 x (lease + max backoff) + 10 s;
- a run whose stored arguments the current code cannot decode: ``failed`` at once with a typed error;
- a run of a job no worker defines: it stays ``pending``, never claimed (no hot loop).
Every healthy run succeeds, and the crashes never stall the queue for longer than lease + 2 s.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import replace

from harness.checker import StoreState
from harness.clientlog import Op
from harness.faults import Fault
from harness.scenario import Scenario, scale

from runlane.store import NewRun, create_store

SLACK = 1.0


def _insert_raw(url: str, runs: list[NewRun]) -> list[int]:
    """Runs written straight into the store, bypassing the client's validation (other code wrote them)."""

    async def go() -> list[int]:
        store = create_store(url)
        await store.open()
        try:
            return [r.id for r in await store.insert_runs(runs)]
        finally:
            await store.close()

    return asyncio.run(go())


def test_poison_runs(scenario: Scenario) -> None:
    timing = scenario.timing
    healthy = scale(300, 5_000)
    per_kind = scale(2, 17)
    rng = scenario.random
    scenario.trigger_many_logged(
        "ledger_probe",
        [{"key": f"ok{i}", "duration_ms": rng.randint(10, 100)} for i in range(healthy)],
    )
    scenario.trigger_many_logged("crash_probe", [{"key": f"crash{i}"} for i in range(per_kind)])
    undecodable = _insert_raw(
        scenario.url,
        [
            NewRun(job="ledger_probe", args={"key": f"bad{i}", "duration_ms": "soon"}, max_attempts=10)
            for i in range(per_kind)
        ],
    )
    unknown = _insert_raw(
        scenario.url,
        [NewRun(job="no_such_job", args={"key": f"ghost{i}"}, max_attempts=3) for i in range(per_kind)],
    )
    now = time.time()
    for i, run_id in enumerate(undecodable):
        scenario.clientlog.ops.append(Op(f"bad{i}", "ledger_probe", now, now, "ok", run_id))
    scenario.pool(4, concurrency=8, restart_delay=0.5)

    # Everything but the unknown-job runs ends.
    deadline = time.time() + 120
    while True:
        state = scenario.state()
        active = [r for r in state.runs.values() if not r.status.is_terminal and r.job != "no_such_job"]
        if not active:
            break
        assert time.time() < deadline, f"{len(active)} runs never ended:\n{scenario.logs()}"
        time.sleep(0.25)
    recovered = time.time()

    executions = scenario.ledger.executions()
    # The crash job takes its process down right after writing its ledger row: log that as the fault.
    for e in executions:
        if e.job == "crash_probe":
            scenario.faults.add(Fault("crash", e.pid, e.t_start, e.t_start, "poison os._exit(137)"))

    retry = 0.2, 1.0  # crash_probe: Retry(attempts=3, backoff=0.2, max_delay=1.0)
    for run in state.runs.values():
        if run.job == "crash_probe":
            assert run.status.value == "failed" and run.attempt == 3, run
            attempts = state.attempts[run.id]
            assert [a.error.type if a.error else None for a in attempts] == ["WorkerLost"] * 3, attempts
            assert run.finished_at is not None
            took = run.finished_at.timestamp() - attempts[0].started_at.timestamp()
            assert took <= 3 * (timing.lease_timeout + retry[1]) + 10, f"crash poison took {took:.1f} s"
        elif run.id in undecodable:
            # Decoded once, failed at once; earlier attempts can only be losses to a co-located crash.
            assert run.status.value == "failed", run
            assert run.error is not None and run.error.type == "InvalidArguments", run.error
            kinds = [a.error.type if a.error else None for a in state.attempts[run.id]]
            assert kinds[-1] == "InvalidArguments" and set(kinds[:-1]) <= {"WorkerLost"}, kinds
        elif run.job == "no_such_job":
            assert run.status.value == "pending" and run.attempt == 0, run
            assert state.attempts[run.id] == [], "a worker claimed a run of a job it does not define"
        else:
            assert run.status.value == "succeeded", run

    # No stall: while some healthy run was claimable (created once the workers were up, or reclaimed after a
    # crash took its worker down), healthy claims never paused for longer than lease + 2 s, however often
    # poison killed workers. (A backlog waits its turn; that is throughput, not a stall.)
    workers_up = min(e.t_start for e in executions)
    ready: list[float] = []
    claims: list[float] = []
    for run in state.runs.values():
        if run.job != "ledger_probe" or run.id in undecodable:
            continue
        ready.append(max(run.created_at.timestamp(), workers_up))
        for a in state.attempts[run.id]:
            claims.append(a.started_at.timestamp())
            if a.error is not None and a.error.type == "WorkerLost" and a.finished_at is not None:
                ready.append(a.finished_at.timestamp())
    ready.sort()
    claims.sort()
    worst = 0.0
    r = 0
    for i, (a, b) in enumerate(itertools.pairwise([workers_up, *claims])):
        while r < len(ready) and ready[r] <= a:
            r += 1
        if r - i > 0:  # claimable runs were waiting at ``a``
            worst = max(worst, b - a)
    assert worst <= timing.lease_timeout + 2 + SLACK, (
        f"healthy claims stalled for {worst:.1f} s\n{scenario.logs()}"
    )

    checked = StoreState(
        {k: v for k, v in state.runs.items() if v.job != "no_such_job"},
        {k: v for k, v in state.attempts.items() if k not in unknown},
        {k: v for k, v in state.events.items() if k not in unknown},
    )
    from harness.checker import check

    report = check(
        checked,
        scenario.ledger.executions(),
        scenario.clientlog.snapshot(),
        scenario.faults.snapshot(),
        recovered_at=recovered,
        expected_failures=lambda run: run.job == "crash_probe" or run.id in undecodable,
    )
    report = replace(report, faults=scenario.faults.count("crash"))
    scenario.record(report, poison=3 * per_kind, healthy=healthy, worst_stall_s=round(worst, 2))
    print(report.summary(), f"worst stall {worst:.2f} s")
    report.assert_ok(scenario.logs())
