"""Schedules, queues and limits on SQLite: the flow-control verbs and the limit-aware claim.

Everything that decides runs inside the writer thread's transaction (``BEGIN IMMEDIATE``): a fire's unique
key, its overlap check and the schedule's advance; a claim's running counts, rate windows and the claim
itself. One writer per file serialises these across threads and processes, so counts read in a claim cannot
be changed by another claim before it commits: limits are never exceeded.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

from runlane.errors import InvalidSchedule
from runlane.limits import JobLimits, QueueLimits
from runlane.models import QueueInfo, Run, Schedule, to_datetime
from runlane.serialization import dumps, loads
from runlane.store.flow import (
    FireRequest,
    ScheduleDef,
    SchedulesAndLimits,
    queue_infos,
    rate_limit,
    schedule_params,
)
from runlane.store.limiter import Admission, job_key
from runlane.store.sqlite import writes
from runlane.store.sqlite.connection import Tx
from runlane.store.sqlite.rows import run_from_row, status_data
from runlane.store.sqlite.sql import _NAME
from runlane.store.sqlite.sql import Q as RUN_Q

T = TypeVar("T")
MAX_ROUNDS = 16


def _load() -> dict[str, str]:
    text = resources.files("runlane.store.sqlite").joinpath("flow.sql").read_text("utf-8")
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.strip().splitlines() if not line.lstrip().startswith("--")]
        queries[name] = "\n".join(lines).strip()
    cols = queries["schedule_columns"]
    return {
        n: q.replace("{schedule_columns}", cols).replace("{run_columns}", RUN_Q["run_columns"])
        for n, q in queries.items()
    }


F = _load()


def schedule_from_row(row: Any) -> Schedule:
    return Schedule(
        id=row[0],
        job=row[1],
        args=loads(row[2]),
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
        next_fire_at=to_datetime(row[13]),
        last_fire_at=to_datetime(row[14]),
        created_at=to_datetime(row[15]),  # type: ignore[arg-type]
        updated_at=to_datetime(row[16]),  # type: ignore[arg-type]
    )


# -- schedules --------------------------------------------------------------------------------------------------


def _upsert(tx: Tx, now: float, d: ScheduleDef, *, replace: bool) -> None:
    tx.conn.execute(F["upsert_schedule"], schedule_params(d, d.next_fire_at, now, replace=replace))


def sync_code_schedules(tx: Tx, now: float, defs: Sequence[ScheduleDef], reason: str) -> None:
    for d in defs:
        _upsert(tx, now, d, replace=False)
    tx.conn.execute(F["disable_removed"], {"reason": reason, "now": now, "ids": dumps([d.id for d in defs])})
    tx.topics.add("change")


def add_schedule(tx: Tx, now: float, d: ScheduleDef) -> Schedule:
    row = tx.conn.execute(F["schedule_source"], (d.id,)).fetchone()
    if row is not None and row[0] == "code":
        raise InvalidSchedule(
            f"schedule id {d.id!r} belongs to a schedule declared in code; choose another id"
        )
    _upsert(tx, now, d, replace=True)
    tx.topics.add("change")
    return schedule_from_row(tx.conn.execute(F["get_schedule"], (d.id,)).fetchone())


def set_enabled(
    tx: Tx, now: float, schedule_id: str, enabled: bool, next_fire_at: float | None
) -> Schedule | None:
    params = {"id": schedule_id, "enabled": enabled, "now": now, "next_fire_at": next_fire_at}
    if tx.conn.execute(F["set_enabled"], params).rowcount == 0:
        return None
    tx.topics.add("change")
    return schedule_from_row(tx.conn.execute(F["get_schedule"], (schedule_id,)).fetchone())


def fire_schedule(tx: Tx, now: float, req: FireRequest) -> list[Run]:
    conn = tx.conn
    state = conn.execute(F["fire_state"], (req.schedule_id,)).fetchone()
    if state is None or state[6] is None or abs(state[6] - req.expected_next_fire_at) > 1e-6:
        return []  # paused, removed, or another scheduler advanced it first
    job, args, queue, priority, max_attempts, overlap, _, key = state
    created: list[int] = []
    active = overlap != "allow" and conn.execute(F["schedule_active_run"], (req.schedule_id,)).fetchone()
    for fire_at in req.fires:
        status, finished_at = "pending", None
        due_at: float | None = fire_at  # claim order follows the intended fire times
        if fire_at > now:
            status, due_at = "scheduled", fire_at
        if active and overlap == "skip":
            status, due_at, finished_at = "skipped", None, now
        elif active and overlap == "queue":
            status, due_at = "scheduled", None  # held until the earlier runs end (release_queued_fires)
        row = conn.execute(RUN_Q["last_run_id"]).fetchone()
        run_id = (row[0] if row else 0) + 1
        cur = conn.execute(
            F["insert_fire"],
            {
                "id": run_id,
                "job": job,
                "args": args,
                "status": status,
                "queue": queue,
                "priority": priority,
                "max_attempts": max_attempts,
                "fire_at": fire_at,
                "due_at": due_at,
                "schedule": req.schedule_id,
                "now": now,
                "finished_at": finished_at,
                "concurrency_key": key,
            },
        )
        if cur.rowcount:  # 0: this (schedule, fire time) already has its run
            created.append(run_id)
            active = active or status != "skipped"
    conn.execute(
        F["advance_schedule"],
        {
            "id": req.schedule_id,
            "next_fire_at": req.next_fire_at,
            "last_fire_at": req.fires[-1] if req.fires else None,
            "now": now,
        },
    )
    if created:
        tx.topics |= {"work", "change"}
    return [run_from_row(r) for r in conn.execute(RUN_Q["get_runs"], (dumps(created),))]


def release_queued_fires(tx: Tx, now: float) -> int:
    conn = tx.conn
    ids = [row[0] for row in conn.execute(F["held_fires"]).fetchall()]
    events = []
    for run_id in ids:
        row = conn.execute(F["release_fire"], {"id": run_id, "now": now}).fetchone()
        if row is not None:
            events.append((row[0], row[2], "status", now, status_data("scheduled", "pending", row[1], None)))
    if events:
        conn.executemany(RUN_Q["insert_event"], events)
        tx.topics |= {"work", "change"}
    return len(events)


# -- queues and limits ------------------------------------------------------------------------------------------


def register_limits(tx: Tx, now: float, jobs: Sequence[JobLimits], queues: Sequence[QueueLimits]) -> None:
    conn = tx.conn
    for j in jobs:
        if j.limited:
            rate = j.rate_limit
            conn.execute(
                F["upsert_job_limits"],
                (j.job, j.max_concurrency, rate and rate.count, rate and rate.period, now),
            )
        else:
            conn.execute(F["delete_job_limits"], (j.job,))
    for q in queues:
        rate = q.rate_limit
        conn.execute(
            F["upsert_queue_limits"],
            (q.name, q.max_concurrency, rate and rate.count, rate and rate.period, now),
        )
    tx.topics.add("work")


def queue_stats(conn: sqlite3.Connection) -> list[QueueInfo]:
    return queue_infos(conn.execute(F["queue_counts"]).fetchall(), conn.execute(F["queues"]).fetchall())


# -- the claim -----------------------------------------------------------------------------------------------------


def read_limits(conn: sqlite3.Connection) -> tuple[set[str], dict[str, QueueLimits], dict[str, JobLimits]]:
    paused: set[str] = set()
    queues: dict[str, QueueLimits] = {}
    for name, is_paused, max_conc, rate_count, rate_period in conn.execute(F["queues"]):
        if is_paused:
            paused.add(name)
        if max_conc is not None or rate_count is not None:
            queues[name] = QueueLimits(name, max_conc, rate_limit(rate_count, rate_period))
    jobs = {
        job: JobLimits(job, max_conc, rate_limit(rc, rp))
        for job, max_conc, rc, rp in conn.execute(F["job_limits"])
    }
    return paused, queues, jobs


def claim(
    tx: Tx,
    now: float,
    worker_id: str,
    queues: Sequence[str],
    jobs: Sequence[str],
    limit: int,
    lease_timeout: float,
) -> tuple[list[Run], bool]:
    """Claim with paused queues skipped and limits enforced; also says whether limits were in play."""
    paused, queue_limits, job_limits = read_limits(tx.conn)
    open_queues = [q for q in dict.fromkeys(queues) if q not in paused]
    limited = any(q in queue_limits for q in open_queues) or any(j in job_limits for j in jobs)
    if not limited:
        if not open_queues:
            writes.promote_due(tx, now)
            return [], False
        return writes.claim(tx, now, worker_id, open_queues, jobs, limit, lease_timeout), False
    writes.promote_due(tx, now)
    if not open_queues or not jobs or limit <= 0:
        return [], True
    adm = Admission(job_limits, queue_limits)
    adm.count_running((job, queue, key, 1) for job, queue, key in tx.conn.execute(F["running_runs"]))
    conn = tx.conn
    claimed: list[Run] = []
    expires = now + lease_timeout
    width = writes._RUN_WIDTH
    keyed: dict[str, bool] = {}

    def searched(job: str) -> bool:
        """Whether runs of ``job`` may still be admitted: else the arm would walk every pending run of the
        queue to find none (runlane_runs_keyed answers whether other partitions have runs pending)."""
        if not adm.unkeyed_shut(job):
            return True
        if job not in keyed:
            keyed[job] = conn.execute(F["keyed_pending"], (job,)).fetchone() is not None
        return keyed[job]

    for _ in range(MAX_ROUNDS):
        need = limit - len(claimed)
        live = [q for q in open_queues if q not in adm.closed]
        arm_jobs = [j for j in jobs if searched(j)]
        if need <= 0 or not live or not arm_jobs:
            break
        rows: list[Any] = []
        exhausted = True
        for queue in live:
            params = {
                "queue": queue,
                "now": now,
                "jobs": dumps(arm_jobs),
                "full": dumps(sorted(adm.full | {job_key(j, "") for j in arm_jobs if adm.unkeyed_shut(j)})),
                "limit": need,
            }
            arm = conn.execute(F["limited_claim_arm"], params).fetchall()
            exhausted = exhausted and len(arm) < need
            rows.extend(arm)
        rows.sort(key=lambda r: (-r[5], r[width + 1], r[0]))  # priority desc, due_at, id
        for rk, rate in adm.missing_windows((r[1], r[4], r[width + 2] or "") for r in rows).items():
            conn.execute(F["rate_trim"], (rk, now - rate.period))
            adm.window_counts[rk] = conn.execute(F["rate_window"], (rk, now - rate.period)).fetchone()[0]
        admitted: list[Any] = []
        for row in rows:
            if len(admitted) >= need:
                break
            if adm.admit(row[1], row[4], row[width + 2] or ""):
                admitted.append(row[: width + 2])
        claimed.extend(writes.apply_claim(tx, now, worker_id, admitted, expires))
        if exhausted:  # every candidate was seen: the rest are held back by their limits
            break
    if adm.starts:
        conn.executemany(F["rate_start"], [(rk, now) for rk in adm.starts])
    return claimed, True


class SQLiteFlow(SchedulesAndLimits):
    """The flow-control verbs of SQLiteStore (mixed in; relies on its _write/_read/now)."""

    _write: Callable[..., Any]
    _read: Callable[..., Any]
    now: Callable[[], float]

    async def sync_code_schedules(self, defs: Sequence[ScheduleDef], *, removed_reason: str) -> None:
        await self._write(lambda tx: sync_code_schedules(tx, self.now(), defs, removed_reason))

    async def add_schedule(self, schedule: ScheduleDef) -> Schedule:
        result: Schedule = await self._write(lambda tx: add_schedule(tx, self.now(), schedule))
        return result

    async def get_schedule(self, schedule_id: str) -> Schedule | None:
        def read(conn: sqlite3.Connection) -> Schedule | None:
            row = conn.execute(F["get_schedule"], (schedule_id,)).fetchone()
            return None if row is None else schedule_from_row(row)

        result: Schedule | None = await self._read(read)
        return result

    async def list_schedules(self) -> list[Schedule]:
        result: list[Schedule] = await self._read(
            lambda conn: [schedule_from_row(r) for r in conn.execute(F["list_schedules"])]
        )
        return result

    async def set_schedule_enabled(
        self, schedule_id: str, enabled: bool, *, next_fire_at: float | None
    ) -> Schedule | None:
        result: Schedule | None = await self._write(
            lambda tx: set_enabled(tx, self.now(), schedule_id, enabled, next_fire_at)
        )
        return result

    async def remove_schedule(self, schedule_id: str) -> bool:
        def op(tx: Tx) -> bool:
            gone = tx.conn.execute(F["remove_schedule"], (schedule_id,)).rowcount > 0
            if gone:
                tx.topics.add("change")
            return gone

        result: bool = await self._write(op)
        return result

    async def due_schedules(self, now: float) -> list[Schedule]:
        result: list[Schedule] = await self._read(
            lambda conn: [schedule_from_row(r) for r in conn.execute(F["due_schedules"], (now,))]
        )
        return result

    async def next_schedule_fire_at(self) -> float | None:
        def read(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(F["next_schedule_fire_at"]).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        result: float | None = await self._read(read)
        return result

    async def fire_schedule(self, request: FireRequest) -> list[Run]:
        result: list[Run] = await self._write(lambda tx: fire_schedule(tx, self.now(), request))
        return result

    async def release_queued_fires(self) -> int:
        # Looked for on a reader first: every scheduler pass asks, and most find nothing to take the write
        # lock for. The write re-runs the same query under the lock, so the answer it acts on is current.
        held: list[Any] = await self._read(lambda conn: conn.execute(F["held_fires"]).fetchall())
        if not held:
            return 0
        result: int = await self._write(lambda tx: release_queued_fires(tx, self.now()))
        return result

    async def register_limits(self, jobs: Sequence[JobLimits], queues: Sequence[QueueLimits]) -> None:
        await self._write(lambda tx: register_limits(tx, self.now(), jobs, queues))

    async def set_queue_paused(self, queue: str, paused: bool) -> None:
        def op(tx: Tx) -> None:
            tx.conn.execute(F["set_paused"], (queue, int(paused), self.now()))
            tx.topics |= {"work", "change"}

        await self._write(op)

    async def queue_stats(self) -> list[QueueInfo]:
        result: list[QueueInfo] = await self._read(queue_stats)
        return result
