"""Schedules, queues and limits on PostgreSQL: the flow-control verbs and the limit-aware claim.

Fires: one transaction per schedule pass locks the schedule row (passes over one schedule serialise), checks
that its next fire is still the one the scheduler computed from, applies the overlap policy and inserts each
fire with ``ON CONFLICT DO NOTHING`` on the unique (schedule, fire time) index, the arbiter of exactly-once.

Limits: the plain claim (queries.sql) leaves paused and limited queues and limited jobs alone; this claim
takes them. In one transaction it takes a transaction-scoped advisory lock per limited job and queue among
the candidates (ascending key order), then, in the next statement and so in a snapshot that includes every
claim committed before the lock was granted, counts running runs and rate-window starts, picks candidates
with ``FOR UPDATE SKIP LOCKED`` skipping saturated partitions, and claims those every limit has room for.
Concurrent claimers of the same limit therefore run one after another and can never exceed it; slots only
ever free up outside the lock (finish, cancel, release, reaping), which can only make the counts safer.
The transaction is pipelined (two round trips in the usual case: everything up to the first candidates,
then the claim and COMMIT), because the lock is held for all of it: a claim's round trips are every other
claimer's wait.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from importlib import resources
from typing import Any, LiteralString, TypeVar

import psycopg

from runlane.errors import InvalidSchedule
from runlane.limits import JobLimits, QueueLimits
from runlane.models import QueueInfo, Run, Schedule, to_datetime
from runlane.serialization import dumps
from runlane.store.flow import (
    FireRequest,
    ScheduleDef,
    SchedulesAndLimits,
    queue_infos,
    rate_limit,
    schedule_params,
)
from runlane.store.limiter import Admission, job_key
from runlane.store.postgres.listener import channel_array
from runlane.store.postgres.queries import _expand
from runlane.store.postgres.rows import run_from_row, text_array
from runlane.store.postgres.trip import one_trip, sync_and_fetch

T = TypeVar("T")
AConn = psycopg.AsyncConnection[Any]

SCHEDULE_COLUMNS = (
    'id, job, args, cron, "interval", timezone, overlap, misfire, max_catch_up, queue, enabled, source, '
    "disabled_reason, next_fire_at, last_fire_at, created_at, updated_at"
)
MAX_ROUNDS = 16
FIRE_IDLE_TIMEOUT = "2s"
"""How long a fire transaction may sit idle before the server ends it (and its schedule row lock): a
scheduler stopped mid-fire (SIGSTOP, a partition, a blocked event loop) would otherwise hold that schedule
back for every other scheduler, past the misfire grace. A live pass is idle for milliseconds."""
LIMITS_TTL = 1.0
"""Seconds a store trusts its cached view of which queues and jobs are limited, to decide whether to run
the limit-aware claim at all (the plain claim excludes limited work in SQL whatever the cache says)."""

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _load() -> dict[str, LiteralString]:
    text = resources.files("runlane.store.postgres").joinpath("flow.sql").read_text("utf-8")
    parts = _NAME.split(text)
    out: dict[str, LiteralString] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        out[name] = _expand(body.replace("{schedule_columns}", SCHEDULE_COLUMNS)).strip().rstrip(";")
    return out


F = _load()


def _ts(value: float | None) -> datetime | None:
    return to_datetime(value)


def lock_key(kind: str, name: str) -> int:
    """A stable signed 64-bit advisory lock key for a limit."""
    digest = hashlib.blake2b(f"runlane{kind}\x1f{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def schedule_from_row(row: Any) -> Schedule:
    return Schedule(
        id=row[0],
        job=row[1],
        args=row[2],
        cron=row[3],
        interval=row[4],
        timezone=row[5],
        overlap=row[6],
        misfire=row[7],
        max_catch_up=row[8],
        queue=row[9],
        enabled=bool(row[10]),
        source=row[11],
        disabled_reason=row[12],
        next_fire_at=row[13],
        last_fire_at=row[14],
        created_at=row[15],
        updated_at=row[16],
    )


def _schedule_params(d: ScheduleDef, now: datetime | None, replace: bool) -> dict[str, Any]:
    return schedule_params(d, _ts(d.next_fire_at), now, replace=replace)


def _limited_view(
    queue_rows: Sequence[tuple[Any, ...]], job_rows: Sequence[tuple[Any, ...]]
) -> tuple[float, set[str], set[str]]:
    """What the ``queues`` and ``job_limits`` rows say is limited, stamped for ``LIMITS_TTL``."""
    limited_queues = {r[0] for r in queue_rows if r[2] is not None or r[3] is not None}
    return time.monotonic(), limited_queues, {r[0] for r in job_rows}


async def _fetch(conn: AConn, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    cur = await conn.execute(F[name], params)
    return await cur.fetchall() if cur.description else []


class PostgresFlow(SchedulesAndLimits):
    """The flow-control verbs of PostgresStore (mixed in; relies on its _run/_now/_token/notifier)."""

    _run: Callable[..., Awaitable[Any]]  # (body, *, retry_disconnect=True)
    _now: Callable[[], datetime | None]
    now: Callable[[], float]
    _token: str
    notifier: Any
    _limits_seen: tuple[float, set[str], set[str]] | None = None  # (read at, limited queues, limited jobs)

    async def _one(self, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        async def body(conn: AConn) -> list[tuple[Any, ...]]:
            return await _fetch(conn, name, params)

        rows: list[tuple[Any, ...]] = await self._run(body)
        return rows

    # -- schedules -----------------------------------------------------------------------------------------

    async def sync_code_schedules(self, defs: Sequence[ScheduleDef], *, removed_reason: str) -> None:
        now = self._now()

        async def body(conn: AConn) -> None:
            async with conn.transaction():
                for d in defs:
                    await conn.execute(F["upsert_schedule"], _schedule_params(d, now, False))
                await conn.execute(
                    F["disable_removed"], {"reason": removed_reason, "now": now, "ids": [d.id for d in defs]}
                )

        await self._run(body)

    async def add_schedule(self, schedule: ScheduleDef) -> Schedule:
        now = self._now()

        async def body(conn: AConn) -> Schedule:
            async with conn.transaction():
                source = await _fetch(conn, "schedule_source", {"id": schedule.id})
                if source and source[0][0] == "code":
                    raise InvalidSchedule(
                        f"schedule id {schedule.id!r} belongs to a schedule declared in code; choose another id"
                    )
                rows = await _fetch(conn, "upsert_schedule", _schedule_params(schedule, now, True))
                return schedule_from_row(rows[0])

        result: Schedule = await self._run(body)
        return result

    async def get_schedule(self, schedule_id: str) -> Schedule | None:
        rows = await self._one("get_schedule", {"id": schedule_id})
        return schedule_from_row(rows[0]) if rows else None

    async def list_schedules(self) -> list[Schedule]:
        return [schedule_from_row(r) for r in await self._one("list_schedules", {})]

    async def set_schedule_enabled(
        self, schedule_id: str, enabled: bool, *, next_fire_at: float | None
    ) -> Schedule | None:
        rows = await self._one(
            "set_enabled",
            {"id": schedule_id, "enabled": enabled, "next_fire_at": _ts(next_fire_at), "now": self._now()},
        )
        return schedule_from_row(rows[0]) if rows else None

    async def remove_schedule(self, schedule_id: str) -> bool:
        return bool(await self._one("remove_schedule", {"id": schedule_id}))

    async def due_schedules(self, now: float) -> list[Schedule]:
        return [schedule_from_row(r) for r in await self._one("due_schedules", {"at": _ts(now)})]

    async def next_schedule_fire_at(self) -> float | None:
        rows = await self._one("next_schedule_fire_at", {})
        value: datetime | None = rows[0][0] if rows else None
        return None if value is None else value.timestamp()

    async def fire_schedule(self, request: FireRequest) -> list[Run]:
        now = self._now()
        now_ts = self.now()  # the database's clock: a fire still ahead of it waits as 'scheduled'

        async def body(conn: AConn) -> list[Run]:
            created: list[Run] = []
            async with conn.transaction():
                await conn.execute(F["bound_idle"], {"idle_timeout": FIRE_IDLE_TIMEOUT})
                state = await _fetch(conn, "fire_state", {"id": request.schedule_id})
                if not state:
                    return []  # paused, removed, or being fired by another scheduler right now
                job, args, queue, priority, max_attempts, overlap, next_at, key, active = state[0]
                if next_at is None or abs(next_at.timestamp() - request.expected_next_fire_at) > 1e-6:
                    return []  # another scheduler advanced it first
                for fire_at in request.fires:
                    status, due_at = "pending", _ts(fire_at)
                    if fire_at > now_ts:
                        status = "scheduled"
                    if active and overlap == "skip":
                        status, due_at = "skipped", None
                    elif active and overlap == "queue":
                        status, due_at = "scheduled", None  # held until the earlier runs end
                    rows = await _fetch(
                        conn,
                        "insert_fire",
                        {
                            "job": job,
                            "args": dumps(args),
                            "status": status,
                            "queue": queue,
                            "priority": priority,
                            "max_attempts": max_attempts,
                            "fire_at": _ts(fire_at),
                            "due_at": due_at,
                            "schedule": request.schedule_id,
                            "concurrency_key": key,
                            "now": now,
                        },
                    )
                    if rows:
                        created.append(run_from_row(rows[0]))
                        active = active or (overlap != "allow" and status != "skipped")
                await conn.execute(
                    F["advance_schedule"],
                    {
                        "id": request.schedule_id,
                        "next_fire_at": _ts(request.next_fire_at),
                        "last_fire_at": _ts(request.fires[-1]) if request.fires else None,
                        "now": now,
                    },
                )
                if created:
                    await conn.execute(
                        "SELECT count(pg_notify(ch, %(token)s)) FROM unnest(%(channels)s::text[]) AS ch",
                        {"token": self._token, "channels": channel_array("work", "change")},
                    )
            return created

        created: list[Run] = await self._run(body)
        if created:
            self.notifier.notify("work", "change")
        return created

    async def release_queued_fires(self) -> int:
        rows = await self._one(
            "release_queued_fires",
            {"now": self._now(), "token": self._token, "channels": channel_array("work", "change")},
        )
        released = int(rows[0][0]) if rows else 0
        if released:
            self.notifier.notify("work", "change")
        return released

    # -- queues and limits ---------------------------------------------------------------------------------

    async def register_limits(self, jobs: Sequence[JobLimits], queues: Sequence[QueueLimits]) -> None:
        now = self._now()
        limited = [j for j in jobs if j.limited]
        plain = [j.job for j in jobs if not j.limited]

        async def body(conn: AConn) -> None:
            async with conn.transaction():
                if limited:
                    await conn.execute(
                        F["upsert_job_limits"],
                        {
                            "job": [j.job for j in limited],
                            "max_concurrency": [j.max_concurrency for j in limited],
                            "rate_count": [j.rate_limit and j.rate_limit.count for j in limited],
                            "rate_period": [j.rate_limit and j.rate_limit.period for j in limited],
                            "now": now,
                        },
                    )
                if plain:
                    await conn.execute(F["delete_job_limits"], {"jobs": plain})
                if queues:
                    await conn.execute(
                        F["upsert_queue_limits"],
                        {
                            "name": [q.name for q in queues],
                            "max_concurrency": [q.max_concurrency for q in queues],
                            "rate_count": [q.rate_limit and q.rate_limit.count for q in queues],
                            "rate_period": [q.rate_limit and q.rate_limit.period for q in queues],
                            "now": now,
                        },
                    )

        await self._run(body)
        self._limits_seen = None

    async def set_queue_paused(self, queue: str, paused: bool) -> None:
        await self._one(
            "set_paused",
            {
                "name": queue,
                "paused": paused,
                "now": self._now(),
                "token": self._token,
                "channels": channel_array("work", "change"),
            },
        )
        self._limits_seen = None
        self.notifier.notify("work", "change")

    async def queue_stats(self) -> list[QueueInfo]:
        async def body(conn: AConn) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
            return await _fetch(conn, "queue_counts", {}), await _fetch(conn, "queues", {})

        count_rows, queue_rows = await self._run(body)
        return queue_infos(count_rows, queue_rows)

    # -- the limit-aware claim -------------------------------------------------------------------------------

    async def _limits_relevant(self, queues: Sequence[str], jobs: Sequence[str]) -> bool:
        seen = self._limits_seen
        if seen is None or time.monotonic() - seen[0] > LIMITS_TTL:

            async def body(conn: AConn) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
                return await _fetch(conn, "queues", {}), await _fetch(conn, "job_limits", {})

            seen = self._limits_seen = _limited_view(*await self._run(body))
        return any(q in seen[1] for q in queues) or any(j in seen[2] for j in jobs)

    async def claim_limited(
        self, worker_id: str, queues: Sequence[str], jobs: Sequence[str], limit: int, lease_timeout: float
    ) -> list[Run]:
        """Claim runs of paused-free, limited queues and limited jobs, up to ``limit`` (see the module)."""
        runs: list[Run] = []
        for _ in range(2):  # a second time only with the view of what is limited that the first one read
            claimed, stale = await self._claim_limited_once(
                worker_id, queues, jobs, limit - len(runs), lease_timeout
            )
            runs += claimed
            if not stale or len(runs) >= limit:
                break
        return runs

    async def _claim_limited_once(
        self, worker_id: str, queues: Sequence[str], jobs: Sequence[str], limit: int, lease_timeout: float
    ) -> tuple[list[Run], bool]:
        """One limit-aware claim transaction; also says whether it met a limit its cached view had not
        planned a lock for (the view is fresh now: a second claim will take those runs)."""
        if limit <= 0 or not await self._limits_relevant(queues, jobs):
            return [], False
        now = self._now()
        # Nothing limited due: no transaction, no limit locks. Idle workers polling would otherwise queue for
        # those locks on every poll, and a worker woken for new work would wait its turn (chaos test T15).
        # One statement over the cached view of what is limited (as stale as the check just above).
        assert self._limits_seen is not None
        _, limited_queues, limited_jobs = self._limits_seen
        due_params = {
            "queues": text_array(queues),
            "jobs": text_array(jobs),
            "limited_queues": text_array(sorted(limited_queues)),
            "limited_jobs": text_array(sorted(limited_jobs)),
            "now": now,
        }
        if not (await self._run(lambda conn: _fetch(conn, "limited_due", due_params)))[0][0]:
            return [], False

        # What to claim and which locks to take come from the cached view; the transaction reads the limits
        # again and admits only runs whose every limit it holds the lock of (see ``covered``).
        plan = {
            q: list(jobs) if q in limited_queues else [j for j in jobs if j in limited_jobs]
            for q in dict.fromkeys(queues)
        }
        plan = {q: js for q, js in plan.items() if js}
        if not plan:
            return [], False
        lock_jobs = sorted({j for js in plan.values() for j in js if j in limited_jobs})
        lock_queues = sorted(q for q in plan if q in limited_queues)
        keys = sorted({lock_key("job", j) for j in lock_jobs} | {lock_key("queue", q) for q in lock_queues})
        idle_ms = int(1000 * min(2.0, max(lease_timeout / 4, 0.2)))
        claim_params = {
            "worker": worker_id,
            "lease_timeout": float(lease_timeout),
            "now": now,
            "token": self._token,
            "channels": channel_array("change"),
        }

        async def candidates(conn: AConn, queue: str, full: list[str], need: int) -> psycopg.AsyncCursor[Any]:
            params = {"queue": queue, "jobs": plan[queue], "full": full, "limit": need, "now": now}
            return await conn.execute(F["limited_candidates"], params)

        stale: list[str] = []  # limits this transaction found but had not locked (the cached view was old)

        async def body(conn: AConn) -> list[tuple[Any, ...]]:
            claims: list[psycopg.AsyncCursor[Any]] = []
            # One pipelined transaction: the limit locks, the limits, the running counts and the first
            # candidates go out together; the claim, the rate starts and COMMIT in a second trip.
            async with one_trip(conn) as trip:
                await conn.execute(F["bound_idle"], {"idle_timeout": f"{idle_ms}ms"})
                await conn.execute(F["lock_limits"], {"keys": keys})
                queue_cur = await conn.execute(F["queues"])
                job_cur = await conn.execute(F["job_limits"])
                count_cur = await conn.execute(
                    F["running_counts"], {"jobs": lock_jobs, "queues": lock_queues}
                )
                arms = [await candidates(conn, q, [], limit) for q in plan]
                queue_rows, job_rows, count_rows, *arm_rows = await sync_and_fetch(
                    trip, queue_cur, job_cur, count_cur, *arms
                )
                self._limits_seen = _limited_view(queue_rows, job_rows)
                paused = {r[0] for r in queue_rows if r[1]}
                queue_limits = {
                    r[0]: QueueLimits(r[0], r[2], rate_limit(r[3], r[4]))
                    for r in queue_rows
                    if r[2] is not None or r[3] is not None
                }
                job_limits = {r[0]: JobLimits(r[0], r[1], rate_limit(r[2], r[3])) for r in job_rows}
                adm = Admission(job_limits, queue_limits)
                adm.count_running((r[0], r[1], r[2], int(r[3])) for r in count_rows)

                def covered(job: str, queue: str, key: str) -> bool:
                    """Whether this transaction may admit the run: its queue is not paused and it holds the
                    lock of every limit the run counts in (else the run's queue or partition is left out)."""
                    if queue in paused or (queue in queue_limits and queue not in lock_queues):
                        adm.closed.add(queue)
                        stale.extend([] if queue in paused else [queue])
                        return False
                    if job in job_limits and job not in lock_jobs:
                        adm.full.add(job_key(job, key))
                        stale.append(job)
                        return False
                    return True

                admitted = 0
                for _ in range(MAX_ROUNDS):
                    need = limit - admitted
                    rows: list[tuple[Any, ...]] = []
                    exhausted = True
                    for arm in arm_rows:
                        exhausted = exhausted and len(arm) < need
                        rows.extend(r for r in arm if covered(r[1], r[2], r[3]))
                    rows.sort(key=lambda r: (-r[4], r[5], r[0]))
                    missing = adm.missing_windows((r[1], r[2], r[3]) for r in rows)
                    if missing:
                        windows = {
                            "keys": list(missing),
                            "periods": [m.period for m in missing.values()],
                            "now": now,
                        }
                        (window_rows,) = await sync_and_fetch(
                            trip, await conn.execute(F["rate_windows"], windows)
                        )
                        for rk, n in window_rows:
                            adm.window_counts[rk] = int(n)
                    ids: list[int] = []
                    for r in rows:
                        if len(ids) >= need:
                            break
                        if adm.admit(r[1], r[2], r[3]):
                            ids.append(r[0])
                    if ids:  # read after COMMIT
                        claims.append(await conn.execute(F["claim_ids"], {**claim_params, "ids": ids}))
                        admitted += len(ids)
                    live = [q for q in plan if q not in adm.closed]
                    if exhausted or admitted >= limit or not live:
                        break
                    full = sorted(adm.full)
                    arm_rows = await sync_and_fetch(
                        trip, *[await candidates(conn, q, full, limit - admitted) for q in live]
                    )
                if adm.starts:
                    await conn.execute(F["rate_starts"], {"keys": adm.starts, "now": now})
            return [row for cur in claims for row in await cur.fetchall()]

        rows: list[tuple[Any, ...]] = await self._run(body, retry_disconnect=False)  # a claim: see _run
        if rows:
            self.notifier.notify("change")
        return [run_from_row(r) for r in rows], bool(stale)

    def limits_active(self) -> bool:
        seen = self._limits_seen
        return seen is not None and bool(seen[1] or seen[2])


__all__ = ["PostgresFlow", "job_key"]
