"""Real worker processes on one store: every-second fires happen exactly once across 4 schedulers, and job
limits hold across 2 processes (checked against an external ledger and the store's own records)."""

from __future__ import annotations

import itertools
import signal
import sqlite3
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import Cli, wait_for
from conftest import make_cli

from runlane import RunStatus
from runlane.models import RunFilter

pytestmark = pytest.mark.slow

FLOW_APP = textwrap.dedent(
    '''
    """Ledger-writing jobs: each execution appends (job, run id, scheduled_at, start, end, pid) to LEDGER."""
    import os
    import sqlite3
    import time

    from runlane import JobContext, Runlane

    app = Runlane()
    LEDGER = os.environ["LEDGER"]


    def record(job, ctx, start, end):
        conn = sqlite3.connect(LEDGER, timeout=30)
        with conn:
            scheduled = ctx.scheduled_at.timestamp() if ctx.scheduled_at else None
            conn.execute(
                "INSERT INTO ledger VALUES (?, ?, ?, ?, ?, ?)",
                (job, ctx.run_id, scheduled, start, end, os.getpid()),
            )
        conn.close()


    @app.job(schedule="* * * * * *", overlap="allow")
    def beat(ctx: JobContext) -> None:
        now = time.time()
        record("beat", ctx, now, now)


    @app.job(max_concurrency=3)
    def capped(n: int, ctx: JobContext) -> None:
        start = time.time()
        time.sleep(0.02)
        record("capped", ctx, start, time.time())


    @app.job(rate_limit="40/s")
    def metered(n: int, ctx: JobContext) -> None:
        now = time.time()
        record("metered", ctx, now, now)
    '''
)


@pytest.fixture
def flow(tmp_path: Path, store_url: str) -> Iterator[Cli]:
    runner = make_cli(tmp_path, store_url)
    (tmp_path / "flow_app.py").write_text(FLOW_APP)
    ledger = tmp_path / "ledger.db"
    with sqlite3.connect(ledger) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE ledger (job, run_id, scheduled_at, start, end, pid)")
    runner.env["LEDGER"] = str(ledger)
    runner.ok("migrate", "flow_app:app")
    try:
        yield runner
    finally:
        runner.close()


def ledger_rows(cli: Cli, job: str) -> list[tuple[float, ...]]:
    with sqlite3.connect(cli.env["LEDGER"]) as conn:
        return conn.execute(
            "SELECT run_id, scheduled_at, start, end FROM ledger WHERE job = ? ORDER BY start", (job,)
        ).fetchall()


def stop(workers: list) -> None:  # type: ignore[type-arg]
    for w in workers:
        w.proc.send_signal(signal.SIGTERM)
    for w in workers:
        assert w.exit_code(60) == 0, w.stderr


def test_every_second_schedule_fires_exactly_once_across_four_workers(flow: Cli) -> None:
    workers = [flow.spawn("worker", "flow_app:app", "--queues", "default") for _ in range(4)]
    for w in workers:
        w.wait_for_output("started")
    wait_for(lambda: len(ledger_rows(flow, "beat")) >= 8, "8 fires of the every-second schedule", timeout=60)
    stop(workers)
    runs = list(flow.app.client.list_runs(RunFilter(schedule_id="beat"), limit=None))
    fire_times = sorted(r.not_before.timestamp() for r in runs if r.not_before is not None)
    assert len(fire_times) == len(set(fire_times)) == len(runs)  # at most one run per fire
    assert fire_times == [fire_times[0] + k for k in range(len(fire_times))]  # none missed in between
    executed = [row[1] for row in ledger_rows(flow, "beat")]  # the scheduled_at each execution saw
    assert len(executed) == len(set(executed))  # and each fire executed once
    assert set(executed) <= set(fire_times)
    assert sum(r.status is RunStatus.SUCCEEDED for r in runs) == len(executed)


def test_limits_hold_across_two_worker_processes(flow: Cli) -> None:
    client = flow.app.client
    client.trigger_many("capped", [{"n": n} for n in range(100)])
    client.trigger_many("metered", [{"n": n} for n in range(100)])
    workers = [flow.spawn("worker", "flow_app:app", "--concurrency", "8") for _ in range(2)]
    wait_for(
        lambda: len(ledger_rows(flow, "capped")) + len(ledger_rows(flow, "metered")) >= 200,
        "200 runs to drain",
        timeout=120,
    )
    stop(workers)
    capped = ledger_rows(flow, "capped")
    events = sorted(
        [(row[2], 1) for row in capped] + [(row[3], -1) for row in capped], key=lambda e: (e[0], e[1])
    )
    overlap = max(itertools.accumulate(delta for _, delta in events))
    assert overlap <= 3, f"{overlap} capped runs overlapped"
    # The rate window is the store's: attempt start times as the claiming transaction recorded them.
    starts = sorted(
        a.started_at.timestamp()
        for r in client.list_runs(RunFilter(job="metered"), limit=None)
        for a in client.attempts(r.id)
    )
    assert len(starts) == 100
    worst = max(sum(1 for t in starts[i:] if t < s + 1.0) for i, s in enumerate(starts))
    assert worst <= 40, f"{worst} starts within one second"
