"""Frozen records that cross every seam: the store returns them, the client hands them to users."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal, Self

EventKind = Literal["status", "progress", "log", "output", "input"]
EVENT_KINDS: tuple[EventKind, ...] = ("status", "progress", "log", "output", "input")


class RunStatus(StrEnum):
    SCHEDULED = "scheduled"
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.SKIPPED})
ACTIVE_STATUSES = frozenset(set(RunStatus) - TERMINAL_STATUSES)


def to_datetime(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def to_timestamp(dt: datetime | None) -> float | None:
    if dt is None:
        return None
    if dt.tzinfo is None:
        # A naive datetime is taken as UTC: the store never guesses a local zone.
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


class _Record:
    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True, slots=True)
class ErrorInfo(_Record):
    """Why an attempt or run failed or was cancelled. Prints as ``Type: message``."""

    type: str
    message: str
    traceback: str | None = None

    def __str__(self) -> str:
        return f"{self.type}: {self.message}" if self.message else self.type

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "message": self.message, "traceback": self.traceback}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ErrorInfo | None:
        if data is None:
            return None
        return cls(str(data.get("type", "Error")), str(data.get("message", "")), data.get("traceback"))


@dataclass(frozen=True, slots=True)
class Run(_Record):
    id: int
    job: str
    args: dict[str, Any]
    status: RunStatus
    queue: str
    priority: int
    attempt: int
    max_attempts: int
    not_before: datetime | None
    not_after: datetime | None
    dedup_id: str | None
    tags: tuple[str, ...]
    parent_run_id: int | None
    root_run_id: int
    batch_id: int | None
    schedule_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: float | None
    progress_message: str | None
    result: Any
    error: ErrorInfo | None
    worker_id: str | None


@dataclass(frozen=True, slots=True)
class Attempt(_Record):
    number: int
    worker_id: str
    started_at: datetime
    finished_at: datetime | None
    status: RunStatus
    error: ErrorInfo | None


@dataclass(frozen=True, slots=True)
class Event(_Record):
    id: int
    run_id: int
    kind: EventKind
    at: datetime
    data: Any


@dataclass(frozen=True, slots=True)
class JobInfo(_Record):
    """A job as the catalogue records it, so client-only processes can validate triggers."""

    name: str
    queue: str
    options: dict[str, Any] = field(default_factory=dict)
    args_schema: dict[str, Any] = field(default_factory=dict)


def _statuses(value: RunStatus | str | Iterable[RunStatus | str] | None) -> tuple[RunStatus, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (RunStatus(value),)
    return tuple(RunStatus(v) for v in value)


@dataclass(frozen=True, slots=True)
class RunFilter(_Record):
    """Which runs `list_runs` returns. Every field narrows; `status` takes one status or several."""

    job: str | None = None
    status: RunStatus | str | tuple[RunStatus, ...] | None = None
    queue: str | None = None
    parent_run_id: int | None = None
    root_run_id: int | None = None
    batch_id: int | None = None
    schedule_id: str | None = None
    tag: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None

    @property
    def statuses(self) -> tuple[RunStatus, ...]:
        return _statuses(self.status)
