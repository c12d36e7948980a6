"""Frozen records that cross every seam: the store returns them, the client hands them to users."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
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
class Batch(_Record):
    """A set of child runs created together. ``counts`` holds how many children are in each status now,
    kept by the store in the same transaction as each child's status change; ``finish_seq`` counts the
    children's terminal transitions so far (a retried child that ends again counts again)."""

    id: int
    created_at: datetime
    parent_run_id: int | None
    total: int
    counts: dict[RunStatus, int]
    finish_seq: int = 0

    @property
    def finished(self) -> int:
        """How many children are terminal now."""
        return sum(n for status, n in self.counts.items() if status.is_terminal)

    @property
    def is_finished(self) -> bool:
        return self.finished == self.total

    @property
    def status(self) -> RunStatus:
        """Derived from the children: ``pending`` until one starts, ``running`` until all are terminal, then
        ``failed`` if any failed, else ``cancelled`` if any was cancelled, else ``succeeded``."""
        if not self.is_finished:
            waiting = self.counts.get(RunStatus.PENDING, 0) + self.counts.get(RunStatus.SCHEDULED, 0)
            return RunStatus.PENDING if waiting == self.total else RunStatus.RUNNING
        if self.counts.get(RunStatus.FAILED, 0):
            return RunStatus.FAILED
        if self.counts.get(RunStatus.CANCELLED, 0):
            return RunStatus.CANCELLED
        return RunStatus.SUCCEEDED


@dataclass(frozen=True, slots=True)
class RunTree(_Record):
    """A run with its children, recursively, each level ordered by id (creation order): what
    ``client.tree(run_id)`` returns for the whole tree of a run's root."""

    run: Run
    children: tuple[RunTree, ...] = ()

    def walk(self) -> Iterator[tuple[int, Run]]:
        """Depth-first, parents before children: ``(depth, run)`` in display order (the root at depth 0)."""
        stack: list[tuple[int, RunTree]] = [(0, self)]
        while stack:
            depth, node = stack.pop()
            yield depth, node.run
            stack.extend((depth + 1, child) for child in reversed(node.children))

    def find(self, run_id: int) -> RunTree | None:
        """The subtree of ``run_id``, if it is in this tree."""
        stack: list[RunTree] = [self]
        while stack:
            node = stack.pop()
            if node.run.id == run_id:
                return node
            stack.extend(node.children)
        return None

    def __len__(self) -> int:
        return sum(1 for _ in self.walk())


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


ScheduleOverlap = Literal["skip", "allow", "queue"]
ScheduleMisfire = Literal["latest", "skip", "all"]
OVERLAP_POLICIES: tuple[str, ...] = ("skip", "allow", "queue")
MISFIRE_POLICIES: tuple[str, ...] = ("latest", "skip", "all")


@dataclass(frozen=True, slots=True)
class Schedule(_Record):
    """A recurring trigger. ``cron`` or ``interval`` (seconds) says when; it fires while ``active``: enabled
    (``pause``/``resume``) and not disabled by the code (``disabled_reason``, e.g. removed from code)."""

    id: str
    job: str
    args: dict[str, Any]
    cron: str | None
    interval: float | None
    timezone: str
    overlap: str
    misfire: str
    max_catch_up: int
    queue: str
    enabled: bool
    source: Literal["code", "runtime"]
    disabled_reason: str | None
    next_fire_at: datetime | None
    last_fire_at: datetime | None
    created_at: datetime
    updated_at: datetime
    next_fire_times: tuple[datetime, ...] = ()

    @property
    def active(self) -> bool:
        return self.enabled and self.disabled_reason is None


@dataclass(frozen=True, slots=True)
class QueueInfo(_Record):
    """A queue as ``client.queues()`` reports it: active runs by status, pause state and limits."""

    name: str
    paused: bool
    scheduled: int
    pending: int
    running: int
    retrying: int
    max_concurrency: int | None
    rate_limit: str | None
