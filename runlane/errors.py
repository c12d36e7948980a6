"""The one error tree. Every public error derives from :class:`RunlaneError`::

    RunlaneError
     ├── JobNotFound
     ├── InvalidArguments
     ├── InvalidSchedule
     │    └── ScheduleNotFound     .schedule_id
     ├── RunConflict              .existing_run_id
     ├── RunNotFound              .run_id
     ├── RunFinished              .run_id, .status: the run has already ended (send to a terminal run)
     ├── BatchNotFound            .batch_id
     ├── RunFailed                .run, .error
     │    └── RunCancelled
     ├── JobTimeout
     ├── JobProcessDied           the job process running an attempt ended abnormally
     ├── JobProcessError          .type_name: a job's exception that could not leave its job process
     ├── NonRetryable             raised by job code to fail a run at once
     ├── StoreUnavailable         driver errors kept as __cause__
     │    └── SchemaOutdated
     ├── InvalidConnection        trigger(connection=…) cannot use that connection
     └── BatchFailed              also an ExceptionGroup of RunFailed

A docstring reads "Raised when …" and doubles as the default message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runlane.models import ErrorInfo, Run


class RunlaneError(Exception):
    """Raised when Runlane cannot do what was asked."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class JobNotFound(RunlaneError):
    """Raised when a job name is neither defined locally nor recorded in the job catalogue."""

    def __init__(self, job: str, message: str | None = None) -> None:
        self.job = job
        super().__init__(
            message
            or f"unknown job {job!r}: it is not defined in this process and no worker has registered it "
            "(start a worker or run `runlane migrate app_module:app`)"
        )


class InvalidArguments(RunlaneError):
    """Raised when a run's arguments do not match its job's parameters."""


class InvalidSchedule(RunlaneError):
    """Raised when a cron expression, timezone or schedule option is invalid."""


class ScheduleNotFound(InvalidSchedule):
    """Raised when no schedule has the given id."""

    def __init__(self, schedule_id: str) -> None:
        self.schedule_id = schedule_id
        super().__init__(f"schedule {schedule_id!r} not found")


class RunConflict(RunlaneError):
    """Raised when a non-terminal run with the same dedup id already exists."""

    def __init__(self, dedup_id: str, existing_run_id: int) -> None:
        self.dedup_id = dedup_id
        self.existing_run_id = existing_run_id
        super().__init__(f"a run with dedup id {dedup_id!r} is already active: run {existing_run_id}")


class RunNotFound(RunlaneError):
    """Raised when no run has the given id."""

    def __init__(self, run_id: int) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id} not found")


class RunFinished(RunlaneError):
    """Raised when an action needs an active run but the run has already ended."""

    def __init__(self, run_id: int, status: str) -> None:
        self.run_id = run_id
        self.status = status
        super().__init__(f"run {run_id} has already ended ({status}): it accepts no more input")


class BatchNotFound(RunlaneError):
    """Raised when no batch has the given id."""

    def __init__(self, batch_id: int) -> None:
        self.batch_id = batch_id
        super().__init__(f"batch {batch_id} not found")


class RunFailed(RunlaneError):
    """Raised when a run ended failed and its result was asked for."""

    def __init__(self, run: Run, message: str | None = None) -> None:
        self.run = run
        self.error: ErrorInfo | None = run.error
        super().__init__(message or f"run {run.id} ({run.job}) {run.status.value}: {run.error or 'no error'}")


class RunCancelled(RunFailed):
    """Raised when a run ended cancelled and its result was asked for."""


class JobTimeout(RunlaneError):
    """Raised when an attempt runs longer than its job's timeout."""


class JobProcessDied(RunlaneError):
    """Raised when the job process running an attempt ended abnormally (a crash, a signal, ``os._exit``)."""


class JobProcessError(RunlaneError):
    """Stands for a job's exception that could not be pickled back from its job process."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name


class NonRetryable(RunlaneError):
    """Raised by job code to fail the run at once, without further attempts."""


class StoreUnavailable(RunlaneError):
    """Raised when the store cannot be reached or used."""


class SchemaOutdated(StoreUnavailable):
    """Raised when the store's schema is older than this version of Runlane; run `runlane migrate`."""


class InvalidConnection(RunlaneError, ValueError):
    """Raised when the connection given to ``trigger(connection=…)`` cannot carry the run: it is not inside a
    usable transaction, or the store is not PostgreSQL."""


class BatchFailed(ExceptionGroup[RunFailed], RunlaneError):
    """Raised when one or more children of a batch failed, after all of them finished."""

    def derive(self, excs: Sequence[RunFailed]) -> BatchFailed:  # type: ignore[override]
        return BatchFailed(self.message, excs)
