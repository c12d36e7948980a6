"""Runlane: durable background jobs for Python, on SQLite or PostgreSQL."""

from runlane.app import Runlane
from runlane.client import AsyncClient, Client
from runlane.context import AttemptCancelled, JobContext
from runlane.errors import (
    BatchFailed,
    InvalidArguments,
    InvalidSchedule,
    JobNotFound,
    JobTimeout,
    NonRetryable,
    RunCancelled,
    RunConflict,
    RunFailed,
    RunlaneError,
    RunNotFound,
    SchemaOutdated,
    StoreUnavailable,
)
from runlane.jobs import Job
from runlane.models import Attempt, ErrorInfo, Event, JobInfo, Run, RunFilter, RunStatus
from runlane.retry import Retry
from runlane.settings import Settings
from runlane.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Attempt",
    "AttemptCancelled",
    "BatchFailed",
    "Client",
    "ErrorInfo",
    "Event",
    "InvalidArguments",
    "InvalidSchedule",
    "Job",
    "JobContext",
    "JobInfo",
    "JobNotFound",
    "JobTimeout",
    "NonRetryable",
    "Retry",
    "Run",
    "RunCancelled",
    "RunConflict",
    "RunFailed",
    "RunFilter",
    "RunNotFound",
    "RunStatus",
    "Runlane",
    "RunlaneError",
    "SchemaOutdated",
    "Settings",
    "StoreUnavailable",
    "Worker",
    "__version__",
]
