"""``runlane worker`` under signals: SIGTERM drains or releases, SIGKILL leaves a lease that is reclaimed."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from cli_helpers import Cli, wait_for

from runlane import RunStatus

pytestmark = pytest.mark.slow

MARGIN = 15.0  # process start-up, store close and interpreter exit on a loaded CI machine


@pytest.fixture
def migrated(cli_any: Cli) -> Cli:
    """Worker process tests run on every backend."""
    cli_any.ok("migrate", "demo_app:app")
    return cli_any


def test_sigterm_lets_the_running_attempt_finish(migrated: Cli) -> None:
    run_id = migrated.trigger("nap", {"seconds": 1.5})
    worker = migrated.spawn("worker", "demo_app:app", env={"RUNLANE_SHUTDOWN_TIMEOUT": "20"})
    migrated.wait_for_run(run_id, lambda r: r.status is RunStatus.RUNNING, "the run to start")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.exit_code(20 + MARGIN) == 0
    run = migrated.get_run(run_id)
    assert run.status is RunStatus.SUCCEEDED
    assert run.result == "rested"
    assert run.attempt == 1


def test_sigterm_past_shutdown_timeout_releases_without_using_an_attempt(migrated: Cli) -> None:
    run_id = migrated.trigger("nap", {"seconds": 60})
    worker = migrated.spawn("worker", "demo_app:app", env={"RUNLANE_SHUTDOWN_TIMEOUT": "0.5"})
    migrated.wait_for_run(run_id, lambda r: r.status is RunStatus.RUNNING, "the run to start")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.exit_code(0.5 + MARGIN) == 0
    run = migrated.get_run(run_id)
    assert run.status is RunStatus.PENDING
    assert run.attempt == 0
    assert migrated.app.client.attempts(run_id) == []


def test_second_sigterm_stops_at_once(migrated: Cli) -> None:
    run_id = migrated.trigger("nap", {"seconds": 60})
    worker = migrated.spawn("worker", "demo_app:app", env={"RUNLANE_SHUTDOWN_TIMEOUT": "60"})
    migrated.wait_for_run(run_id, lambda r: r.status is RunStatus.RUNNING, "the run to start")
    worker.proc.send_signal(signal.SIGTERM)
    worker.wait_for_output("draining")  # the first signal was handled: the next one is the second
    worker.proc.send_signal(signal.SIGTERM)
    worker.exit_code(MARGIN)  # far sooner than the 60 s drain
    assert migrated.get_run(run_id).status is RunStatus.RUNNING  # comes back after its lease expires


def test_sigkill_mid_run_is_reclaimed_after_the_lease(migrated: Cli) -> None:
    env = {"RUNLANE_LEASE_TIMEOUT": "2"}
    run_id = migrated.trigger("nap", {"seconds": 1})
    first = migrated.spawn("worker", "demo_app:app", env=env)
    migrated.wait_for_run(run_id, lambda r: r.status is RunStatus.RUNNING, "the run to start")
    first.proc.kill()
    first.exit_code(MARGIN)
    # A live worker's reaper reclaims the run once the dead worker's lease has expired.
    second = migrated.spawn("worker", "demo_app:app", env=env)
    run = migrated.wait_for_run(run_id, lambda r: r.status.is_terminal, "the run to be reclaimed and finish")
    second.proc.send_signal(signal.SIGTERM)
    assert second.exit_code(MARGIN) == 0
    assert run.status is RunStatus.SUCCEEDED
    assert run.attempt == 2
    lost, done = migrated.app.client.attempts(run_id)
    assert lost.status is RunStatus.FAILED
    assert lost.error is not None and lost.error.type == "WorkerLost"
    assert done.status is RunStatus.SUCCEEDED


def test_supervisor_restarts_a_killed_process_and_forwards_sigterm(migrated: Cli) -> None:
    env = {"RUNLANE_LEASE_TIMEOUT": "2"}
    run_id = migrated.trigger("nap", {"seconds": 1})
    supervisor = migrated.spawn("worker", "demo_app:app", "--processes", "2", env=env)
    running = migrated.wait_for_run(run_id, lambda r: r.status is RunStatus.RUNNING, "the run to start")
    assert running.worker_id is not None
    pid = int(running.worker_id.split("-")[-2])  # worker ids are host-pid-random
    assert pid != supervisor.proc.pid
    os.kill(pid, signal.SIGKILL)
    run = migrated.wait_for_run(run_id, lambda r: r.status.is_terminal, "the run to be reclaimed and finish")
    assert run.status is RunStatus.SUCCEEDED
    assert run.attempt == 2
    supervisor.proc.send_signal(signal.SIGTERM)
    assert supervisor.exit_code(MARGIN) == 0


def test_sigkill_then_burst_worker_reclaims(migrated: Cli) -> None:
    env = {"RUNLANE_LEASE_TIMEOUT": "2"}
    run_id = migrated.trigger("nap", {"seconds": 1})
    first = migrated.spawn("worker", "demo_app:app", env=env)
    migrated.wait_for_run(run_id, lambda r: r.status is RunStatus.RUNNING, "the run to start")
    first.proc.kill()
    first.exit_code(MARGIN)

    def burst_until_done() -> bool:
        migrated.ok("worker", "demo_app:app", "--burst", env=env)
        return migrated.get_run(run_id).status.is_terminal

    wait_for(burst_until_done, "a burst worker to reclaim the run", timeout=10)
    run = migrated.get_run(run_id)
    assert (run.status, run.attempt) == (RunStatus.SUCCEEDED, 2)
    lost, _ = migrated.app.client.attempts(run_id)
    assert lost.error is not None and lost.error.type == "WorkerLost"


def test_job_processes_end_with_their_killed_worker(migrated: Cli, tmp_path: Path) -> None:
    """A SIGKILLed worker cannot stop its job processes: each notices its worker is gone and ends itself,
    instead of running a body that another worker will run again once the lease expires."""
    pid_file = tmp_path / "job.pid"
    run_id = migrated.trigger("crunch", {"pid_file": str(pid_file), "seconds": 120})
    worker = migrated.spawn("worker", "demo_app:app")
    wait_for(pid_file.exists, "the job process to start the body", timeout=60)
    job_pid = int(pid_file.read_text())
    assert job_pid != worker.proc.pid
    worker.proc.kill()
    worker.exit_code(MARGIN)
    wait_for(lambda: not _exists(job_pid), "the orphaned job process to end", timeout=MARGIN)
    assert migrated.get_run(run_id).status is RunStatus.RUNNING  # comes back after its lease expires


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (ended, not yet reaped by its parent, the forkserver) counts as ended.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
