"""T09 power_loss_durability: kill every process at once (trigger clients and workers) after a burst of
acknowledged triggers and completions, restart, and find every acknowledged write still there.

LazyFS (dropping un-fsynced writes) needs FUSE, which this machine does not offer, so both tiers run the
``kill -9`` variant: the full tier runs more and bigger cycles (20 cycles of 1,000), the smoke tier 3 cycles
of 200. A kill keeps the OS page cache, so it proves crash consistency (every acknowledged commit is in the
database, the file is intact) but not fsync; for that the test pins the shipped durability setting instead:
SQLite connections use ``synchronous=FULL`` (in WAL mode, NORMAL could lose the last commits on power loss),
and the PostgreSQL sessions keep ``synchronous_commit`` on.

"Acknowledged to the worker" cannot be recorded from inside a job (its body ends before its finish is
written), so the test process takes that role: right before each kill it reads which runs the store reports
terminal; each of those commits was acknowledged by the store, and must still be terminal, with the same
status and attempt, after the restart.
"""

from __future__ import annotations

import sqlite3
import time

import psycopg
from harness.loadgen import Clients
from harness.scenario import Scenario, scale

from runlane import RunFilter, RunStatus
from runlane.store.sqlite.connection import connect

TERMINAL = tuple(s for s in RunStatus if s.is_terminal)


def _terminal(scenario: Scenario) -> dict[int, tuple[str, int]]:
    """Runs the store reports terminal, with their status and attempt."""
    runs = scenario.client.list_runs(RunFilter(status=TERMINAL), limit=None)
    return {r.id: (r.status.value, r.attempt) for r in runs}


def _assert_shipped_durability(scenario: Scenario) -> None:
    if scenario.backend == "sqlite":
        conn = connect(scenario.url.removeprefix("sqlite:///"), writer=True)
        try:
            assert conn.execute("PRAGMA synchronous").fetchone() == (2,), (
                "the store must ship synchronous=FULL"
            )
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        finally:
            conn.close()
    else:
        with psycopg.connect(scenario.url) as conn:
            row = conn.execute("SHOW synchronous_commit").fetchone()
        assert row is not None and row[0] != "off", "acknowledged PostgreSQL commits must be flushed"


def _integrity(scenario: Scenario) -> None:
    if scenario.backend == "sqlite":
        with sqlite3.connect(scenario.url.removeprefix("sqlite:///")) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_power_loss_durability(scenario: Scenario) -> None:
    _assert_shipped_durability(scenario)
    cycles, per_cycle = scale(3, 20), scale(200, 1_000)
    clients = Clients(scenario.env(), scenario.workdir, scenario.faults)
    acknowledged_terminal: dict[int, tuple[str, int]] = {}
    try:
        for cycle in range(cycles):
            pool = scenario.pool(2, concurrency=8, restart_delay=None)
            clients.start(f"c{cycle}", rate=per_cycle, max_ms=20)
            done_before = len(acknowledged_terminal)
            deadline = time.monotonic() + 60
            while True:
                acked = sum(
                    1 for op in clients.ops() if op.outcome == "ok" and op.key.startswith(f"c{cycle}-")
                )
                seen = _terminal(scenario)
                if acked >= per_cycle and len(seen) - done_before >= per_cycle:
                    break
                assert time.monotonic() < deadline, f"cycle {cycle}: {acked} acked, {len(seen)} terminal"
                time.sleep(0.1)
            acknowledged_terminal = _terminal(scenario)  # every one of these commits was acknowledged
            clients.signal_all()
            pool.kill_all(f"power cut {cycle}")
            clients.wait()

            # "Restart": fresh processes open the store the dead ones left behind.
            _integrity(scenario)
            ok = {op.run_id for op in clients.ops() if op.outcome == "ok"}
            existing = {r.id for r in scenario.client.list_runs(RunFilter(), limit=None)}
            assert not ok - existing, f"acknowledged triggers lost: {sorted(ok - existing)[:20]}"
            after = _terminal(scenario)
            changed = {
                run_id: (was, after.get(run_id))
                for run_id, was in acknowledged_terminal.items()
                if after.get(run_id) != was
            }
            assert not changed, f"acknowledged completions lost or changed: {list(changed.items())[:20]}"

        scenario.pool(2, concurrency=8, restart_delay=None)
        recovered = scenario.wait_terminal(60.0)
        scenario.clientlog.ops.extend(clients.ops())
        report = scenario.check(recovered_at=recovered)
        ops = scenario.clientlog.snapshot()
        scenario.record(report, cycles=cycles, triggers_ok=sum(op.outcome == "ok" for op in ops))
        print(report.summary(), f"ok triggers={sum(op.outcome == 'ok' for op in ops)}")
        report.assert_ok(scenario.logs() + clients.output())
        errors = [op.error for op in ops if op.outcome == "failed"]
        assert not errors, errors[:5]
        _integrity(scenario)
    finally:
        clients.close()
