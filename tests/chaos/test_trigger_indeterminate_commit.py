"""T10 trigger_indeterminate_commit: a proxy between the client and PostgreSQL resets the client's connection
right after forwarding 10 % of trigger statements, before the server's reply gets through. The trigger ran (a
single autocommit INSERT, see runlane/store/postgres/insert.py), but its caller sees a connection error.

Each logical request carries a dedup id and is repeated until it returns a run or a RunConflict. Exactly one
run must exist per request, and every RunConflict must name that run. (The plan's HTTP variant through
``runlane serve`` waits for the server to exist.)
"""

from __future__ import annotations

import random
import threading
from collections import defaultdict

import pytest
from harness.checker import Report
from harness.netfaults import proxy_to
from harness.scenario import Scenario, scale

from runlane import Runlane

MARKER = "t10-req-"  # in every trigger's dedup id: the proxy recognises trigger statements by it
CLIENTS = 4
MAX_TRIES = 50


@pytest.mark.postgres
def test_trigger_indeterminate_commit(pg_scenario: Scenario) -> None:
    scenario = pg_scenario
    requests = scale(1_000, 20_000)
    proxy = proxy_to(scenario.url)
    # The dedup id travels as a parameter of every trigger statement, prepared or not, so it marks them
    # better than the SQL text, which a prepared statement no longer sends.
    proxy.reset_after(MARKER.encode(), 0.10, random.Random(scenario.seed))
    app = Runlane(proxy.url_for(scenario.url), lease_timeout=scenario.timing.lease_timeout)
    outcomes: dict[str, list[tuple[str, int | None]]] = defaultdict(list)  # dedup id -> (outcome, run id)
    errors: list[str] = []
    lock = threading.Lock()

    def client_loop(worker: int) -> None:
        client = app.client
        for i in range(worker, requests, CLIENTS):
            dedup = f"{MARKER}{i:06d}"
            args = {"key": dedup, "duration_ms": 10}
            for _ in range(MAX_TRIES):
                op = scenario.clientlog.trigger(client, "ledger_probe", args, dedup_id=dedup)
                with lock:
                    outcomes[dedup].append((op.outcome, op.run_id))
                if op.outcome == "ok" or (
                    op.outcome == "failed" and (op.error or "").startswith("RunConflict")
                ):
                    break
                if op.outcome == "failed":
                    with lock:
                        errors.append(f"{dedup}: {op.error}")
                    break
            else:
                with lock:
                    errors.append(f"{dedup}: still indeterminate after {MAX_TRIES} tries")

    try:
        threads = [
            threading.Thread(target=client_loop, args=(w,), name=f"t10-client-{w}") for w in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a client thread is stuck"
    finally:
        app.close()
        proxy.close()

    assert not errors, "\n".join(errors[:20])
    state = scenario.state()
    runs_by_dedup: dict[str | None, list[int]] = defaultdict(list)
    for run in state.runs.values():
        runs_by_dedup[run.dedup_id].append(run.id)
    missing = [d for d in outcomes if not runs_by_dedup.get(d)]
    extra = {d: ids for d, ids in runs_by_dedup.items() if len(ids) > 1 or d not in outcomes}
    wrong = [
        f"{d}: {outcome} names run {run_id}, the run is {runs_by_dedup.get(d)}"
        for d, tries in outcomes.items()
        for outcome, run_id in tries
        if outcome != "indeterminate" and [run_id] != runs_by_dedup.get(d)
    ]
    indeterminate = sum(1 for tries in outcomes.values() for o, _ in tries if o == "indeterminate")
    conflicts = sum(1 for tries in outcomes.values() for o, _ in tries if o == "failed")
    report = Report(runs=len(state.runs), faults=proxy.resets_injected)
    report.extra.update(
        requests=requests,
        resets=proxy.resets_injected,
        indeterminate=indeterminate,
        conflicts=conflicts,
        missing=len(missing),
        extra=len(extra),
        wrong_ids=len(wrong),
    )
    scenario.record(report)
    print(f"T10: {report.extra}")

    assert len(outcomes) == requests
    assert not missing, f"requests with no run: {missing[:20]}"
    assert not extra, (
        f"requests with more than one run (or runs of no request): {dict(list(extra.items())[:20])}"
    )
    assert not wrong, "\n".join(wrong[:20])
    assert proxy.resets_injected >= requests * 0.05, f"only {proxy.resets_injected} resets injected"
    # A reset after the commit makes the repeat meet the run it created: the case under test happened.
    assert conflicts > 0 and indeterminate >= proxy.resets_injected
