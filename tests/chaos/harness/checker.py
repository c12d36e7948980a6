"""One checker for every chaos test: a pure function of the store's final state, the execution ledger, the
client log and the fault log (RELIABILITY.md §1). It judges; the tests only assert on its report."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.clientlog import Op
from harness.faults import ENDING, INTERRUPTING, Fault
from harness.ledger import Execution
from runlane.models import Attempt, Event, Run, RunFilter
from runlane.store import Store, create_store

# Spec §2 transitions, as status events (from, to). Runs are created pending or scheduled.
LEGAL = frozenset(
    {
        ("scheduled", "pending"),
        ("scheduled", "cancelled"),
        ("scheduled", "skipped"),
        ("pending", "running"),
        ("pending", "cancelled"),
        ("pending", "scheduled"),
        ("running", "succeeded"),
        ("running", "failed"),
        ("running", "retrying"),
        ("running", "cancelled"),
        ("running", "pending"),  # released at shutdown, or reclaimed after a lost lease
        ("retrying", "running"),
        ("retrying", "pending"),
        ("retrying", "cancelled"),
        ("failed", "pending"),  # retry
        ("cancelled", "pending"),  # retry
    }
)
WORKER_LOST = "WorkerLost"


@dataclass(frozen=True)
class StoreState:
    runs: dict[int, Run]
    attempts: dict[int, list[Attempt]]
    events: dict[int, list[Event]]


async def _read(store: Store, with_events: bool) -> StoreState:
    runs: dict[int, Run] = {}
    before: int | None = None
    while True:
        page = await store.list_runs(RunFilter(), limit=500, before_id=before)
        if not page:
            break
        for run in page:
            runs[run.id] = run
        before = page[-1].id
    attempts: dict[int, list[Attempt]] = {}
    events: dict[int, list[Event]] = {}
    for run_id in runs:
        attempts[run_id] = await store.attempts(run_id)
        if with_events:
            got: list[Event] = []
            since: int | None = None
            while True:
                chunk = await store.events(run_id, since=since, limit=1000)
                got.extend(chunk)
                if len(chunk) < 1000:
                    break
                since = chunk[-1].id
            events[run_id] = got
    return StoreState(runs, attempts, events)


def read_store(url: str, *, with_events: bool = True) -> StoreState:
    async def go() -> StoreState:
        store = create_store(url)
        await store.open()
        try:
            return await _read(store, with_events)
        finally:
            await store.close()

    return asyncio.run(go())


def wait_all_terminal(url: str, deadline: float, *, expected: int | None = None, poll: float = 0.25) -> float:
    """Wait until every run is terminal (and at least ``expected`` exist); the wall time when it happened."""

    async def go() -> float:
        store = create_store(url)
        await store.open()
        try:
            while True:
                stats = await store.queue_stats()
                active = sum(q.pending + q.running + q.scheduled + q.retrying for q in stats)
                total = None
                if expected is not None:
                    total = len(await _all_ids(store))
                if active == 0 and (expected is None or (total or 0) >= expected):
                    return time.time()
                if time.time() > deadline:
                    raise TimeoutError(f"{active} runs still not terminal at the deadline")
                await asyncio.sleep(poll)
        finally:
            await store.close()

    return asyncio.run(go())


async def _all_ids(store: Store) -> list[int]:
    ids: list[int] = []
    before: int | None = None
    while True:
        page = await store.list_runs(RunFilter(), limit=1000, before_id=before)
        if not page:
            return ids
        ids.extend(r.id for r in page)
        before = page[-1].id


@dataclass
class Report:
    runs: int = 0
    executions: int = 0
    faults: int = 0
    lost: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    duplicates_justified: int = 0
    duplicates_unjustified: list[str] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)
    accounting: list[str] = field(default_factory=list)
    legality: list[str] = field(default_factory=list)
    max_overlap: dict[str, int] = field(default_factory=dict)
    recovery_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def violations(self) -> dict[str, list[str]]:
        return {
            name: items
            for name, items in (
                ("lost", self.lost),
                ("unexpected", self.unexpected),
                ("unjustified duplicates", self.duplicates_unjustified),
                ("limit overlaps", self.overlaps),
                ("accounting", self.accounting),
                ("legality", self.legality),
            )
            if items
        }

    def assert_ok(self, context: str = "") -> None:
        problems = self.violations
        if problems:
            lines = [f"chaos checker found violations ({self.summary()}):"]
            for name, items in problems.items():
                lines.append(f"  {name}: {len(items)}")
                lines.extend(f"    - {item}" for item in items[:15])
            if context:
                lines.append(context)
            raise AssertionError("\n".join(lines))

    def summary(self) -> str:
        return (
            f"runs={self.runs} executions={self.executions} faults={self.faults} lost={len(self.lost)} "
            f"unexpected={len(self.unexpected)} duplicates justified={self.duplicates_justified} "
            f"unjustified={len(self.duplicates_unjustified)} overlaps={len(self.overlaps)} "
            f"max_overlap={self.max_overlap} recovery_s={self.recovery_s}"
        )

    def figures(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "executions": self.executions,
            "faults": self.faults,
            "lost": len(self.lost),
            "unexpected": len(self.unexpected),
            "duplicates_justified": self.duplicates_justified,
            "duplicates_unjustified": len(self.duplicates_unjustified),
            "limit_overlaps": len(self.overlaps),
            "accounting": len(self.accounting),
            "legality": len(self.legality),
            "max_overlap": self.max_overlap,
            "recovery_s": None if self.recovery_s is None else round(self.recovery_s, 2),
            **self.extra,
        }


def _interrupted(execution: Execution, before: float, faults: Sequence[Fault], begin: float) -> bool:
    """Was this execution's worker killed, paused, partitioned or stopped after it started and before
    ``before`` (the next execution's start)?"""
    for f in faults:
        if f.kind not in INTERRUPTING or (f.pid is not None and f.pid != execution.pid):
            continue
        if f.t_start > before:
            continue
        if f.kind in ENDING or f.until >= begin - 0.001:
            # After a kill or SIGTERM the process runs nothing new, so every execution on it (even one whose
            # ledger row was written just after the signal was sent) was interrupted by it.
            return True
    return False


def _kill_time(execution: Execution, faults: Sequence[Fault]) -> float | None:
    times = [
        f.t_start
        for f in faults
        if f.kind in {"kill", "crash"} and f.pid == execution.pid and f.t_start >= execution.t_start
    ]
    return min(times, default=None)


def _stopped_between(pid: int, start: float, end: float, faults: Sequence[Fault]) -> float:
    """Seconds process ``pid`` spent paused between ``start`` and ``end``: a zombie executes nothing then (the
    full tier's nemesis pauses the same worker again before it has noticed its first lost lease)."""
    spans = sorted(
        (max(f.t_start, start), min(f.t_end if f.t_end is not None else end, end))
        for f in faults
        if f.kind == "pause" and f.pid == pid and f.t_start < end and (f.t_end is None or f.t_end > start)
    )
    total, reach = 0.0, start
    for lo, hi in spans:
        lo = max(lo, reach)
        if hi > lo:
            total += hi - lo
            reach = hi
    return total


SIGNAL_SLACK = 0.1
"""Seconds by which an execution's recorded start may follow the recorded start of a pause of its process.
SIGSTOP takes effect when the kernel next interrupts the process's threads, and the harness records the
pause after ``kill`` returns: on a loaded machine a job thread recorded its start a little after the pause
and then stopped (a limits flake: an execution of 4.04 s against a 4 s pause, counted whole)."""


def _clip_zombie(
    e: Execution, end: float, faults: Sequence[Fault], state: StoreState, report: Report
) -> float:
    """A paused worker whose attempt was reclaimed meanwhile executes nothing while stopped; once resumed it is
    a fenced zombie until it notices the lost lease. Count its execution up to the pause for limits, and
    record the zombie tail (resume to stop) so that a test can bound it."""
    for f in faults:
        if f.kind != "pause" or f.pid != e.pid or not e.t_start - SIGNAL_SLACK < f.t_start < end:
            continue
        attempt = next((a for a in state.attempts.get(e.run_id, []) if a.number == e.attempt), None)
        if attempt is None or attempt.error is None or attempt.error.type != WORKER_LOST:
            continue
        tail = max(end - f.until - _stopped_between(e.pid, f.until, end, faults), 0.0)
        if tail >= report.extra.get("zombie_tail_max_s", 0.0):
            report.extra["zombie_tail_max_s"] = tail
            report.extra["zombie_tail_case"] = f"{e} paused {f.t_start:.3f}-{f.until:.3f} end {end:.3f}"
        return max(f.t_start, e.t_start)
    return end


def _describe(span: tuple[float, float, Execution], state: StoreState, faults: Sequence[Fault]) -> str:
    """One execution counted against a limit: what the ledger, the store and the fault log say about it."""
    start, end, e = span
    attempt = next((a for a in state.attempts.get(e.run_id, []) if a.number == e.attempt), None)
    error = attempt.error.type if attempt is not None and attempt.error is not None else None
    status = attempt.status.value if attempt is not None else "no attempt row"
    ledger_end = "none" if e.t_end is None else f"{e.t_end:.3f}"
    nearby = [
        f"{f.kind} {f.t_start:.3f}-{f.until:.3f}"
        for f in faults
        if f.pid in (e.pid, None) and f.t_start <= e.t_start + 5.0 and f.until >= e.t_start - 5.0
    ]
    return (
        f"run {e.run_id} attempt {e.attempt} pid {e.pid} counted {start:.3f}-{end:.3f} "
        f"(ledger start {e.t_start:.3f} end {ledger_end}, outcome {e.outcome}; attempt {status}, "
        f"error {error}; faults of its process {nearby or 'none'})"
    )


def check(
    state: StoreState,
    executions: Sequence[Execution],
    ops: Sequence[Op],
    faults: Sequence[Fault],
    *,
    limits: dict[str, int] | None = None,
    limit_groups: Callable[[Run], Iterable[str]] | None = None,
    lease_expiry_justifies: bool = True,
    end_time: float | None = None,
    recovered_at: float | None = None,
    expected_failures: Callable[[Run], bool] | None = None,
) -> Report:
    """Judge one chaos run. ``limits`` maps a group name (``job:<name>``, ``queue:<name>``) to its maximum
    number of overlapping executions; ``limit_groups`` says which groups a run belongs to (default: its job
    and queue)."""
    report = Report(runs=len(state.runs), executions=len(executions), faults=len(faults))
    end_time = end_time if end_time is not None else time.time()
    by_run: dict[int, list[Execution]] = defaultdict(list)
    for e in executions:
        by_run[e.run_id].append(e)

    # lost / unexpected ------------------------------------------------------------------------------------------
    runs_by_key: dict[str, list[Run]] = defaultdict(list)
    for run in state.runs.values():
        key = run.args.get("key") if isinstance(run.args, dict) else None
        if key is not None:
            runs_by_key[str(key)].append(run)
    for op in ops:
        if op.outcome == "ok":
            run = state.runs.get(op.run_id) if op.run_id is not None else None
            if run is None:
                report.lost.append(f"trigger {op.key} returned run {op.run_id}, which does not exist")
            elif not run.status.is_terminal:
                report.lost.append(f"run {run.id} ({op.key}) still {run.status.value}")
        elif op.outcome in {"indeterminate", "invoked"}:
            for run in runs_by_key.get(op.key, []):
                if not run.status.is_terminal:
                    report.lost.append(
                        f"run {run.id} ({op.key}, indeterminate trigger) still {run.status.value}"
                    )
    claimed_keys = {op.key for op in ops if op.outcome in {"ok", "indeterminate", "invoked"}}
    for run in state.runs.values():
        if run.schedule_id is not None or run.parent_run_id is not None:
            continue
        key = run.args.get("key") if isinstance(run.args, dict) else None
        if key is None or str(key) not in claimed_keys:
            report.unexpected.append(f"run {run.id} ({run.job} {run.args}) has no trigger in the client log")
        if not run.status.is_terminal:
            message = f"run {run.id} still {run.status.value} at the end"
            if message not in report.lost:
                report.lost.append(message)
        if (expected_failures is None or not expected_failures(run)) and run.status.value == "failed":
            report.lost.append(f"run {run.id} ({run.job}) failed: {run.error}")

    # duplicates ---------------------------------------------------------------------------------------------------
    for run_id, execs in by_run.items():
        # Claim order: a worker stopped between its claim and the body's start runs the body late, after the
        # newer attempt began, so wall-clock order of ledger rows is not the order of attempts.
        execs.sort(key=lambda e: (e.attempt, e.t_start))
        attempts = {a.number: a for a in state.attempts.get(run_id, [])}
        for earlier, later in itertools.pairwise(execs):
            report_key = f"run {run_id}: attempt {earlier.attempt} (pid {earlier.pid}) then {later.attempt}"
            if earlier.outcome not in {None, "done", "cancelled"}:
                continue  # the job itself failed: a retry, not a duplicate
            claimed = attempts.get(earlier.attempt)
            begin = min(earlier.t_start, claimed.started_at.timestamp()) if claimed else earlier.t_start
            if _interrupted(earlier, later.t_start, faults, begin):
                report.duplicates_justified += 1
                continue
            lost_attempt = attempts.get(earlier.attempt)
            if (
                lease_expiry_justifies
                and lost_attempt is not None
                and lost_attempt.error is not None
                and lost_attempt.error.type == WORKER_LOST
            ):
                report.duplicates_justified += 1
                continue
            report.duplicates_unjustified.append(f"{report_key}, no fault explains it")

    # overlaps -------------------------------------------------------------------------------------------------------
    if limits:
        groups_of = limit_groups or (lambda run: (f"job:{run.job}", f"queue:{run.queue}"))
        intervals: dict[str, list[tuple[float, float, Execution]]] = defaultdict(list)
        for run_id, execs in by_run.items():
            run = state.runs.get(run_id)
            if run is None:
                continue
            groups = [g for g in groups_of(run) if g in limits]
            for i, e in enumerate(execs):
                end = e.t_end
                if end is None:
                    end = _kill_time(e, faults)
                if end is None and i + 1 < len(execs):
                    end = execs[i + 1].t_start
                if end is None:
                    end = end_time
                end = _clip_zombie(e, end, faults, state, report)
                for g in groups:
                    intervals[g].append((e.t_start, end, e))
        for group, spans in intervals.items():
            # Ends sort before starts at the same instant; the executions in progress are kept so that a
            # violation names them (the one flake seen, CI of 2026-12-07, left nothing else to go on).
            points = sorted(
                [(s, 1, i) for i, (s, _, _) in enumerate(spans)]
                + [(t, -1, i) for i, (_, t, _) in enumerate(spans)]
            )
            live: dict[int, int] = defaultdict(int)  # per span, started minus ended (zero-length: 0)
            current = peak = 0
            for at, delta, i in points:
                current += delta
                live[i] += delta
                peak = max(peak, current)
                if current > limits[group]:
                    report.overlaps.append(
                        f"{group}: {current} overlapping executions at {at:.3f}: "
                        + "; ".join(
                            _describe(spans[j], state, faults) for j, n in sorted(live.items()) if n > 0
                        )
                    )
            report.max_overlap[group] = peak

    # accounting -----------------------------------------------------------------------------------------------------
    for run_id, run in state.runs.items():
        attempts = state.attempts.get(run_id, [])
        numbers = [a.number for a in attempts]
        if numbers != list(range(1, len(numbers) + 1)):
            report.accounting.append(f"run {run_id}: attempt numbers {numbers}")
        by_number = {a.number: a for a in attempts}
        for e in by_run.get(run_id, []):
            attempt = by_number.get(e.attempt)
            if attempt is None:
                released = any(f.kind == "term" and f.pid == e.pid for f in faults)
                if not released:
                    report.accounting.append(
                        f"run {run_id}: execution of attempt {e.attempt} has no attempt row"
                    )
                continue
            if e.t_end is None and _kill_time(e, faults) is not None:
                ok = attempt.status.value == "cancelled" or (
                    attempt.status.value == "failed"
                    and attempt.error is not None
                    and attempt.error.type == WORKER_LOST
                )
                if not ok and run.status.value != "cancelled":
                    report.accounting.append(
                        f"run {run_id}: killed attempt {e.attempt} recorded {attempt.status.value} {attempt.error}"
                    )
        executed = {e.attempt for e in by_run.get(run_id, [])}
        for attempt in attempts:
            if attempt.number in executed or attempt.status.value in {"running", "cancelled"}:
                continue
            if attempt.error is not None and attempt.error.type == WORKER_LOST:
                continue  # claimed, then the worker died before the body started
            if attempt.error is not None and attempt.error.type in {"InvalidArguments", "JobNotFound"}:
                continue
            report.accounting.append(
                f"run {run_id}: attempt {attempt.number} ({attempt.status.value}, {attempt.error}) has no ledger execution"
            )

    # legality -------------------------------------------------------------------------------------------------------
    for run_id, events in state.events.items():
        previous_id = 0
        status: str | None = None
        for event in events:
            if event.id <= previous_id:
                report.legality.append(f"run {run_id}: event id {event.id} after {previous_id}")
            previous_id = event.id
            if event.kind != "status":
                continue
            data = event.data or {}
            frm, to = data.get("from"), data.get("to")
            if frm is None:
                status = to
                continue
            if status is not None and frm != status:
                report.legality.append(
                    f"run {run_id}: event {event.id} goes {frm}->{to} but run was {status}"
                )
            if (frm, to) not in LEGAL:
                report.legality.append(f"run {run_id}: illegal transition {frm}->{to}")
            status = to
        run = state.runs[run_id]
        if status is not None and status != run.status.value:
            report.legality.append(
                f"run {run_id}: last status event says {status}, run is {run.status.value}"
            )

    if recovered_at is not None:
        last_fault = max((f.until for f in faults), default=None)
        if last_fault is not None:
            report.recovery_s = max(recovered_at - last_fault, 0.0)
    return report
