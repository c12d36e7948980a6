"""The public contract: what `from runlane import …` offers is deliberate, sorted and complete."""

import runlane

EXPECTED = [
    "AsyncClient",
    "Attempt",
    "AttemptCancelled",
    "Batch",
    "BatchFailed",
    "BatchItem",
    "BatchNotFound",
    "Client",
    "ErrorInfo",
    "Event",
    "InvalidArguments",
    "InvalidConnection",
    "InvalidSchedule",
    "Job",
    "JobContext",
    "JobInfo",
    "JobNotFound",
    "JobProcessDied",
    "JobProcessError",
    "JobTimeout",
    "NonRetryable",
    "QueueInfo",
    "RateLimit",
    "Retry",
    "Run",
    "RunCancelled",
    "RunConflict",
    "RunFailed",
    "RunFilter",
    "RunFinished",
    "RunNotFound",
    "RunStatus",
    "RunTree",
    "Runlane",
    "RunlaneError",
    "Schedule",
    "ScheduleNotFound",
    "SchemaOutdated",
    "Settings",
    "StoreUnavailable",
    "Worker",
    "__version__",
]


def test_all_is_pinned_and_sorted() -> None:
    assert runlane.__all__ == EXPECTED
    assert sorted(runlane.__all__, key=str.lower) == sorted(EXPECTED, key=str.lower)


def test_every_name_resolves() -> None:
    for name in runlane.__all__:
        assert getattr(runlane, name) is not None, name


def test_errors_form_one_tree() -> None:
    for name in runlane.__all__:
        obj = getattr(runlane, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, runlane.RunlaneError), name
    assert issubclass(runlane.RunCancelled, runlane.RunFailed)
    assert issubclass(runlane.BatchFailed, ExceptionGroup)
    assert issubclass(runlane.SchemaOutdated, runlane.StoreUnavailable)


def test_run_status_is_a_string_enum() -> None:
    assert runlane.RunStatus.PENDING == "pending"
    assert runlane.RunStatus.SUCCEEDED.is_terminal
    assert not runlane.RunStatus.RETRYING.is_terminal
    assert {s for s in runlane.RunStatus if s.is_terminal} == {"succeeded", "failed", "cancelled", "skipped"}
