from datetime import timedelta

import pytest

from runlane import Runlane, Settings


def test_defaults() -> None:
    s = Settings.load({}, environ={})
    assert s.lease_timeout == 30
    assert s.effective_heartbeat_interval == 10
    assert s.poll_interval == 1.0
    assert s.shutdown_timeout == 30
    assert s.retention == timedelta(days=7)
    assert s.progress_flush_interval == 0.5
    assert s.job_thread_nice == 0
    assert s.job_process_nice == 19
    assert s.prefetch is None  # the worker's default: at most 8 x its concurrency


def test_environment_then_explicit_arguments_win() -> None:
    env = {"RUNLANE_LEASE_TIMEOUT": "10", "RUNLANE_POLL_INTERVAL": "0.25", "RUNLANE_RETENTION": "none"}
    s = Settings.load({"poll_interval": 2.0}, environ=env)
    assert s.lease_timeout == 10
    assert s.poll_interval == 2.0
    assert s.retention is None


def test_unknown_setting_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="lease_timout"):
        Settings.load({"lease_timout": 3}, environ={})


def test_bad_values_name_the_setting() -> None:
    with pytest.raises(ValueError, match="lease_timeout"):
        Settings.load({}, environ={"RUNLANE_LEASE_TIMEOUT": "soon"})
    with pytest.raises(ValueError, match="heartbeat_interval"):
        Settings(lease_timeout=5, heartbeat_interval=6)
    with pytest.raises(ValueError, match="job_thread_nice"):
        Settings.load({}, environ={"RUNLANE_JOB_THREAD_NICE": "1.5"})
    with pytest.raises(ValueError, match="job_thread_nice"):
        Settings(job_thread_nice=20)
    assert Settings.load({}, environ={"RUNLANE_JOB_THREAD_NICE": "0"}).job_thread_nice == 0
    assert Settings.load({}, environ={"RUNLANE_JOB_PROCESS_NICE": "3"}).job_process_nice == 3
    with pytest.raises(ValueError, match="job_process_nice"):
        Settings(job_process_nice=-1)
    assert Settings.load({}, environ={"RUNLANE_PREFETCH": "0"}).prefetch == 0
    with pytest.raises(ValueError, match="prefetch"):
        Settings.load({}, environ={"RUNLANE_PREFETCH": "many"})
    with pytest.raises(ValueError, match="prefetch"):
        Settings(prefetch=-1)


def test_app_reads_url_and_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNLANE_URL", "sqlite:///elsewhere.db")
    monkeypatch.setenv("RUNLANE_SHUTDOWN_TIMEOUT", "3")
    app = Runlane()
    assert app.url == "sqlite:///elsewhere.db"
    assert app.settings.shutdown_timeout == 3
    assert Runlane("sqlite:///x.db", shutdown_timeout=1).settings.shutdown_timeout == 1
