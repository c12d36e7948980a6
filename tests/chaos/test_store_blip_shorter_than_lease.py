"""T07 store_blip_shorter_than_lease: the store goes away for less than a lease while runs drain and a client
keeps triggering (each request with a dedup id, repeated after an error).

Smoke (CI): PostgreSQL through proxies, two 1-second blips (one a partition, one a restart as clients see it:
every connection reset, new ones unanswered), lease 5 s; SQLite: a foreign process holds ``BEGIN EXCLUSIVE``
for the blip. Full: real immediate stop/start of a throwaway cluster (down 3 s) every 60 s for 10 min, lease
30 s; SQLite locked 3 s every 60 s.

Nothing may be reclaimed or executed twice: heartbeats resume before any lease expires; every worker claims
again within 5 s of the store's return without a restart; every trigger that returned ok ends terminal.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness.checker import WORKER_LOST
from harness.faults import Fault
from harness.netfaults import ProxiedWorkers, TriggerLoad, proxy_to, resumed_within
from harness.pgcluster import PgCluster
from harness.procs import Timing
from harness.scenario import FULL, Scenario, scale

from runlane import Runlane

BLIP = scale(1, 3)
RECONNECT = 5.0  # workers claim again within this long after the store is back
FIRST_BLIP, INTERVAL = scale(1, 60), scale(BLIP + int(RECONNECT) + 1, 60)  # windows do not overlap blips
BLIPS = scale(2, 10)
TIMING = Timing(
    lease_timeout=scale(5, 30), heartbeat_interval=scale(1, 10), reaper_interval=1.0, poll_interval=0.5
)

# Holds SQLite's write lock from another process, as a backup tool or a careless script would.
_LOCKER = (
    "import sqlite3, sys, time\n"
    "conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)\n"
    "conn.execute('BEGIN EXCLUSIVE')\n"
    "print('locked', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
    "conn.execute('COMMIT')\n"
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def blip_scenario(request: pytest.FixtureRequest, tmp_path: Path, seed: int) -> Iterator[Scenario]:
    """The scenario on SQLite, on the shared PostgreSQL server (smoke, through proxies) or on a throwaway
    cluster that the full tier really stops."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'runlane.db'}"
    elif FULL:
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        url = cluster.create_database(f"t07_{seed}")
    else:
        url = request.getfixturevalue("pg_url")
    scenario = Scenario("store_blip_shorter_than_lease", request.param, url, tmp_path, seed, timing=TIMING)
    scenario.migrate()
    try:
        yield scenario
    finally:
        scenario.close()


def _lock_sqlite(scenario: Scenario, seconds: float) -> Fault:
    path = scenario.url.removeprefix("sqlite:///")
    argv = [sys.executable, "-c", _LOCKER, path, str(seconds)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked", "the foreign process never got the lock"
        fault = scenario.faults.begin("blip", None, f"foreign BEGIN EXCLUSIVE for {seconds} s")
        proc.wait(timeout=seconds + 30)
        scenario.faults.end(fault)
    return fault


def test_store_blip_shorter_than_lease(blip_scenario: Scenario, request: pytest.FixtureRequest) -> None:
    scenario = blip_scenario
    rng = scenario.random
    postgres = scenario.backend == "postgres"
    runs = scale(2_000, 50_000 if postgres else 10_000)
    # About 8 s of work for 32 slots in the smoke run: the backlog outlasts both blips.
    backlog = [{"key": f"b{i}", "duration_ms": rng.randint(20, 230)} for i in range(runs)]
    rate = scale(20, 200)
    blips: list[Fault] = []
    reconnects: list[float] = []
    client_app: Runlane | None = None
    net: ProxiedWorkers | None = None
    client_proxy = None

    blip: Callable[[int], Fault]
    if not postgres:
        pool = scenario.pool(4, concurrency=8)
        client = scenario.client

        def blip(i: int) -> Fault:
            return _lock_sqlite(scenario, BLIP)

    elif FULL:
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        pool = scenario.pool(4, concurrency=8)
        client = scenario.client

        def blip(i: int) -> Fault:
            fault = scenario.faults.begin("blip", None, f"immediate stop, down {BLIP} s")
            cluster.restart("immediate", down_for=BLIP)
            scenario.faults.end(fault)
            return fault

    else:
        net = ProxiedWorkers(scenario, 4, concurrency=8)
        pool = net.pool
        client_proxy = proxy_to(scenario.url)  # the triggering client loses the store too
        client_app = Runlane(client_proxy.url_for(scenario.url), lease_timeout=TIMING.lease_timeout)
        client = client_app.client

        def blip(i: int) -> Fault:
            restart = i % 2 == 1
            assert net is not None and client_proxy is not None
            fault = net.cut_all(
                "blip", "restart: connections reset" if restart else "partition", reset=restart
            )
            client_proxy.blackhole(True)
            if restart:
                client_proxy.reset_all()
            time.sleep(BLIP)  # the fault's length
            client_proxy.blackhole(False)
            net.heal_all(fault)
            return fault

    try:
        scenario.trigger_many_logged("ledger_probe", backlog)
        deadline = time.time() + 60
        while {e.pid for e in scenario.ledger.executions()} < {s.pid for s in pool.slots}:
            assert time.time() < deadline, "the workers never all started"  # the blips hit running workers
            time.sleep(0.05)
        started = time.time()
        with TriggerLoad(scenario, client, rate=rate, prefix="t", dedup=True, retry=True) as load:
            for i in range(BLIPS):
                due = started + FIRST_BLIP + i * INTERVAL
                time.sleep(max(due - time.time(), 0.0))  # the nemesis schedule
                blips.append(blip(i))
            # Every worker claims again within 5 s of the store's return (judged from the ledger).
            for fault in blips:
                for slot in pool.slots:
                    while (
                        latency := resumed_within(
                            scenario.ledger.executions(), slot.pid, fault.until, RECONNECT
                        )
                    ) is None:
                        assert time.time() < fault.until + RECONNECT + 1, (
                            f"worker {slot.pid} did not claim within {RECONNECT} s after the blip ending "
                            f"{fault.until:.3f}\n{scenario.logs()}"
                        )
                        time.sleep(0.1)
                    reconnects.append(latency)
        recovered = scenario.wait_terminal(scale(60, 900))  # full: the backlog outlasts the faults
        restarted = [(s.index, s.pids, s.alive) for s in pool.slots if len(s.pids) != 1 or not s.alive]
    finally:
        if net is not None:
            net.close()
        if client_app is not None:
            client_app.close()
        if client_proxy is not None:
            client_proxy.close()

    state = scenario.state()
    report = scenario.check(recovered_at=recovered, lease_expiry_justifies=False)
    executions = scenario.ledger.executions()
    twice = sorted(run_id for run_id, n in Counter(e.run_id for e in executions).items() if n > 1)
    reclaimed = [
        f"run {run_id} attempt {a.number}: {a.error} (claimed {a.started_at.timestamp():.3f}, blips "
        f"{[(round(f.t_start, 3), round(f.until, 3)) for f in blips]})"
        for run_id, attempts in state.attempts.items()
        for a in attempts
        if a.error is not None and a.error.type == WORKER_LOST
    ]
    report.extra.update(
        blips=len(blips),
        reclaims=len(reclaimed),
        requests=load.requests,
        trigger_retries=load.retries,
        reconnect_max_s=round(max(reconnects, default=0.0), 2),
    )
    scenario.record(report)
    print(report.summary(), report.extra)
    report.assert_ok(scenario.logs())

    assert len(blips) == BLIPS
    assert not reclaimed, "runs reclaimed during a blip shorter than the lease:\n" + "\n".join(reclaimed[:20])
    assert not twice, f"runs executed more than once: {twice[:20]}"
    assert report.duplicates_justified == 0
    again = {r.id: (r.attempt, state.attempts[r.id]) for r in state.runs.values() if r.attempt != 1}
    assert not again, f"runs needed another attempt: {again}"
    assert not restarted, f"workers restarted or dead (slot, pids, alive): {restarted}"
    if not postgres:
        for attempts in state.attempts.values():
            for a in attempts:
                message = str(a.error or "")
                assert "locked" not in message and "SQLITE_BUSY" not in message, message
