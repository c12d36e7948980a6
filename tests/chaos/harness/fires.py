"""Recurring fires under chaos (T11-T13): a crash hook on the fire path, a record of every scheduler plan,
and the checks that every (schedule, fire time) has exactly one run.

Both hooks are installed by ``chaos_app`` from the environment, in the worker process only (harness level,
nothing in the library):

* ``CHAOS_FIRE_CRASH_PLAN``: a file of ``step`` or ``step:n`` lines. Each worker process takes the first line
  when it starts and ``os._exit``s the n-th time (default 1) its scheduler reaches that step with a fire to
  create, after appending what it was creating to ``CHAOS_FIRE_CRASH_LOG`` (JSON lines). Steps, in order:
  ``planned`` (fires computed, store not called), ``inserted`` (a fire's run inserted, transaction open),
  ``advanced`` (schedule advanced, transaction not committed), ``committed`` (committed, tick not finished).
* ``CHAOS_RECORD_PLANS``: every scheduler pass that reaches the store is recorded in the ledger file's
  ``plans`` table: the pass's ``now`` (the clock it planned with), the fires, how many were left out as
  missed, how many runs it created.
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import json
import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.faults import INTERRUPTING
from harness.skew import real_time

PLAN_ENV = "CHAOS_FIRE_CRASH_PLAN"
LOG_ENV = "CHAOS_FIRE_CRASH_LOG"
RECORD_ENV = "CHAOS_RECORD_PLANS"
STEPS = ("planned", "inserted", "advanced", "committed")
CRASH_EXIT = 86

# -- the crash hook ------------------------------------------------------------------------------------------


def _take_step(plan: str) -> str | None:
    """Pop the first step of the plan file (under a lock: several processes may start at once)."""
    with open(plan, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        lines = [line.strip() for line in f if line.strip()]
        if not lines:
            return None
        f.seek(0)
        f.truncate()
        f.write("".join(f"{line}\n" for line in lines[1:]))
        return lines[0]


class _Crash:
    def __init__(self, step: str, nth: int, log_path: str) -> None:
        self.step = step
        self.left = nth
        self.log_path = log_path

    def __call__(self, step: str, schedule_id: str, fires: Sequence[float]) -> None:
        if step != self.step:
            return
        self.left -= 1
        if self.left > 0:
            return
        with open(self.log_path, "a") as f:
            entry = {"pid": os.getpid(), "step": step, "schedule": schedule_id, "fires": list(fires)}
            f.write(json.dumps({**entry, "t": real_time()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os._exit(CRASH_EXIT)


class _ConnProxy:
    """Forwards everything to a store connection; crashes right after the fire path's key statements."""

    def __init__(self, conn: Any, crash: _Crash, request: Any, queries: dict[str, str]) -> None:
        self._conn = conn
        self._crash = crash
        self._request = request
        self._insert = queries["insert_fire"]
        self._advance = queries["advance_schedule"]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def _after(self, query: Any, rowcount: int) -> None:
        req = self._request
        if query is self._insert and rowcount > 0:
            self._crash("inserted", req.schedule_id, req.fires)
        elif query is self._advance:
            self._crash("advanced", req.schedule_id, req.fires)

    def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        result = self._conn.execute(query, *args, **kwargs)
        if isinstance(result, Awaitable):

            async def done() -> Any:
                cur = await result
                self._after(query, cur.rowcount)
                return cur

            return done()
        self._after(query, result.rowcount)
        return result


def install_crash_hook_from_env() -> str | None:
    """Arm this process's crash at the step the plan gives it; the step, or None when there is none."""
    plan = os.environ.get(PLAN_ENV)
    if not plan:
        return None
    line = _take_step(plan)
    if line is None:
        return None
    step, _, nth = line.partition(":")
    if step not in STEPS:
        raise ValueError(f"unknown fire-path step {step!r}; expected one of {STEPS}")
    crash = _Crash(step, int(nth or 1), os.environ[LOG_ENV])

    from runlane.store.postgres import flow as pg_flow
    from runlane.store.postgres.store import PostgresStore
    from runlane.store.sqlite import flow as sq_flow
    from runlane.store.sqlite.connection import Tx
    from runlane.store.sqlite.store import SQLiteStore

    def around_store_call(cls: type) -> None:
        original = cls.fire_schedule

        @functools.wraps(original)
        async def fire_schedule(self: Any, request: Any) -> Any:
            if request.fires:
                crash("planned", request.schedule_id, request.fires)
            created = await original(self, request)
            if created:
                crash("committed", request.schedule_id, request.fires)
            return created

        cls.fire_schedule = fire_schedule

    around_store_call(SQLiteStore)
    around_store_call(PostgresStore)

    # Inside the transaction. SQLite: the module function the writer thread runs, given a proxied connection.
    sq_fire = sq_flow.fire_schedule

    def sqlite_fire(tx: Tx, now: float, req: Any) -> Any:
        proxy: Any = _ConnProxy(tx.conn, crash, req, sq_flow.F)
        return sq_fire(Tx(proxy, tx.topics), now, req)

    sq_flow.fire_schedule = sqlite_fire

    # PostgreSQL: fire_schedule runs its transaction through self._run(body); give that body a proxy.
    pg_fire = PostgresStore.fire_schedule

    async def pg_fire_schedule(self: Any, request: Any) -> Any:
        run = self._run

        async def proxied_run(body: Callable[[Any], Awaitable[Any]], **kw: Any) -> Any:
            return await run(lambda conn: body(_ConnProxy(conn, crash, request, pg_flow.F)), **kw)

        self._run = proxied_run
        try:
            return await pg_fire(self, request)
        finally:
            del self._run

    PostgresStore.fire_schedule = pg_fire_schedule  # type: ignore[method-assign]
    return step


def read_crashes(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# -- the plan record -----------------------------------------------------------------------------------------

_PLANS_SCHEMA = """
CREATE TABLE IF NOT EXISTS plans (
    id INTEGER PRIMARY KEY,
    pid INTEGER NOT NULL,
    schedule_id TEXT NOT NULL,
    now REAL NOT NULL,
    expected REAL NOT NULL,
    fires TEXT NOT NULL,
    next_fire_at REAL,
    missed INTEGER NOT NULL,
    created INTEGER NOT NULL,
    t REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Plan:
    pid: int
    schedule_id: str
    now: float
    expected: float
    fires: tuple[float, ...]
    next_fire_at: float | None
    missed: int
    created: int
    t: float


def _plans_conn(ledger_dir: str) -> sqlite3.Connection:
    conn = sqlite3.connect(
        Path(ledger_dir) / "plans.db", timeout=60, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(_PLANS_SCHEMA)
    return conn


def install_plan_recorder_from_env() -> bool:
    """Record every scheduler pass (see the module); True when asked to."""
    if not os.environ.get(RECORD_ENV):
        return False
    from runlane.scheduler import schedules
    from runlane.store.postgres.store import PostgresStore
    from runlane.store.sqlite.store import SQLiteStore

    conn = _plans_conn(os.environ["CHAOS_LEDGER"])
    last: dict[str, Any] = {}
    plan_fires = schedules.plan_fires

    def recording_plan_fires(timing: Any, **kw: Any) -> Any:
        plan = plan_fires(timing, **kw)
        # The scheduler stores this plan with no await in between: the next fire_schedule call is its own.
        last.update(now=kw["now"], missed=plan.missed)
        return plan

    schedules.plan_fires = recording_plan_fires  # type: ignore[assignment]

    for cls in (SQLiteStore, PostgresStore):
        original = cls.fire_schedule

        def wrap(original: Any) -> Any:
            async def fire_schedule(self: Any, request: Any) -> Any:
                seen = dict(last)
                created = await original(self, request)
                conn.execute(
                    "INSERT INTO plans (pid, schedule_id, now, expected, fires, next_fire_at, missed,"
                    " created, t) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        os.getpid(),
                        request.schedule_id,
                        seen.get("now", float("nan")),
                        request.expected_next_fire_at,
                        json.dumps(list(request.fires)),
                        request.next_fire_at,
                        seen.get("missed", 0),
                        len(created),
                        real_time(),
                    ),
                )
                return created

            return fire_schedule

        cls.fire_schedule = wrap(original)
    return True


def read_plans(ledger_path: str | Path) -> list[Plan]:
    conn = _plans_conn(str(ledger_path))
    try:
        rows = conn.execute(
            "SELECT pid, schedule_id, now, expected, fires, next_fire_at, missed, created, t FROM plans"
            " ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    return [Plan(r[0], r[1], r[2], r[3], tuple(json.loads(r[4])), r[5], r[6], r[7], r[8]) for r in rows]


# -- checks --------------------------------------------------------------------------------------------------


def ts(value: datetime | float) -> float:
    return value.timestamp() if isinstance(value, datetime) else float(value)


def cron_fires(expression: str, after: float, until: float) -> list[float]:
    """Fire times of a UTC cron expression in ``(after, until]``, by cronsim directly (not the scheduler)."""
    from cronsim import CronSim

    out: list[float] = []
    start = datetime.fromtimestamp(int(after), UTC)  # whole seconds: cronsim's resolution
    for dt in CronSim(expression, start):
        t = dt.timestamp()
        if t > until:
            break
        if t > after:
            out.append(t)
    return out


def wait_fired(
    client: Any, schedules: dict[str, Any], until: float, timeout: float, context: str = ""
) -> None:
    """Until every schedule (id -> Schedule as added) has a run for its last fire at or before ``until`` (or
    for its first fire, if that is later): the schedulers caught up."""
    targets = {}
    for sid, schedule in schedules.items():
        first = ts(schedule.next_fire_at)
        due = cron_fires(schedule.cron, until - 120.0, until)
        targets[sid] = max(first, due[-1]) if due else first
    deadline = time.time() + timeout + max(targets.values()) - until
    while True:
        lagging = [
            sid
            for sid, target in targets.items()
            if (s := client.schedules.get(sid)).last_fire_at is None or ts(s.last_fire_at) < target - 1e-6
        ]
        if not lagging:
            return
        if time.time() > deadline:
            raise AssertionError(f"schedules {lagging} never fired up to {until:.3f}\n{context}")
        time.sleep(0.2)


def store_fire_counts(url: str) -> dict[tuple[str, float], int]:
    """Runs per (schedule, fire time), counted by SQL directly on the runs table (not through the store)."""
    query = (
        "SELECT schedule_id, not_before, count(*) FROM runlane_runs"
        " WHERE schedule_id IS NOT NULL GROUP BY schedule_id, not_before"
    )
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30)
        try:
            rows = conn.execute(query).fetchall()
        finally:
            conn.close()
    else:
        import psycopg

        with psycopg.connect(url) as pg:
            rows = pg.execute(query).fetchall()
    return {(r[0], round(ts(r[1]), 6)): int(r[2]) for r in rows}


@dataclass
class FireReport:
    """What T11-T13 assert about fires; ``problems`` empty means the fires were exactly once."""

    fires: int = 0
    skipped: int = 0
    duplicates: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    missing_while_locked: int = 0  # fires due while a paused process held the SQLite write lock
    overlaps: list[str] = field(default_factory=list)
    wrong_time: list[str] = field(default_factory=list)

    @property
    def problems(self) -> dict[str, list[str]]:
        named = {
            "duplicate fires": self.duplicates,
            "missing fires": self.missing,
            "overlapping runs of a skip schedule": self.overlaps,
            "executions without their fire time": self.wrong_time,
        }
        return {k: v for k, v in named.items() if v}

    def assert_ok(self, context: str = "") -> None:
        problems = self.problems
        if problems:
            lines = [f"fire violations (fires={self.fires} skipped={self.skipped}):"]
            for name, items in problems.items():
                lines.append(f"  {name}: {len(items)}")
                lines.extend(f"    - {item}" for item in items[:15])
            if context:
                lines.append(context)
            raise AssertionError("\n".join(lines))

    def summary(self) -> str:
        return (
            f"fires={self.fires} skipped={self.skipped} duplicates={len(self.duplicates)} "
            f"missing={len(self.missing)} overlaps={len(self.overlaps)} wrong_time={len(self.wrong_time)}"
        )


def _stopped_between(execution: Any, before: float, faults: Sequence[Any]) -> bool:
    """Was the execution's process killed, stopped or cut off after it started and before ``before``?"""
    return any(
        f.kind in INTERRUPTING
        and (f.pid is None or f.pid == execution.pid)
        and f.t_start <= before
        and f.until >= execution.t_start - 0.001
        for f in faults
    )


def _killed_at(execution: Any, faults: Sequence[Any]) -> float | None:
    kills = [
        f.t_start
        for f in faults
        if f.kind in {"kill", "crash"} and f.pid == execution.pid and f.t_start >= execution.t_start
    ]
    return min(kills, default=None)


def check_fires(
    state: Any,
    executions: Sequence[Any],
    store_counts: dict[tuple[str, float], int],
    expected: dict[str, Iterable[float]],
    *,
    faults: Sequence[Any] = (),
    skip_schedules: Iterable[str] = (),
) -> FireReport:
    """Exactly once per fire: at most one run per (schedule, fire time) by the store's rows, by the SQL count
    and by the ledger (distinct runs executed per fire); a run for every ``expected`` fire; each execution
    carries its run's fire time; runs of ``skip_schedules`` (overlap ``skip``) never active at the same time
    (store), and their executions never overlap unless the earlier one's worker was killed or paused."""
    report = FireReport()
    runs_by_fire: dict[tuple[str, float], list[Any]] = defaultdict(list)
    for run in state.runs.values():
        if run.schedule_id is None or run.not_before is None:
            continue
        runs_by_fire[(run.schedule_id, round(ts(run.not_before), 6))].append(run)
    report.fires = len(runs_by_fire)
    report.skipped = sum(1 for r in state.runs.values() if r.schedule_id and r.status.value == "skipped")
    for (sid, at), runs in sorted(runs_by_fire.items()):
        if len(runs) > 1:
            report.duplicates.append(f"store: {sid} @ {at:.3f} has runs {sorted(r.id for r in runs)}")
    for (sid, at), n in sorted(store_counts.items()):
        if n > 1:
            report.duplicates.append(f"sql: {sid} @ {at:.3f} counted {n} runs")
    executed: dict[tuple[str, float], set[int]] = defaultdict(set)
    for e in executions:
        run = state.runs.get(e.run_id)
        if run is None or run.schedule_id is None:
            continue
        if (
            e.scheduled_at is None
            or run.not_before is None
            or abs(e.scheduled_at - ts(run.not_before)) > 1e-3
        ):
            report.wrong_time.append(f"run {run.id} executed with scheduled_at={e.scheduled_at}")
        if e.key != run.schedule_id:
            report.wrong_time.append(f"run {run.id} of {run.schedule_id} executed with key {e.key}")
        if e.scheduled_at is not None:
            executed[(run.schedule_id, round(e.scheduled_at, 6))].add(e.run_id)
    for (sid, at), ids in sorted(executed.items()):
        if len(ids) > 1:
            report.duplicates.append(f"ledger: {sid} @ {at:.3f} executed by runs {sorted(ids)}")
    # A process stopped while it held the SQLite file's write lock stops every scheduler's writes until it
    # resumes: a store outage, after which the misfire policy decides (fires later than its grace are missed).
    locked = [(f.t_start - 1.0, f.until) for f in faults if f.kind == "sqlite_write_locked"]
    for sid, times in expected.items():
        for at in times:
            if (sid, round(at, 6)) not in runs_by_fire:
                if any(lo <= at <= hi for lo, hi in locked):
                    report.missing_while_locked += 1
                    continue
                report.missing.append(
                    f"{sid} @ {at:.3f} ({datetime.fromtimestamp(at, UTC):%H:%M:%S}) has no run"
                )

    for sid in skip_schedules:
        runs = sorted(
            (r for r in state.runs.values() if r.schedule_id == sid and r.status.value != "skipped"),
            key=lambda r: r.created_at,
        )
        for earlier, later in itertools.pairwise(runs):
            ended = earlier.finished_at
            if ended is None or ended > later.created_at:
                report.overlaps.append(
                    f"store: {sid} run {later.id} created at {later.created_at:%H:%M:%S.%f} while run "
                    f"{earlier.id} was active (ended {ended})"
                )
        execs = sorted(
            (
                e
                for e in executions
                if (run := state.runs.get(e.run_id)) is not None and run.schedule_id == sid
            ),
            key=lambda e: e.t_start,
        )
        for i, earlier in enumerate(execs):
            end = earlier.t_end if earlier.t_end is not None else _killed_at(earlier, faults)
            for later in execs[i + 1 :]:
                if later.run_id == earlier.run_id:
                    continue  # the same run again: a reclaim, judged by the main checker
                if end is not None and later.t_start >= end:
                    break
                if not _stopped_between(earlier, later.t_start, faults):
                    report.overlaps.append(
                        f"ledger: {sid} run {later.run_id} started while run {earlier.run_id} was executing"
                    )
    return report
