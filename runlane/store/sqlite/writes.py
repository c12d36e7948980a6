"""The write verbs, as functions the writer thread runs inside a transaction (see connection.Writer).

Each function reads and writes under the writer's ``BEGIN IMMEDIATE`` lock, so a fence checked by a SELECT
still holds at the UPDATE; the UPDATEs repeat the fence anyway (compare-and-swap) so that the SQL alone is
correct. Batch verbs use ``executemany`` and JSON-array parameters to keep Python round trips per run few.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from runlane.errors import RunConflict, RunNotFound
from runlane.models import Batch, ErrorInfo, JobInfo, Run, RunStatus
from runlane.serialization import dumps
from runlane.store.base import (
    CANCELLED,
    EXPIRED,
    WORKER_LOST,
    ConflictPolicy,
    EventDraft,
    Finish,
    Lease,
    NewRun,
)
from runlane.store.sqlite import reads
from runlane.store.sqlite.connection import Tx
from runlane.store.sqlite.rows import error_json, run_from_row, status_data
from runlane.store.sqlite.sql import Q, claim_sql

ACTIVE = frozenset({"scheduled", "pending", "running", "retrying"})
_RUN_WIDTH = 24  # columns of {run_columns}
_DEDUP_VIOLATION = "runlane_runs.dedup_id"

EventRow = tuple[int, int, str, float, str]


def _status_event(
    run_id: int, event_id: int, at: float, old: str, new: str, attempt: int, reason: str | None
) -> EventRow:
    return (run_id, event_id, "status", at, status_data(old, new, attempt, reason))


def _active_dedup_holder(conn: sqlite3.Connection, dedup_id: str) -> int | None:
    row = conn.execute(Q["active_by_dedup"], (dedup_id,)).fetchone()
    return None if row is None else int(row[0])


def _is_dedup_violation(exc: sqlite3.IntegrityError) -> bool:
    return _DEDUP_VIOLATION in str(exc)


# -- catalogue ----------------------------------------------------------------------------------------------------


def register_jobs(tx: Tx, now: float, jobs: Sequence[JobInfo]) -> None:
    tx.conn.executemany(
        Q["register_job"], [(j.name, j.queue, dumps(j.options), dumps(j.args_schema), now) for j in jobs]
    )


def register_worker(tx: Tx, now: float, worker_id: str, info: dict[str, Any]) -> None:
    tx.conn.execute(Q["register_worker"], (worker_id, dumps(info), now))


def deregister_worker(tx: Tx, worker_id: str) -> None:
    tx.conn.execute(Q["deregister_worker"], (worker_id,))


# -- triggering ---------------------------------------------------------------------------------------------------


def insert_runs(tx: Tx, now: float, runs: Sequence[NewRun], on_conflict: ConflictPolicy) -> list[Run]:
    """Insert all or nothing (raising rolls back the operation's savepoint); under ``return_existing`` a
    conflicting position holds the run that has the dedup id."""
    conn = tx.conn
    parent_ids = {r.parent_run_id for r in runs if r.parent_run_id is not None}
    roots: dict[int, int] = {}
    if parent_ids:
        roots = dict(conn.execute(Q["parents"], (dumps(sorted(parent_ids)),)).fetchall())
        missing = sorted(parent_ids - roots.keys())
        if missing:
            raise RunNotFound(missing[0])
    # Ids are assigned here, under the write lock, so that root_run_id = id needs no second statement.
    row = conn.execute(Q["last_run_id"]).fetchone()
    next_id = (row[0] if row else 0) + 1
    out: list[Run] = []
    bulk: list[tuple[Any, ...]] = []
    own_ids: set[int] = set()
    any_inserted = False
    for r in runs:
        run_id = next_id
        next_id += 1
        status = "scheduled" if r.not_before is not None and r.not_before > now else "pending"
        due_at: float | None = r.not_before if r.not_before is not None else now
        if r.continue_when is not None:
            status, due_at = "scheduled", None  # waits for its parent, not for a time
        root = run_id if r.parent_run_id is None else roots[r.parent_run_id]
        params = (
            run_id,
            r.job,
            dumps(r.args),
            status,
            r.queue,
            r.priority,
            r.max_attempts,
            r.not_before,
            r.not_after,
            due_at,
            r.dedup_id,
            dumps(list(r.tags)),
            r.parent_run_id,
            root,
            r.batch_id,
            r.schedule_id,
            now,
            r.continue_when,
            r.concurrency_key,
        )
        if r.dedup_id is None:
            bulk.append(params)
        else:
            # The partial unique index is the arbiter; it also catches a duplicate earlier in this call.
            try:
                conn.execute(Q["insert_run"], params)
            except sqlite3.IntegrityError as exc:
                if not _is_dedup_violation(exc):
                    raise
                holder = _active_dedup_holder(conn, r.dedup_id)
                if holder is None:  # pragma: no cover - the index said otherwise a moment ago
                    raise
                if on_conflict == "raise":
                    # A holder from this very call is rolled back with it: there is no run to point to.
                    raise RunConflict(r.dedup_id, 0 if holder in own_ids else holder) from None
                out.append(run_from_row(conn.execute(Q["get_run"], (holder,)).fetchone()))
                continue
            own_ids.add(run_id)
        any_inserted = True
        out.append(r.to_run(run_id, RunStatus(status), root, datetime.fromtimestamp(now, UTC)))
    if bulk:
        conn.executemany(Q["insert_run"], bulk)
    if any_inserted:
        # `work` for scheduled runs too: idle workers re-read next_due_at.
        tx.topics |= {"work", "change"}
    waiting_on = {r.parent_run_id for r in runs if r.continue_when is not None and r.parent_run_id}
    if waiting_on and resolve_continuations(tx, now, waiting_on):
        # A parent that is already terminal decides its new continuations at once: return them as decided.
        fresh = {run.id: run for run in reads.get_runs(conn, [run.id for run in out])}
        out = [fresh.get(run.id, run) for run in out]
    return out


def insert_batch(
    tx: Tx, now: float, runs: Sequence[NewRun], parent_run_id: int | None
) -> tuple[Batch, list[Run]]:
    conn = tx.conn
    (batch_id,) = conn.execute(Q["insert_batch"], (now, parent_run_id)).fetchone()
    children = [replace(r, batch_id=batch_id, parent_run_id=parent_run_id, dedup_id=None) for r in runs]
    out = insert_runs(tx, now, children, "raise")
    scheduled = sum(1 for run in out if run.status is RunStatus.SCHEDULED)
    conn.execute(Q["set_batch_counts"], (len(out), scheduled, len(out) - scheduled, batch_id))
    batch = reads.get_batch(conn, batch_id)
    assert batch is not None
    return batch, out


# -- continuations ------------------------------------------------------------------------------------------------


def resolve_continuations(tx: Tx, now: float, parent_ids: Iterable[int]) -> list[int]:
    """Decide the continuations waiting on those of ``parent_ids`` that are terminal, and down the chains
    that this cancels. Called inside every transaction that makes runs terminal. Returns the ids decided."""
    conn = tx.conn
    decided: list[int] = []
    todo = sorted(set(parent_ids))
    while todo:
        rows = conn.execute(Q["waiting_continuations"], (dumps(todo),)).fetchall()
        if not rows:
            break
        starts: list[tuple[Any, ...]] = []
        cancels: list[tuple[Any, ...]] = []
        events: list[EventRow] = []
        todo = []
        for run_id, when, attempt, last_event_id, not_before, parent_id, parent_status in rows:
            decided.append(run_id)
            if when == "finished" or when == parent_status:
                if not_before is not None and not_before > now:
                    # Still scheduled, now waiting for its not_before like any run: no status change.
                    starts.append(("scheduled", not_before, last_event_id, run_id))
                else:
                    reason = f"parent run {parent_id} {parent_status}"
                    starts.append(("pending", now, last_event_id + 1, run_id))
                    events.append(
                        _status_event(run_id, last_event_id + 1, now, "scheduled", "pending", attempt, reason)
                    )
            else:
                message = f"parent run {parent_id} {parent_status}; this continuation runs when {when}"
                cancels.append((error_json(ErrorInfo(CANCELLED, message)), now, last_event_id + 1, run_id))
                events.append(
                    _status_event(run_id, last_event_id + 1, now, "scheduled", "cancelled", attempt, message)
                )
                todo.append(run_id)
        if starts:
            conn.executemany(Q["start_continuation"], starts)
            tx.topics |= {"work", "change"}
        if cancels:
            conn.executemany(Q["cancel_run"], cancels)
            tx.topics.add("change")
        if events:
            conn.executemany(Q["insert_event"], events)
    return decided


# -- events -------------------------------------------------------------------------------------------------------


def _draft_rows(
    drafts: Sequence[EventDraft], run_id: int, first_id: int, now: float, progress: dict[int, tuple[Any, Any]]
) -> list[EventRow]:
    rows: list[EventRow] = []
    for offset, d in enumerate(drafts):
        rows.append((run_id, first_id + offset, d.kind, d.at if d.at is not None else now, dumps(d.data)))
        if d.kind == "progress":
            data = d.data if isinstance(d.data, dict) else {}
            progress[run_id] = (data.get("percent"), data.get("message"))
    return rows


def _write_events(
    conn: sqlite3.Connection,
    rows: list[EventRow],
    last_ids: dict[int, int],
    progress: dict[int, tuple[Any, Any]],
) -> None:
    if rows:
        conn.executemany(Q["insert_event"], rows)
    if last_ids:
        conn.executemany(Q["set_last_event"], [(last, run_id) for run_id, last in last_ids.items()])
    if progress:
        conn.executemany(Q["set_progress"], [(p, m, run_id) for run_id, (p, m) in progress.items()])


def append_events(tx: Tx, now: float, drafts: Sequence[EventDraft], worker_id: str | None) -> set[int]:
    conn = tx.conn
    states = {
        row[0]: row for row in conn.execute(Q["run_states"], (dumps(sorted({d.run_id for d in drafts})),))
    }
    refused: set[int] = set()
    last_ids: dict[int, int] = {}
    progress: dict[int, tuple[Any, Any]] = {}
    rows: list[EventRow] = []
    for d in drafts:
        state = states.get(d.run_id)
        if state is None:
            refused.add(d.run_id)
            continue
        _, status, attempt, owner, last_event_id, _, expires = state
        if d.attempt is not None:
            allowed = (
                status == "running"
                and attempt == d.attempt
                and owner == worker_id
                and worker_id is not None
                and expires is not None
                and expires > now
            )
        else:
            allowed = status in ACTIVE
        if not allowed:
            refused.add(d.run_id)
            continue
        event_id = last_ids.get(d.run_id, last_event_id) + 1
        last_ids[d.run_id] = event_id
        rows.extend(_draft_rows((d,), d.run_id, event_id, now, progress))
    _write_events(conn, rows, last_ids, progress)
    if rows:
        tx.topics.add("change")
    return refused


# -- user actions -------------------------------------------------------------------------------------------------


def cancel_runs(tx: Tx, now: float, run_ids: Sequence[int], reason: str) -> list[int]:
    conn = tx.conn
    found: dict[int, tuple[int, str, int, int]] = {}
    for run_id, seed, status, attempt, last_event_id in conn.execute(
        Q["cancel_tree"], (dumps(list(run_ids)),)
    ):
        # A run reachable from several seeds: its own request wins, else the first seed found.
        if run_id not in found or seed == run_id:
            found[run_id] = (seed, status, attempt, last_event_id)
    runs: list[tuple[Any, ...]] = []
    attempts: list[tuple[Any, ...]] = []
    events: list[EventRow] = []
    for run_id, (seed, status, attempt, last_event_id) in found.items():
        message = reason if seed == run_id else f"{reason} (cascade from run {seed})"
        error = error_json(ErrorInfo(CANCELLED, message))
        runs.append((error, now, last_event_id + 1, run_id))
        events.append(_status_event(run_id, last_event_id + 1, now, status, "cancelled", attempt, message))
        if status == "running":
            attempts.append(("cancelled", now, error, run_id, attempt))
    if runs:
        conn.executemany(Q["cancel_run"], runs)
        conn.executemany(Q["insert_event"], events)
        tx.topics.add("change")
    if attempts:
        conn.executemany(Q["end_attempt"], attempts)
        tx.topics.add("cancel")
    cancelled = list(found)
    if cancelled:
        decided = set(resolve_continuations(tx, now, cancelled))
        if decided:
            cancelled += [run_id for run_id in _terminal(conn, decided) if run_id not in found]
    return cancelled


def _terminal(conn: sqlite3.Connection, run_ids: Iterable[int]) -> list[int]:
    return [run.id for run in reads.get_runs(conn, sorted(run_ids)) if run.status.is_terminal]


def retry_run(tx: Tx, now: float, run_id: int) -> bool:
    conn = tx.conn
    row = conn.execute(Q["retry_state"], (run_id,)).fetchone()
    if row is None:
        raise RunNotFound(run_id)
    status, attempt, last_event_id, dedup_id = row
    if status not in ("failed", "cancelled"):
        return False
    try:
        conn.execute(Q["retry_run"], (now, last_event_id + 1, run_id))
    except sqlite3.IntegrityError as exc:
        if not _is_dedup_violation(exc):
            raise
        raise RunConflict(dedup_id, _active_dedup_holder(conn, dedup_id) or 0) from None
    conn.execute(
        Q["insert_event"], _status_event(run_id, last_event_id + 1, now, status, "pending", attempt, "retry")
    )
    tx.topics |= {"work", "change"}
    return True


# -- worker verbs -------------------------------------------------------------------------------------------------


def promote_due(tx: Tx, now: float) -> int:
    """Scheduled and retrying runs whose due time has come become pending."""
    conn = tx.conn
    rows = conn.execute(Q["due_waiting"], (now,)).fetchall()
    if not rows:
        return 0
    conn.executemany(Q["promote"], [(last + 1, run_id) for run_id, _, _, last in rows])
    conn.executemany(
        Q["insert_event"],
        [
            _status_event(run_id, last + 1, now, status, "pending", attempt, None)
            for run_id, status, attempt, last in rows
        ],
    )
    tx.topics |= {"work", "change"}
    return len(rows)


_claim_sql = lru_cache(maxsize=32)(claim_sql)


def claim(
    tx: Tx,
    now: float,
    worker_id: str,
    queues: Sequence[str],
    jobs: Sequence[str],
    limit: int,
    lease_timeout: float,
) -> list[Run]:
    promote_due(tx, now)
    queues = list(dict.fromkeys(queues))
    if not queues or not jobs or limit <= 0:
        return []
    params: dict[str, Any] = {
        "now": now,
        "jobs": dumps(list(jobs)),
        "limit": limit,
        "worker": worker_id,
        "expires": now + lease_timeout,
    }
    for i, queue in enumerate(queues):
        params[f"q{i}"] = queue
    rows = tx.conn.execute(_claim_sql(len(queues)), params).fetchall()
    return apply_claim(tx, now, worker_id, rows, params["expires"])


def apply_claim(tx: Tx, now: float, worker_id: str, rows: Sequence[Any], expires: float) -> list[Run]:
    """Start the selected pending ``rows`` ({run_columns}, last_event_id, …): running, attempt + 1, a lease."""
    if not rows:
        return []
    conn = tx.conn
    ids = dumps([r[0] for r in rows])
    conn.execute(Q["claim_update"], {"worker": worker_id, "expires": expires, "now": now, "ids": ids})
    claimed: list[Run] = []
    attempts: list[tuple[Any, ...]] = []
    events: list[EventRow] = []
    for row in rows:
        run_id, attempt, event_id = row[0], row[6] + 1, row[_RUN_WIDTH] + 1
        new = list(row[:_RUN_WIDTH])  # the row as the UPDATE left it
        new[3], new[6], new[17], new[23] = "running", attempt, now, worker_id
        new[19] = new[20] = None  # progress belongs to the attempt that reports it
        claimed.append(run_from_row(new))
        attempts.append((run_id, attempt, worker_id, now))
        events.append(_status_event(run_id, event_id, now, "pending", "running", attempt, None))
    conn.executemany(Q["insert_attempt"], attempts)
    conn.executemany(Q["insert_event"], events)
    tx.topics.add("change")
    return claimed


def _lease_param(leases: Sequence[Lease]) -> str:
    return dumps([[lease.run_id, lease.attempt] for lease in leases])


def heartbeat(tx: Tx, now: float, worker_id: str, leases: Sequence[Lease], lease_timeout: float) -> set[int]:
    conn = tx.conn
    held: set[int] = set()
    if leases:
        params = {
            "expires": now + lease_timeout,
            "now": now,
            "worker": worker_id,
            "leases": _lease_param(leases),
        }
        held = {row[0] for row in conn.execute(Q["heartbeat"], params)}
    conn.execute(Q["worker_seen"], (now, worker_id))
    return held


def finish_attempts(tx: Tx, now: float, finishes: Sequence[Finish], worker_id: str) -> list[bool]:
    conn = tx.conn
    ids = sorted({f.run_id for f in finishes})
    states = {row[0]: row for row in conn.execute(Q["run_states"], (dumps(ids),))}
    finished: set[int] = set()
    applied: list[bool] = []
    terminal_runs: list[tuple[Any, ...]] = []
    retrying_runs: list[tuple[Any, ...]] = []
    attempts: list[tuple[Any, ...]] = []
    events: list[EventRow] = []
    progress: dict[int, tuple[Any, Any]] = {}
    for f in finishes:
        state = states.get(f.run_id)
        if (
            state is None
            or f.run_id in finished
            or state[1] != "running"
            or state[2] != f.attempt
            or state[3] != worker_id
            or state[6] is None
            or state[6] <= now  # expired, reaped or not: see finish_attempts in the PostgreSQL queries
        ):
            applied.append(False)
            continue
        finished.add(f.run_id)
        applied.append(True)
        last_event_id = state[4]
        if f.events:
            events.extend(_draft_rows(f.events, f.run_id, last_event_id + 1, now, progress))
        last_event_id += len(f.events) + 1
        fence = (f.run_id, f.attempt, worker_id)
        if f.outcome == "succeeded":
            error = None
            terminal_runs.append(("succeeded", dumps(f.result), None, now, last_event_id, *fence))
        elif f.outcome == "failed":
            error = error_json(f.error)
            terminal_runs.append(("failed", None, error, now, last_event_id, *fence))
        else:
            error = error_json(f.error)
            retrying_runs.append((error, now + max(f.retry_delay, 0.0), last_event_id, *fence))
        attempts.append(
            ("succeeded" if f.outcome == "succeeded" else "failed", now, error, f.run_id, f.attempt)
        )
        reason = None if f.error is None or f.outcome == "succeeded" else str(f.error)
        events.append(_status_event(f.run_id, last_event_id, now, "running", f.outcome, f.attempt, reason))
    if terminal_runs:
        conn.executemany(Q["finish_terminal"], terminal_runs)
        resolve_continuations(tx, now, [row[5] for row in terminal_runs])
    if retrying_runs:
        conn.executemany(Q["finish_retrying"], retrying_runs)
        tx.topics.add("work")  # idle workers re-read next_due_at
    if attempts:
        conn.executemany(Q["end_attempt"], attempts)
        _write_events(conn, events, {}, progress)
        tx.topics.add("change")
    return applied


def release_runs(tx: Tx, now: float, leases: Sequence[Lease], worker_id: str) -> list[int]:
    if not leases:
        return []
    conn = tx.conn
    params = {"worker": worker_id, "leases": _lease_param(leases)}
    rows = conn.execute(Q["release"], params).fetchall()
    if not rows:
        return []
    conn.executemany(Q["delete_attempt"], [(run_id, attempt + 1) for run_id, attempt, _ in rows])
    reason = f"released by worker {worker_id}"
    conn.executemany(
        Q["insert_event"],
        [
            _status_event(run_id, last, now, "running", "pending", attempt, reason)
            for run_id, attempt, last in rows
        ],
    )
    tx.topics |= {"work", "change"}
    order = {lease.run_id: i for i, lease in enumerate(leases)}
    return sorted((row[0] for row in rows), key=lambda run_id: order[run_id])


def reap_expired_leases(tx: Tx, now: float) -> list[int]:
    conn = tx.conn
    rows = conn.execute(Q["expired_leases"], (now,)).fetchall()
    if not rows:
        return []
    runs: list[tuple[Any, ...]] = []
    attempts: list[tuple[Any, ...]] = []
    events: list[EventRow] = []
    requeued = False
    for run_id, attempt, max_attempts, owner, last_event_id in rows:
        error_info = ErrorInfo(WORKER_LOST, f"worker lost: lease of worker {owner} expired")
        error = error_json(error_info)
        status = "pending" if attempt < max_attempts else "failed"
        requeued = requeued or status == "pending"
        finished_at = now if status == "failed" else None
        runs.append((status, error, finished_at, now, last_event_id + 1, run_id, attempt))
        attempts.append(("failed", now, error, run_id, attempt))
        events.append(
            _status_event(run_id, last_event_id + 1, now, "running", status, attempt, error_info.message)
        )
    conn.executemany(Q["reap_run"], runs)
    conn.executemany(Q["end_attempt"], attempts)
    conn.executemany(Q["insert_event"], events)
    resolve_continuations(tx, now, [row[5] for row in runs if row[0] == "failed"])
    # `cancel`: a worker that is alive but lost its lease learns it at once and stops the attempt.
    tx.topics |= {"change", "cancel"}
    if requeued:
        tx.topics.add("work")
    return [row[0] for row in rows]


def expire_runs(tx: Tx, now: float) -> list[int]:
    conn = tx.conn
    rows = conn.execute(Q["past_not_after"], (now,)).fetchall()
    if not rows:
        return []
    runs: list[tuple[Any, ...]] = []
    events: list[EventRow] = []
    for run_id, status, attempt, last_event_id, not_after in rows:
        deadline = datetime.fromtimestamp(not_after, UTC).isoformat()
        message = f"not_after {deadline} passed before the run started"
        runs.append((error_json(ErrorInfo(EXPIRED, message)), now, last_event_id + 1, run_id))
        events.append(_status_event(run_id, last_event_id + 1, now, status, "cancelled", attempt, message))
    conn.executemany(Q["cancel_run"], runs)
    conn.executemany(Q["insert_event"], events)
    tx.topics.add("change")
    resolve_continuations(tx, now, [row[0] for row in rows])
    return [row[0] for row in rows]


def prune(tx: Tx, older_than: float, batch: int) -> int:
    return int(tx.conn.execute(Q["prune"], (older_than, batch)).rowcount)
