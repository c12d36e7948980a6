"""T15 transactional_enqueue_atomicity: runs triggered with ``client.trigger(..., connection=conn)`` inside
caller transactions, of which 10 % are SIGKILLed before COMMIT and 40 % rolled back, while 4 idle workers poll
every 0.1 s and LISTEN.

Runs must exist iff their transaction committed (0 phantom, 0 missing — the caller's own row in the same
transaction is the server-side commit log); no worker may start a run before its transaction's COMMIT was
sent; and the wake-up reaches an idle worker within 100 ms p99 of the commit (COMMIT sent in the triggering
process → ``t_start`` in the ledger, same host clock; the figure is printed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from harness import pgwatch, txn_lane
from harness.clientlog import Op
from harness.procs import Timing
from harness.scenario import FULL, Scenario, scale

pytestmark = pytest.mark.serial  # CPU-heavy or measures latency: runs alone (scripts/test)

LANES, WORKERS = 4, 4
WAKEUP_P99_S = 0.100


@dataclass
class Txn:
    n: int
    action: str  # commit | rollback | kill
    hold: float
    run_id: int | None = None
    outcome: str | None = None  # committed | rolled_back | killed
    commit_sent: float | None = None
    commit_done: float | None = None


@dataclass
class Lanes:
    """Lane processes (``harness.txn_lane``), one driver thread each."""

    env: dict[str, str]
    scenario: Scenario
    errors: list[BaseException] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(self, count: int) -> None:
        for i in range(count):
            with open(self.scenario.workdir / f"lane-{i}.log", "a") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "harness.txn_lane"],
                    env=self.env,
                    cwd=self.scenario.workdir,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    bufsize=1,
                )
            self.procs.append(proc)
        for proc in self.procs:
            assert self._read(proc) == {"event": "ready_for_work"}

    @staticmethod
    def _read(proc: subprocess.Popen[str]) -> dict[str, Any]:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"lane {proc.pid} exited ({proc.poll()})"
        event: dict[str, Any] = json.loads(line)
        return event

    def drive(self, proc: subprocess.Popen[str], txns: list[Txn]) -> None:
        assert proc.stdin is not None
        try:
            for txn in txns:
                proc.stdin.write(json.dumps({"n": txn.n, "action": txn.action, "hold": txn.hold}) + "\n")
                proc.stdin.flush()
                event = self._read(proc)
                assert event["event"] == "triggered", event
                txn.run_id = event["run_id"]
                event = self._read(proc)
                if event["event"] == "doomed":  # the process that triggered waits before COMMIT: kill it
                    self.scenario.faults.instant("client_kill", event["pid"], f"before COMMIT of txn {txn.n}")
                    os.kill(event["pid"], signal.SIGKILL)
                    proc.stdin.write(json.dumps({"reap": txn.n}) + "\n")
                    proc.stdin.flush()
                    event = self._read(proc)
                    assert event["event"] == "reaped" and os.WTERMSIG(event["status"]) == signal.SIGKILL, (
                        event
                    )
                    txn.outcome = "killed"
                elif event["event"] == "committed":
                    txn.outcome, txn.commit_sent, txn.commit_done = "committed", event["sent"], event["done"]
                else:
                    txn.outcome = "rolled_back"
        except BaseException as exc:
            self.errors.append(exc)

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:  # a dead lane's pipe
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.mark.postgres
def test_transactional_enqueue_atomicity(pg_scenario: Scenario) -> None:
    scenario = pg_scenario
    scenario.timing = Timing(poll_interval=0.1)
    url = scenario.url
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {txn_lane.OUTBOX} (txn integer PRIMARY KEY)")
        conn.execute(f"TRUNCATE {txn_lane.OUTBOX}")
    scenario.pool(WORKERS, concurrency=8, env=scenario.env(RUNLANE_URL=pgwatch.worker_url(url)))
    pgwatch.wait_listeners(url, WORKERS, timeout=60)

    rng = scenario.random
    total = scale(500, 5_000)
    txns = []
    for n in range(total):
        roll = rng.random()
        action = "kill" if roll < 0.10 else "rollback" if roll < 0.50 else "commit"
        txns.append(Txn(n, action, hold=rng.uniform(0.005, 0.05)))
    lanes = Lanes(scenario.env(), scenario)
    try:
        lanes.start(LANES)
        threads = [
            threading.Thread(target=lanes.drive, args=(proc, txns[i::LANES]), name=f"t15-lane-{i}")
            for i, proc in enumerate(lanes.procs)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + (3600 if FULL else 120)
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "lanes stalled"
    finally:
        lanes.close()  # a stalled lane is killed, which ends its driver's read
    assert not lanes.errors, lanes.errors
    expected = {"commit": "committed", "rollback": "rolled_back", "kill": "killed"}
    assert all(t.outcome == expected[t.action] for t in txns)

    committed = [t for t in txns if t.outcome == "committed"]
    scenario.clientlog.ops.extend(
        Op(f"t{t.n}", "ledger_probe", t.commit_sent or 0.0, t.commit_done, "ok", t.run_id) for t in committed
    )
    recovered = scenario.wait_terminal(60.0, expected=len(committed))
    report = scenario.check(recovered_at=recovered)
    print(report.summary())
    report.assert_ok(scenario.logs())  # lost = missing committed runs, unexpected = phantom runs

    with psycopg.connect(url) as conn:
        outbox = {r[0] for r in conn.execute(f"SELECT txn FROM {txn_lane.OUTBOX}")}
        ids = {r[0] for r in conn.execute("SELECT id FROM runlane_runs")}
    assert outbox == {t.n for t in committed}, "the caller's own writes must commit exactly when it did"
    assert ids == {t.run_id for t in committed}, {
        "phantom": sorted(ids - {t.run_id for t in committed})[:20],
        "missing": sorted({t.run_id for t in committed} - ids)[:20],
    }

    # No worker started a run before its transaction's COMMIT was sent; wake-up latency from that moment.
    by_run = {t.run_id: t for t in committed}
    starts: dict[int, float] = {}
    for e in scenario.ledger.executions():
        txn = by_run.get(e.run_id)
        assert txn is not None, f"execution of run {e.run_id}, which no committed transaction created"
        sent = txn.commit_sent
        assert sent is not None and e.t_start >= sent, f"run {e.run_id} started before its COMMIT was sent"
        starts[e.run_id] = min(starts.get(e.run_id, e.t_start), e.t_start)
    latencies = sorted(starts[t.run_id] - (t.commit_sent or 0.0) for t in committed if t.run_id in starts)
    assert len(latencies) == len(committed)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    p50 = latencies[len(latencies) // 2]
    print(
        f"commit→start p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms over {len(latencies)} commits; "
        f"{scenario.faults.count('client_kill')} triggering processes killed"
    )
    scenario.record(report, wakeup_p50_ms=round(p50 * 1000, 1), wakeup_p99_ms=round(p99 * 1000, 1))
    assert scenario.faults.count("client_kill") == sum(t.action == "kill" for t in txns)
    assert p99 <= WAKEUP_P99_S, f"wake-up p99 {p99 * 1000:.1f} ms > {WAKEUP_P99_S * 1000:.0f} ms"
