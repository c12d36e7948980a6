"""T04 partition_worker_store: one worker at a time loses the store (its connections black-holed by its own
proxy) for 3 x lease while it runs attempts, then the network heals.

Its attempts must fence themselves: after the heal nothing they did is committed, their runs finish on other
workers, re-executions happen only for runs that were in flight on the cut-off worker, and the worker starts
claiming again within 5 s without being restarted. Another client triggers 50 runs/s throughout.
"""

from __future__ import annotations

import time

import pytest
from harness.netfaults import ProxiedWorkers, TriggerLoad, busy_slots, resumed_within, stale_commits, ts
from harness.scenario import Scenario, scale


@pytest.mark.postgres
def test_partition_worker_store(pg_scenario: Scenario) -> None:
    scenario = pg_scenario
    rng = scenario.random
    lease = scenario.timing.lease_timeout
    runs, cycles = scale(300, 5_000), scale(2, 10)
    # 0.5-3 s per the plan; the smoke run caps it at 1 s to fit its 20 s (the 50/s triggers keep every
    # worker busy through both partitions anyway).
    longest = scale(1000, 3000)
    backlog = [{"key": f"b{i}", "duration_ms": rng.randint(500, longest)} for i in range(runs)]
    resumes: list[tuple[int | None, float | None]] = []
    partitions = []

    with ProxiedWorkers(scenario, 4, concurrency=8) as net:
        scenario.trigger_many_logged("ledger_probe", backlog)
        with TriggerLoad(scenario, scenario.client, rate=50, prefix="t"):
            for cycle in range(cycles):
                deadline = time.time() + 30
                while not (candidates := busy_slots(net.pool, scenario.ledger.executions())):
                    assert time.time() < deadline, "no worker was running anything to cut off"
                    time.sleep(0.05)
                slot = rng.choice(candidates)
                fault = net.partition(slot, 3 * lease, f"cycle {cycle}")
                partitions.append(fault)
                # Resumption is judged from the ledger: the healed worker starts new executions itself.
                deadline = fault.until + 5.0
                while (
                    resumed := resumed_within(scenario.ledger.executions(), slot.pid, fault.until, 5.0)
                ) is None and time.time() < deadline:
                    time.sleep(0.1)
                resumes.append((slot.pid, resumed))
        recovered = scenario.wait_terminal(scale(60, 900))  # full: the backlog outlasts the faults
        slots = list(net.pool.slots)

    state = scenario.state()
    report = scenario.check(recovered_at=recovered)
    stale = [line for f in partitions for line in stale_commits(state, f.pid, cut=f.t_start, heal=f.until)]
    report.extra.update(partitions=len(partitions), stale_commits=len(stale), resumes=resumes)
    scenario.record(report)
    print(report.summary(), f"resumes={resumes}")
    report.assert_ok(scenario.logs())

    assert not stale, "partitioned attempts committed after the heal:\n" + "\n".join(stale[:20])
    for pid, resumed in resumes:
        assert resumed is not None, f"worker {pid} did not claim again within 5 s of the heal"
    for slot in slots:
        assert len(slot.pids) == 1, f"worker slot {slot.index} was restarted: {slot.pids}"

    # The runs cut off with their worker finished elsewhere (by a later attempt), none is left behind.
    executions = scenario.ledger.executions()
    for f in partitions:
        cut_off = {
            e.run_id
            for e in executions
            if e.pid == f.pid and e.t_start < f.t_start and (e.t_end is None or e.t_end > f.t_start)
        }
        assert cut_off, f"the partition of pid {f.pid} cut off no attempt"
        for run_id in cut_off:
            run = state.runs[run_id]
            last = state.attempts[run_id][-1]
            assert run.status.value == "succeeded", f"run {run_id} ended {run.status.value}"
            stale_attempts = [
                a.number
                for a in state.attempts[run_id]
                if a.worker_id and str(f.pid) in a.worker_id and (ts(a.started_at) or 0) < f.t_start
            ]
            assert last.number > max(stale_attempts, default=0), (
                f"run {run_id}: its result came from the cut-off attempt {last.number}"
            )
