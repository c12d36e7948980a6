"""``runlane schedules`` and ``runlane queues`` as a user types them."""

from __future__ import annotations

from cli_helpers import Cli, one_error_line


def test_schedules_lifecycle(migrated: Cli) -> None:
    assert "no schedules" in migrated.ok("schedules").stdout
    added = migrated.json("schedules", "add", "sum", "add", "*/5 * * * *", "--args", '{"a": 1, "b": 2}')
    assert added["id"] == "sum" and added["cron"] == "*/5 * * * *" and added["active"]
    assert len(added["next_fire_times"]) == 5
    table = migrated.ok("schedules").stdout
    assert "sum" in table and "*/5 * * * *" in table and "enabled" in table
    assert migrated.json("schedules", "pause", "sum")["enabled"] is False
    assert "paused" in migrated.ok("schedules").stdout
    assert migrated.json("schedules", "resume", "sum")["enabled"] is True
    shown = migrated.ok("schedules", "show", "sum").stdout
    assert "next:" in shown
    every = migrated.json("schedules", "add", "often", "add", "--every", "30", "--args", '{"a": 1, "b": 1}')
    assert every["interval"] == 30.0
    assert [s["id"] for s in migrated.json("schedules")] == ["often", "sum"]
    assert "removed schedule sum" in migrated.ok("schedules", "remove", "sum").stdout
    assert migrated.json("schedules", "remove", "sum") == {"id": "sum", "removed": False}


def test_schedule_errors_are_one_line(migrated: Cli) -> None:
    for args in (
        ("schedules", "add", "x", "add", "61 * * * *", "--args", '{"a": 1, "b": 2}'),
        (
            "schedules",
            "add",
            "x",
            "add",
            "* * * * *",
            "--timezone",
            "Nowhere/City",
            "--args",
            '{"a": 1, "b": 2}',
        ),
        ("schedules", "add", "x", "add", "* * * * *", "--args", '{"a": "one"}'),
        ("schedules", "add", "x", "nope", "* * * * *"),
        ("schedules", "show", "missing"),
        ("schedules", "remove", "missing"),
    ):
        result = migrated(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        one_error_line(result.stderr)
    assert migrated.json("schedules") == []


def test_queues_pause_and_resume(migrated: Cli) -> None:
    migrated.trigger("add", {"a": 1, "b": 2})
    assert "paused queue default" in migrated.ok("queues", "pause", "default").stdout
    (queue,) = migrated.json("queues")
    assert queue["name"] == "default" and queue["paused"] and queue["pending"] == 1
    assert "paused" in migrated.ok("queues").stdout
    migrated.ok("queues", "resume", "default")
    assert migrated.json("queues")[0]["paused"] is False
