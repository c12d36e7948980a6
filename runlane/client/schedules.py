"""``client.schedules``: recurring triggers managed at runtime, and the queue controls of the client.

Validation happens here, above the store: the cron expression or interval, the timezone, the policies, the
job and its arguments. Nothing is written unless all of it is valid.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from runlane.errors import InvalidSchedule, ScheduleNotFound
from runlane.jobs import validate_with_schema
from runlane.models import Schedule
from runlane.scheduler.cron import check_policies, make_timing
from runlane.scheduler.schedules import first_fire, next_fire_times, timing_of
from runlane.store.flow import ScheduleDef

if TYPE_CHECKING:
    from runlane.client.async_client import AsyncClient, JobRef
    from runlane.client.portal import Portal


def _with_next(schedule: Schedule) -> Schedule:
    return schedule.replace(next_fire_times=next_fire_times(schedule))


class AsyncSchedules:
    """``app.async_client.schedules``."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def add(
        self,
        id: str,
        job: JobRef,
        cron: str | None = None,
        args: Mapping[str, Any] | None = None,
        *,
        timezone: str = "UTC",
        overlap: str = "skip",
        misfire: str = "latest",
        max_catch_up: int = 100,
        interval: timedelta | float | None = None,
    ) -> Schedule:
        """Create (or replace) a runtime schedule ``id`` that triggers ``job`` with ``args`` on ``cron`` (or
        every ``interval``). InvalidSchedule, InvalidArguments or JobNotFound when anything is invalid."""
        from runlane.client.async_client import run_concurrency_key

        if not isinstance(id, str) or not id.strip():
            raise InvalidSchedule(f"a schedule id must be a non-empty string, not {id!r}")
        seconds = interval.total_seconds() if isinstance(interval, timedelta) else interval
        timing = make_timing(cron, seconds, timezone)
        check_policies(overlap, misfire, max_catch_up)
        store = await self._client._store()
        name, local, info = await self._client._resolve(job, store)
        if local is not None:
            data = local.validate(args)
            queue, priority, attempts = local.queue, local.options.priority, local.options.retry.attempts
        else:
            assert info is not None
            data = validate_with_schema(name, info.args_schema, args)
            queue = info.queue
            priority = int(info.options.get("priority", 0))
            attempts = int(info.options.get("retry", {}).get("attempts", 3))
        definition = ScheduleDef(
            id=id,
            job=name,
            args=data,
            cron=None if cron is None else " ".join(cron.split()),
            interval=seconds,
            timezone=timezone,
            overlap=overlap,
            misfire=misfire,
            max_catch_up=max_catch_up,
            queue=queue,
            priority=priority,
            max_attempts=attempts,
            concurrency_key=run_concurrency_key(name, local, info, data),
            source="runtime",
            next_fire_at=first_fire(timing, store.now()),
        )
        return _with_next(await store.add_schedule(definition))

    async def get(self, id: str) -> Schedule:
        """The schedule with its next fire times; ScheduleNotFound when there is none."""
        store = await self._client._store()
        found = await store.get_schedule(id)
        if found is None:
            raise ScheduleNotFound(id)
        return _with_next(found)

    async def list(self) -> list[Schedule]:
        store = await self._client._store()
        return [_with_next(s) for s in await store.list_schedules()]

    async def _set(self, id: str, enabled: bool) -> Schedule:
        store = await self._client._store()
        current = await store.get_schedule(id)
        if current is None:
            raise ScheduleNotFound(id)
        next_at = first_fire(timing_of(current), store.now()) if enabled else None
        updated = await store.set_schedule_enabled(id, enabled, next_fire_at=next_at)
        if updated is None:
            raise ScheduleNotFound(id)
        return _with_next(updated)

    async def pause(self, id: str) -> Schedule:
        """Stop firing (no runs are created while paused)."""
        return await self._set(id, False)

    async def resume(self, id: str) -> Schedule:
        """Fire again from the next fire time after now; fires that fell while paused are not caught up."""
        return await self._set(id, True)

    async def toggle(self, id: str) -> bool:
        """Pause an enabled schedule or resume a paused one; returns whether it is now enabled."""
        store = await self._client._store()
        current = await store.get_schedule(id)
        if current is None:
            raise ScheduleNotFound(id)
        return (await self._set(id, not current.enabled)).enabled

    async def remove(self, id: str) -> bool:
        """Delete the schedule (its runs stay). False when there was none. A schedule declared in code comes
        back when a worker with that code starts."""
        store = await self._client._store()
        return await store.remove_schedule(id)


class Schedules:
    """``app.client.schedules``: the blocking twin of AsyncSchedules."""

    def __init__(self, schedules: AsyncSchedules, portal: Portal) -> None:
        self._async = schedules
        self._portal = portal

    def add(
        self,
        id: str,
        job: JobRef,
        cron: str | None = None,
        args: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Schedule:
        return self._portal.call(self._async.add(id, job, cron, args, **options))

    def get(self, id: str) -> Schedule:
        return self._portal.call(self._async.get(id))

    def list(self) -> list[Schedule]:
        return self._portal.call(self._async.list())

    def pause(self, id: str) -> Schedule:
        return self._portal.call(self._async.pause(id))

    def resume(self, id: str) -> Schedule:
        return self._portal.call(self._async.resume(id))

    def toggle(self, id: str) -> bool:
        return self._portal.call(self._async.toggle(id))

    def remove(self, id: str) -> bool:
        return self._portal.call(self._async.remove(id))
