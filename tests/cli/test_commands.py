"""The ``runlane`` command end to end: each test runs the real command as a subprocess."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from cli_helpers import Cli, one_error_line

from runlane import RunStatus

pytestmark = pytest.mark.slow


def test_migrate_then_up_to_date(cli: Cli) -> None:
    first = cli.ok("migrate")
    assert "applied migration" in first.stdout
    again = cli.ok("migrate", "demo_app:app")
    assert "schema up to date (version" in again.stdout
    assert "add, boom, crunch, nap" in again.stdout
    data = cli.json("migrate")
    assert data["applied"] == []
    assert data["version"] >= 1


def test_unmigrated_store_is_one_clear_line(cli: Cli) -> None:
    for args in (["runs"], ["trigger", "add", "--args", '{"a": 1, "b": 2}'], ["worker", "demo_app:app"]):
        result = cli(*args)
        assert result.returncode == 1, (args, result.stderr)
        line = (
            one_error_line(result.stderr) if args[0] != "worker" else result.stderr.strip().splitlines()[-1]
        )
        assert "runlane migrate" in line, line
        assert "Traceback" not in result.stderr


def test_worker_processes_report_a_bad_app_or_store_once(cli: Cli) -> None:
    """The supervisor's children start while it checks the app and the store; they wait for its go-ahead,
    so a problem is still one line from the supervisor, not one more from every child."""
    for app, needle in (("demo_app:app", "runlane migrate"), ("no_such_module:app", "no_such_module")):
        result = cli("worker", app, "--processes", "2", "--concurrency", "2")
        assert result.returncode == 1, result.stderr
        assert needle in one_error_line(result.stderr)


def test_unreachable_store_is_one_clear_line(cli: Cli, tmp_path: Path) -> None:
    result = cli("runs", "--url", f"sqlite:///{tmp_path / 'missing' / 'dir' / 'x.db'}")
    assert result.returncode == 1
    one_error_line(result.stderr)
    result = cli("runs", "--url", "mysql://nope")
    assert result.returncode == 1
    assert "unsupported store URL" in one_error_line(result.stderr)


def test_trigger_client_only_uses_the_catalogue(migrated: Cli) -> None:
    (migrated.cwd / "demo_app.py").unlink()  # no job code anywhere near this process
    result = migrated.ok("trigger", "add", "--args", '{"a": 1, "b": 2}')
    assert "triggered" in result.stdout
    run = migrated.json("trigger", "add", "--args", '{"a": 3, "b": 4}', "--priority", "5", "--tag", "x")
    assert run["status"] == "pending"
    assert run["priority"] == 5
    assert run["tags"] == ["x"]
    invalid = migrated("trigger", "add", "--args", '{"a": "x", "b": 2}')
    assert invalid.returncode == 1
    assert "invalid arguments for job 'add'" in one_error_line(invalid.stderr)


def test_trigger_unknown_job(migrated: Cli) -> None:
    result = migrated("trigger", "nope", "--args", "{}")
    assert result.returncode == 1
    assert "unknown job 'nope'" in one_error_line(result.stderr)


@pytest.mark.parametrize("bad", ['{"a": 1', "[1, 2]", "nope"])
def test_trigger_invalid_args_json(migrated: Cli, bad: str) -> None:
    result = migrated("trigger", "add", "--args", bad)
    assert result.returncode == 1
    assert "--args" in one_error_line(result.stderr)


def test_bad_app_path(migrated: Cli) -> None:
    for path in ("no_such_module:app", "demo_app:nothing", "demo_app:add"):
        result = migrated("worker", path, "--burst")
        assert result.returncode == 1, path
        assert "error: " in result.stderr
        assert "Traceback" not in result.stderr


def test_usage_error_exits_2(cli: Cli) -> None:
    assert cli("runs", "--status", "bogus").returncode == 2
    assert cli("run", "not-a-number").returncode == 2


def test_worker_burst_drains_then_runs_and_run_show(migrated: Cli) -> None:
    ids = [migrated.trigger("add", {"a": i, "b": 1}) for i in range(3)]
    failing = migrated.trigger("boom")
    migrated.ok("worker", "demo_app:app", "--burst", "--concurrency", "2")
    listed = migrated.json("runs", "--limit", "10")
    assert [r["id"] for r in listed] == sorted([*ids, failing], reverse=True)
    by_id = {r["id"]: r for r in listed}
    assert [by_id[i]["result"] for i in ids] == [1, 2, 3]
    assert by_id[failing]["status"] == "failed"
    assert by_id[failing]["error"]["type"] == "ValueError"
    assert migrated.json("runs", "--status", "failed") == [by_id[failing]]
    assert migrated.json("runs", "--job", "add", "--limit", "2")[0]["id"] == ids[-1]

    table = migrated.ok("runs").stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "JOB", "STATUS"]
    assert len(table) == 5

    detail = migrated.json("run", str(failing))
    assert detail["status"] == "failed"
    assert [a["status"] for a in detail["attempts"]] == ["failed"]
    assert [e["data"]["to"] for e in detail["events"] if e["kind"] == "status"] == ["running", "failed"]
    text = migrated.ok("run", str(failing)).stdout
    assert "ValueError: kaboom" in text
    assert "attempts:" in text and "events:" in text

    missing = migrated("run", "999")
    assert missing.returncode == 1
    assert "run 999 not found" in one_error_line(missing.stderr)


def test_trigger_wait_prints_the_result(migrated: Cli) -> None:
    worker = migrated.spawn("worker", "demo_app:app")
    try:
        result = migrated.ok("trigger", "add", "--args", '{"a": 20, "b": 22}', "--wait", "--timeout", "30")
        assert json.loads(result.stdout) == 42
        napped = migrated.ok("trigger", "nap", "--args", '{"seconds": 0.5}', "--wait", "--timeout", "30")
        assert json.loads(napped.stdout) == "rested"
        assert "running" in napped.stderr  # progress shown while waiting
        failed = migrated("trigger", "boom", "--wait", "--timeout", "30")
        assert failed.returncode == 1
        assert "ValueError: kaboom" in failed.stderr.splitlines()[-1]
        assert "Traceback" not in failed.stderr
        as_json = migrated("trigger", "add", "--args", '{"a": 1, "b": 1}', "--wait", "--json")
        assert as_json.returncode == 0
        assert json.loads(as_json.stdout)["result"] == 2
    finally:
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.exit_code(30) == 0


def test_trigger_wait_timeout(migrated: Cli) -> None:
    result = migrated("trigger", "add", "--args", '{"a": 1, "b": 1}', "--wait", "--timeout", "0.3")
    assert result.returncode == 1
    assert "timed out" in result.stderr.splitlines()[-1]


def test_cancel_retry_rerun(migrated: Cli) -> None:
    run_id = migrated.trigger("add", {"a": 1, "b": 2})
    assert "cancelled" in migrated.ok("cancel", str(run_id)).stdout
    assert migrated.get_run(run_id).status is RunStatus.CANCELLED
    again = migrated("cancel", str(run_id))
    assert again.returncode == 1
    assert "nothing to cancel" in one_error_line(again.stderr)

    assert "back to pending" in migrated.ok("retry", str(run_id)).stdout
    assert migrated.get_run(run_id).status is RunStatus.PENDING
    refused = migrated("retry", str(run_id))
    assert refused.returncode == 1
    one_error_line(refused.stderr)

    new = migrated.json("rerun", str(run_id))
    assert new["id"] != run_id
    assert (new["job"], new["args"], new["status"]) == ("add", {"a": 1, "b": 2}, "pending")
    assert migrated.json("cancel", str(new["id"])) == {
        "id": new["id"],
        "changed": True,
        "status": "cancelled",
    }

    missing = migrated("cancel", "999")
    assert missing.returncode == 1
    assert "run 999 not found" in one_error_line(missing.stderr)


def test_prune(migrated: Cli) -> None:
    run_id = migrated.trigger("add", {"a": 1, "b": 2})
    migrated.ok("worker", "demo_app:app", "--burst")
    assert migrated.json("prune")["pruned"] == 0  # default retention: 7 days
    assert migrated.json("prune", "--older-than", "0")["pruned"] == 1
    assert migrated.app.client.get_run(run_id) is None
    off = migrated("prune", env={"RUNLANE_RETENTION": "none"})
    assert off.returncode == 1
    assert "--older-than" in one_error_line(off.stderr)


def test_worker_processes_burst(migrated: Cli) -> None:
    ids = [migrated.trigger("nap", {"seconds": 0.2}) for _ in range(6)]
    migrated.ok("worker", "demo_app:app", "--burst", "--processes", "2", "--concurrency", "2")
    runs = [migrated.get_run(i) for i in ids]
    assert {r.status for r in runs} == {RunStatus.SUCCEEDED}


def test_demo_runs_and_summarises(cli: Cli, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    result = cli.ok("demo", "--url", url, "--duration", "3", "--runs", "12", timeout=60)
    assert "summary: 12 runs triggered" in result.stdout
    assert "succeeded" in result.stdout
    assert (tmp_path / "demo.db").exists()


def test_help_names_the_environment(cli: Cli) -> None:
    text = cli.ok("trigger", "--help").stdout
    assert "RUNLANE_URL" in text
    assert "--json" in text
    assert "RUNLANE_CONCURRENCY" in cli.ok("worker", "--help").stdout
