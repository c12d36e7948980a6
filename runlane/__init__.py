"""Runlane: durable background jobs for Python, on SQLite or PostgreSQL."""

from runlane.app import Runlane
from runlane.client import AsyncClient, BatchItem, Client
from runlane.context import AttemptCancelled, JobContext
from runlane.errors import (
    BatchFailed,
    BatchNotFound,
    InvalidArguments,
    InvalidConnection,
    InvalidSchedule,
    JobNotFound,
    JobProcessDied,
    JobProcessError,
    JobTimeout,
    NonRetryable,
    RunCancelled,
    RunConflict,
    RunFailed,
    RunFinished,
    RunlaneError,
    RunNotFound,
    ScheduleNotFound,
    SchemaOutdated,
    StoreUnavailable,
)
from runlane.jobs import Job
from runlane.limits import RateLimit
from runlane.models import (
    Attempt,
    Batch,
    ErrorInfo,
    Event,
    JobInfo,
    QueueInfo,
    Run,
    RunFilter,
    RunStatus,
    RunTree,
    Schedule,
)
from runlane.retry import Retry
from runlane.settings import Settings
from runlane.worker import Worker

__version__ = "0.1.0"

__all__ = [
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
