"""The store verbs for schedules, queues and limits (flow control). ``Store`` inherits them; both stores
implement them.

Exactly-once fires come from a unique key on (schedule, intended fire time) checked in the inserting
transaction, never from a leader or a lock: every worker runs a scheduler. Limits are enforced in the claim
transaction from the definitions recorded here (see each store's claim).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from runlane.limits import JobLimits, QueueLimits, RateLimit
from runlane.models import QueueInfo, Run, Schedule
from runlane.serialization import dumps


@dataclass(frozen=True, slots=True)
class ScheduleDef:
    """A schedule to write, already validated above the seam (cron, timezone, job, arguments, policies).

    ``next_fire_at`` is the first fire after now; the store uses it when the schedule is new, when its
    definition changed, or when it comes back after being removed from code, and otherwise keeps the stored
    one (so a restart neither skips nor repeats a fire)."""

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
    priority: int
    max_attempts: int
    concurrency_key: str | None
    source: Literal["code", "runtime"]
    next_fire_at: float | None

    def definition(self) -> tuple[Any, ...]:
        """What, when changed, re-times the schedule."""
        return (self.job, self.args, self.cron, self.interval, self.timezone)


def schedule_params(d: ScheduleDef, next_fire_at: Any, now: Any, *, replace: bool) -> dict[str, Any]:
    """The upsert parameters both stores bind; each passes times in its own column type."""
    return {
        "id": d.id,
        "job": d.job,
        "args": dumps(d.args),
        "cron": d.cron,
        "interval": d.interval,
        "timezone": d.timezone,
        "overlap": d.overlap,
        "misfire": d.misfire,
        "max_catch_up": d.max_catch_up,
        "queue": d.queue,
        "priority": d.priority,
        "max_attempts": d.max_attempts,
        "concurrency_key": d.concurrency_key,
        "source": d.source,
        "next_fire_at": next_fire_at,
        "now": now,
        "replace": replace,
    }


@dataclass(frozen=True, slots=True)
class FireRequest:
    """One scheduler pass for one schedule: create ``fires`` (intended fire times, ascending) and move the
    schedule's next fire to ``next_fire_at``, only if its next fire is still ``expected_next_fire_at``.

    The store creates at most one run per (schedule, fire time) through a unique key in the same transaction,
    and applies the schedule's overlap policy there: ``skip`` records a ``skipped`` run while an earlier run
    of the schedule is active; ``queue`` creates it ``scheduled`` (held) while earlier ones are active."""

    schedule_id: str
    expected_next_fire_at: float
    fires: tuple[float, ...]
    next_fire_at: float | None


class SchedulesAndLimits(abc.ABC):
    """Store verbs for schedules, queues and limits."""

    # -- schedules -------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def sync_code_schedules(self, defs: Sequence[ScheduleDef], *, removed_reason: str) -> None:
        """Upsert the schedules an app declares in code; disable (never delete) every other code schedule
        with ``removed_reason``. A user's pause survives a restart."""

    @abc.abstractmethod
    async def add_schedule(self, schedule: ScheduleDef) -> Schedule:
        """Create or replace a runtime schedule. InvalidSchedule when the id belongs to a code schedule."""

    @abc.abstractmethod
    async def get_schedule(self, schedule_id: str) -> Schedule | None: ...

    @abc.abstractmethod
    async def list_schedules(self) -> list[Schedule]:
        """All schedules, by id."""

    @abc.abstractmethod
    async def set_schedule_enabled(
        self, schedule_id: str, enabled: bool, *, next_fire_at: float | None
    ) -> Schedule | None:
        """Pause or resume; a resumed schedule fires next at ``next_fire_at`` (fires missed while paused are
        not caught up). None when the schedule does not exist."""

    @abc.abstractmethod
    async def remove_schedule(self, schedule_id: str) -> bool:
        """Delete a schedule (its runs stay); False when it did not exist."""

    @abc.abstractmethod
    async def due_schedules(self, now: float) -> list[Schedule]:
        """Active schedules whose next fire is at or before ``now``."""

    @abc.abstractmethod
    async def next_schedule_fire_at(self) -> float | None:
        """The earliest next fire among active schedules."""

    @abc.abstractmethod
    async def fire_schedule(self, request: FireRequest) -> list[Run]:
        """Apply one scheduler pass for one schedule (see FireRequest); returns the runs created, [] when
        another scheduler got there first or the schedule is no longer active."""

    @abc.abstractmethod
    async def release_queued_fires(self) -> int:
        """For each schedule with held fires (overlap ``queue``) and no other active run, the oldest held
        fire becomes ``pending``. Returns how many were released."""

    # -- queues and limits -----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def register_limits(self, jobs: Sequence[JobLimits], queues: Sequence[QueueLimits]) -> None:
        """Record job and queue limits (a job without limits has its row removed; a queue's pause state is
        kept). Claims enforce what is recorded, globally and atomically."""

    @abc.abstractmethod
    async def set_queue_paused(self, queue: str, paused: bool) -> None: ...

    @abc.abstractmethod
    async def queue_stats(self) -> list[QueueInfo]:
        """Every queue with active runs, a pause flag or limits: runs by status, pause state and limits."""


def rate_limit(count: int | None, period: float | None) -> RateLimit | None:
    """A stored (count, period) pair back to a RateLimit; NULLs mean no rate limit."""
    return None if count is None or period is None else RateLimit(int(count), float(period))


def queue_infos(count_rows: Iterable[Sequence[Any]], queue_rows: Iterable[Sequence[Any]]) -> list[QueueInfo]:
    """The queues overview from (queue, status, count) rows and (name, paused, max_concurrency, rate count,
    rate period) rows: both stores run their own SQL and share this assembly."""
    counts: dict[str, dict[str, int]] = {}
    for queue, status, n in count_rows:
        counts.setdefault(queue, {})[status] = int(n)
    defs = {row[0]: row for row in queue_rows}
    out = []
    for name in sorted(counts.keys() | defs.keys()):
        c, d = counts.get(name, {}), defs.get(name)
        rate = rate_limit(d[3], d[4]) if d else None
        out.append(
            QueueInfo(
                name=name,
                paused=bool(d[1]) if d else False,
                scheduled=c.get("scheduled", 0),
                pending=c.get("pending", 0),
                running=c.get("running", 0),
                retrying=c.get("retrying", 0),
                max_concurrency=d[2] if d else None,
                rate_limit=None if rate is None else str(rate),
            )
        )
    return out
