"""T08 store_outage_longer_than_lease: every worker (each one also a reaper and a scheduler) loses the store
for 4 x lease while all runs are in flight, then every connection heals at once.

No attempt whose lease expired during the outage may commit its result after the heal, however its late
statements reach the server; the runs are reclaimed and finish within lease + reaper interval + the longest
job + 30 s; re-executions stay within the runs that were in flight and are each explained by the outage.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from harness.netfaults import ProxiedWorkers, pid_of, stale_commits, ts
from harness.scenario import Scenario, scale

WORKERS = 4


@pytest.mark.postgres
def test_store_outage_longer_than_lease(pg_scenario: Scenario) -> None:
    scenario = pg_scenario
    rng = scenario.random
    timing = scenario.timing
    runs = scale(200, 3_000)
    longest_ms = scale(4_000, 20_000)
    load = [{"key": f"k{i}", "duration_ms": rng.randint(1_000, longest_ms)} for i in range(runs)]
    concurrency = -(-runs // WORKERS)  # every run in flight at once, as the plan's load says

    with ProxiedWorkers(scenario, WORKERS, concurrency=concurrency) as net:
        scenario.trigger_many_logged("ledger_probe", load)
        deadline = time.time() + 60
        while scenario.ledger.count() < runs:  # all started: the outage cuts every one of them off
            assert time.time() < deadline, f"only {scenario.ledger.count()} of {runs} runs started"
            time.sleep(0.05)
        outage = net.cut_all("outage", f"{WORKERS} workers, 4 x lease")
        time.sleep(4 * timing.lease_timeout)  # the fault's length
        net.heal_all(outage)
        bound = timing.lease_timeout + timing.reaper_interval + longest_ms / 1000 + 30
        recovered = scenario.wait_terminal(bound + 5)
        slots = list(net.pool.slots)

    state = scenario.state()
    executions = scenario.ledger.executions()
    report = scenario.check(recovered_at=recovered)
    cut, heal = outage.t_start, outage.until
    stale = stale_commits(state, None, cut=cut, heal=heal)
    # In flight: an attempt had started and had not been recorded as ended when the store went away.
    in_flight = {
        run_id
        for run_id, attempts in state.attempts.items()
        for a in attempts
        if (ts(a.started_at) or 0) < cut and (a.finished_at is None or (ts(a.finished_at) or 0) >= cut)
    }
    starts = Counter(e.run_id for e in executions)
    duplicated = {run_id for run_id, n in starts.items() if n > 1}
    report.extra.update(
        in_flight=len(in_flight), duplicated=len(duplicated), stale_commits=len(stale), outage_s=heal - cut
    )
    scenario.record(report)
    print(report.summary(), f"in_flight={len(in_flight)} duplicated={len(duplicated)}")
    report.assert_ok(scenario.logs())

    assert not stale, "attempts cut off past their lease committed after the heal:\n" + "\n".join(stale[:20])
    assert recovered - heal <= bound, (
        f"runs took {recovered - heal:.1f} s after the heal (bound {bound:.1f} s)"
    )
    assert len(in_flight) > 0
    assert duplicated <= in_flight, (
        f"re-executed runs that were not in flight: {sorted(duplicated - in_flight)}"
    )
    for slot in slots:
        assert len(slot.pids) == 1, f"worker slot {slot.index} was restarted: {slot.pids}"

    # The ledger and the attempt rows agree: each result comes from an execution that ran to its end in the
    # process that owned the attempt, and the stale executions were superseded by a later attempt.
    by_attempt = {(e.run_id, e.attempt): e for e in executions}
    for run_id, run in state.runs.items():
        assert run.status.value == "succeeded", f"run {run_id} ended {run.status.value}"
        final = state.attempts[run_id][-1]
        execution = by_attempt.get((run_id, final.number))
        assert execution is not None, f"run {run_id}: its succeeded attempt {final.number} never executed"
        assert execution.outcome == "done" and execution.pid == pid_of(final.worker_id), (
            f"run {run_id}: attempt {final.number} of {final.worker_id} vs ledger {execution}"
        )
        assert execution.t_end is not None and execution.t_end <= (ts(final.finished_at) or 0) + 0.5
        if run_id in in_flight:
            assert (ts(final.started_at) or 0) >= heal - 0.5 or (ts(final.finished_at) or 0) < cut, (
                f"run {run_id}: result of attempt {final.number}, started before the outage"
            )
