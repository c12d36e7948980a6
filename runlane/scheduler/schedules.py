"""The firing loop every worker runs, and the sync of an app's declared schedules and limits.

There is no leader: each worker's scheduler reads the due schedules, plans their fires (pure, see cron.py)
and hands each plan to ``store.fire_schedule``, which creates at most one run per (schedule, fire time)
through a unique key in its transaction and advances the schedule only if no other scheduler already did.
A scheduler that dies between planning and committing leaves the schedule where it was, so the next pass
(of any worker) plans and creates the same fires again, exactly once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from runlane.errors import InvalidSchedule, StoreUnavailable
from runlane.limits import concurrency_key_value
from runlane.models import Run, Schedule
from runlane.scheduler.cron import Timing, make_timing, plan_fires
from runlane.store.flow import FireRequest, ScheduleDef

if TYPE_CHECKING:
    from runlane.app import Runlane
    from runlane.store import Store

log = logging.getLogger("runlane.scheduler")

MISFIRE_GRACE = 5.0
"""Seconds late a fire may be first seen and still count as on time. Every live worker checks its schedules
at least once per poll interval, so on-time fires are seen well within this; fires older than it were missed
(no scheduler ran) and follow the schedule's misfire policy."""
NEXT_FIRES = 5


def timing_of(schedule: Schedule) -> Timing:
    return make_timing(schedule.cron, schedule.interval, schedule.timezone)


def next_fire_times(schedule: Schedule, count: int = NEXT_FIRES) -> tuple[datetime, ...]:
    """The next ``count`` fire times of an active schedule, from its stored next fire on."""
    if not schedule.active or schedule.next_fire_at is None:
        return ()
    try:
        timing = timing_of(schedule)
    except InvalidSchedule:
        return ()
    at = schedule.next_fire_at.timestamp()
    out = [at]
    while len(out) < count:
        nxt = timing.next_after(out[-1])
        if nxt is None:
            break
        out.append(nxt)
    return tuple(datetime.fromtimestamp(t, UTC) for t in out)


def first_fire(timing: Timing, now: float) -> float | None:
    """A new (or changed, or resumed) schedule's first fire: the next one after now."""
    return timing.next_after(now)


def declared_schedules(app: Runlane, now: float) -> list[ScheduleDef]:
    """The schedules an app's jobs declare (``schedule=`` / ``interval=``); id = the job's name."""
    defs = []
    for job in app.jobs.values():
        o = job.options
        if o.schedule is None and o.interval is None:
            continue
        timing = make_timing(o.schedule, o.interval, o.timezone)
        args: dict[str, Any] = job.validate({})
        defs.append(
            ScheduleDef(
                id=job.name,
                job=job.name,
                args=args,
                cron=o.schedule,
                interval=o.interval,
                timezone=o.timezone,
                overlap=o.overlap,
                misfire=o.misfire,
                max_catch_up=o.max_catch_up,
                queue=o.queue,
                priority=o.priority,
                max_attempts=o.retry.attempts,
                concurrency_key=concurrency_key_value(o.concurrency_key, args, job.name),
                source="code",
                next_fire_at=first_fire(timing, now),
            )
        )
    return defs


async def sync_app(app: Runlane, store: Store, worker_id: str) -> None:
    """At worker start: record the app's job and queue limits and its declared schedules."""
    await store.register_limits(
        [job.options.limits for job in app.jobs.values()], list(app.queue_limits.values())
    )
    now = store.now()
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%S")
    await store.sync_code_schedules(
        declared_schedules(app, now),
        removed_reason=f"removed from code: not declared by the app of worker {worker_id} (started {stamp} UTC)",
    )


class Scheduler:
    """One scheduler per worker. ``tick(now)`` is one pass (tests call it with an explicit time)."""

    def __init__(self, store: Store, *, poll_interval: float = 1.0, grace: float = MISFIRE_GRACE) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.grace = grace
        self.fired = 0

    async def tick(self, now: float | None = None) -> list[Run]:
        """Create every due fire; release held fires whose predecessors ended. Returns the runs created."""
        store = self.store
        now = store.now() if now is None else now
        created: list[Run] = []
        for schedule in await store.due_schedules(now):
            created.extend(await self._fire(schedule, now))
        await store.release_queued_fires()
        self.fired += len(created)
        return created

    async def _fire(self, schedule: Schedule, now: float) -> Sequence[Run]:
        assert schedule.next_fire_at is not None
        expected = schedule.next_fire_at.timestamp()
        try:
            timing = timing_of(schedule)
        except InvalidSchedule as exc:  # stored by an older or newer Runlane: leave it to that one
            log.error("schedule %r cannot be evaluated: %s", schedule.id, exc)
            return []
        plan = plan_fires(
            timing,
            next_fire_at=expected,
            now=now,
            misfire=schedule.misfire,
            max_catch_up=schedule.max_catch_up,
            grace=self.grace,
        )
        if plan.missed:
            log.warning(
                "schedule %r: %d missed fire(s) left out (misfire=%s)",
                schedule.id,
                plan.missed,
                schedule.misfire,
            )
        return await self.store.fire_schedule(
            FireRequest(schedule.id, expected, plan.fires, plan.next_fire_at)
        )

    async def run(self) -> None:
        """Fire schedules until cancelled; sleeps until the earliest next fire (at most a poll interval)."""
        store = self.store
        while True:
            try:
                await self.tick()
                next_at = await store.next_schedule_fire_at()
            except StoreUnavailable as exc:
                log.warning("scheduler pass failed, retrying: %s", exc)
                next_at = None
            delay = self.poll_interval
            if next_at is not None:
                # Never below a few ms: a due schedule this pass could not advance must not spin the loop.
                delay = min(delay, max(next_at - store.now(), 0.005))
            await asyncio.sleep(delay)
