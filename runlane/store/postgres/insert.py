"""Inserting runs, written once for the pool's async connections and a caller's sync or async connection.

The algorithm is a generator that yields ``(query, params)`` and receives the rows, so the same steps drive
an ``AsyncConnection`` (the store's pool, or a caller's, for transactional enqueue) and a plain
``Connection``.

Dedup comes from the partial unique index, never from "look then insert": ``INSERT … ON CONFLICT DO
NOTHING`` waits for an uncommitted holder of the same dedup id and inserts after all if that holder rolls
back. A row skipped for a conflict is looked up; if its holder finished (or rolled back) in between, the row
is inserted again in the next round, in the same transaction.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from datetime import datetime
from typing import Any, LiteralString

import psycopg
from psycopg import pq

from runlane.errors import InvalidConnection, RunConflict, RunNotFound, StoreUnavailable
from runlane.models import Run, RunStatus, to_datetime
from runlane.serialization import dumps
from runlane.store.base import ConflictPolicy, NewRun
from runlane.store.postgres.queries import Q
from runlane.store.postgres.rows import iso_time, run_from_row, text_array

CHUNK = 5000
"""Runs per INSERT statement: thousands per round trip, bounded parameter size."""
MAX_ROUNDS = 100
"""Conflict rounds before giving up: each needs a holder that vanished between two statements."""

Step = tuple[LiteralString, dict[str, Any]]
Plan = Generator[Step, list[tuple[Any, ...]], tuple[list[Run], int]]
"""Every step is a query that returns rows (possibly none): the drivers fetch without asking."""


def _plain(run: NewRun) -> bool:
    """Whether ``insert_plain`` can insert the run: none of the columns it leaves at their defaults is set."""
    return (
        run.dedup_id is None
        and run.not_before is None
        and run.not_after is None
        and run.parent_run_id is None
        and run.batch_id is None
        and run.schedule_id is None
        and run.continue_when is None
        and run.concurrency_key is None
    )


def _single(run: NewRun, now: datetime | None, token: str) -> Step:
    """The statement and parameters inserting one run."""
    if _plain(run):
        return Q["insert_plain"], {
            "job": run.job,
            "args": dumps(run.args),
            "queue": run.queue,
            "priority": run.priority,
            "max_attempts": run.max_attempts,
            "tags": text_array(run.tags),
            "now": now,
            "token": token,
        }
    return Q["insert_one"], {**_scalars(run), "now": now, "token": token, "channels": ["runlane_work"]}


def _scalars(run: NewRun) -> dict[str, Any]:
    """Parameters of ``insert_one``."""
    return {
        "job": run.job,
        "args": dumps(run.args),
        "queue": run.queue,
        "priority": run.priority,
        "max_attempts": run.max_attempts,
        "not_before": to_datetime(run.not_before),
        "not_after": to_datetime(run.not_after),
        "dedup_id": run.dedup_id,
        "tags": text_array(run.tags),
        "parent_run_id": run.parent_run_id,
        "batch_id": run.batch_id,
        "schedule_id": run.schedule_id,
        "continue_when": run.continue_when,
        "concurrency_key": run.concurrency_key,
    }


def rows_document(runs: Sequence[NewRun]) -> str:
    """Parameter of ``insert_runs`` and ``insert_batch``: the runs as one JSON array of positional rows, in
    insert_runs' column order."""
    return dumps(
        [
            (
                r.job,
                r.args,
                r.queue,
                r.priority,
                r.max_attempts,
                iso_time(r.not_before),
                iso_time(r.not_after),
                r.dedup_id,
                text_array(r.tags),
                r.parent_run_id,
                r.batch_id,
                r.schedule_id,
                r.continue_when,
                r.concurrency_key,
            )
            for r in runs
        ]
    )


def single_statement(runs: Sequence[NewRun]) -> bool:
    """Whether ``insert_plan`` can run in autocommit, each statement committing on its own, and still be
    all-or-nothing: one INSERT statement (one chunk, no parent to check, no continuation to decide) that
    either inserts every row or, for a dedup conflict, can only skip its single row. A skipped single row
    inserted nothing, so the look-up and retry that follow need no enclosing transaction either."""
    if len(runs) > CHUNK or any(r.parent_run_id is not None or r.continue_when is not None for r in runs):
        return False
    return len(runs) == 1 or all(r.dedup_id is None for r in runs)


def one_step(runs: Sequence[NewRun]) -> bool:
    """Whether ``insert_plan`` is a single autocommit statement and nothing after it: ``single_statement``
    and no dedup id, so no conflict can call for a look-up. ``PostgresStore.insert_chunks`` sends the next
    chunk's statement while it turns this one's rows into runs."""
    return single_statement(runs) and all(r.dedup_id is None for r in runs)


def insert_plan(
    runs: Sequence[NewRun], on_conflict: ConflictPolicy, *, now: datetime | None, token: str
) -> Plan:
    """Steps of ``insert_runs``; returns the runs in input order and how many were created."""
    if on_conflict not in ("raise", "return_existing"):
        raise ValueError(f"on_conflict must be 'raise' or 'return_existing', not {on_conflict!r}")
    parents = sorted({r.parent_run_id for r in runs if r.parent_run_id is not None})
    if parents:
        missing = yield Q["missing_parents"], {"ids": parents}
        if missing:
            raise RunNotFound(missing[0][0])
    # Continuations: see lock_parents in queries.sql for why their parents are locked first.
    awaited = sorted({r.parent_run_id for r in runs if r.continue_when is not None and r.parent_run_id})
    terminal_parents: list[int] = []
    if awaited:
        rows = yield Q["lock_parents"], {"ids": awaited}
        terminal_parents = [id_ for id_, status in rows if RunStatus(status).is_terminal]
    results: list[Run | None] = [None] * len(runs)
    created = 0
    todo = list(range(len(runs)))
    for _ in range(MAX_ROUNDS):
        conflicts: list[int] = []
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start : start + CHUNK]
            if len(chunk) == 1:
                rows = yield _single(runs[chunk[0]], now, token)
            else:
                rows = yield (
                    Q["insert_runs"],
                    {
                        "rows": rows_document([runs[i] for i in chunk]),
                        "now": now,
                        "token": token,
                        "channels": ["runlane_work"],
                    },
                )
            for ord_, id_, status, root_run_id, created_at in rows:
                position = chunk[ord_ - 1]
                if id_ is None:
                    conflicts.append(position)
                else:
                    results[position] = runs[position].to_run(id_, RunStatus(status), root_run_id, created_at)
                    created += 1
        if not conflicts:
            break
        dedup_ids = sorted({d for i in conflicts if (d := runs[i].dedup_id) is not None})
        rows = yield Q["active_by_dedup"], {"dedup_ids": dedup_ids}
        holders = {run.dedup_id: run for run in (run_from_row(row) for row in rows)}
        todo = []
        for position in conflicts:
            dedup_id = runs[position].dedup_id
            assert dedup_id is not None  # only dedup ids conflict
            holder = holders.get(dedup_id)
            if holder is None:
                todo.append(position)  # the holder ended or rolled back: try again
            elif on_conflict == "raise":
                raise RunConflict(dedup_id, holder.id)
            else:
                results[position] = holder
        if not todo:
            break
    else:
        raise StoreUnavailable(f"could not settle dedup conflicts after {MAX_ROUNDS} rounds")
    out = [r for r in results if r is not None]
    assert len(out) == len(runs)
    if terminal_parents and created:
        decided = yield (
            Q["resolve_continuations"],
            {
                "ids": terminal_parents,
                "now": now,
                "token": token,
                "channels": ["runlane_work", "runlane_change"],
            },
        )
        if decided:
            rows = yield Q["get_runs"], {"ids": [row[0] for row in decided]}
            fresh = {run.id: run for run in (run_from_row(row) for row in rows)}
            out = [fresh.get(run.id, run) for run in out]
    return out, created


async def drive_async(conn: psycopg.AsyncConnection[Any], plan: Plan) -> tuple[list[Run], int]:
    rows: list[tuple[Any, ...]] | None = None
    try:
        while True:
            query, params = plan.send(rows) if rows is not None else next(plan)
            cur = await conn.execute(query, params)
            rows = await cur.fetchall()
    except StopIteration as stop:
        result: tuple[list[Run], int] = stop.value
        return result


def drive_sync(conn: psycopg.Connection[Any], plan: Plan) -> tuple[list[Run], int]:
    rows: list[tuple[Any, ...]] | None = None
    try:
        while True:
            query, params = plan.send(rows) if rows is not None else next(plan)
            cur = conn.execute(query, params)
            rows = cur.fetchall()
    except StopIteration as stop:
        result: tuple[list[Run], int] = stop.value
        return result


def check_caller_connection(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    """A caller's connection must be usable and its transaction must still be the caller's to commit.

    StoreUnavailable when it is closed or broken; InvalidConnection when the insert would not be part of a caller
    transaction (autocommit and no transaction block), or that transaction already failed or is busy.
    """
    if conn.closed or conn.broken:
        raise StoreUnavailable("the connection given for a transactional trigger is closed")
    status = conn.info.transaction_status
    if status == pq.TransactionStatus.INTRANS:
        return
    if status == pq.TransactionStatus.IDLE and not conn.autocommit:
        return  # the insert opens the transaction implicitly; the caller commits or rolls it back
    if status == pq.TransactionStatus.IDLE:
        raise InvalidConnection(
            "the connection is in autocommit mode and not in a transaction: the run would be committed at "
            "once. Use `with conn.transaction():` (or a non-autocommit connection) around the trigger"
        )
    if status == pq.TransactionStatus.INERROR:
        raise InvalidConnection("the connection's transaction has failed: roll it back before triggering")
    raise InvalidConnection(
        f"the connection is busy (transaction status {status.name}): finish the current query"
    )


def insert_with_caller_sync(
    conn: psycopg.Connection[Any],
    runs: Sequence[NewRun],
    on_conflict: ConflictPolicy,
    *,
    now: datetime | None,
) -> list[Run]:
    """Insert under a savepoint of the caller's transaction (see ``PostgresStore.insert_runs_in_transaction``).

    The empty NOTIFY payload (no store token) lets this process's own listener deliver the wake-up too.
    """
    check_caller_connection(conn)
    if not runs:
        return []
    plan = insert_plan(runs, on_conflict, now=now, token="")
    try:
        if conn.info.transaction_status == pq.TransactionStatus.IDLE:
            conn.execute("SELECT 1")  # open the caller's implicit transaction, so the next is a savepoint
        with conn.transaction():
            return drive_sync(conn, plan)[0]
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"PostgreSQL failed during a transactional trigger: {exc}") from exc


async def insert_with_caller_async(
    conn: psycopg.AsyncConnection[Any],
    runs: Sequence[NewRun],
    on_conflict: ConflictPolicy,
    *,
    now: datetime | None,
) -> list[Run]:
    """The async twin of ``insert_with_caller_sync``."""
    check_caller_connection(conn)
    if not runs:
        return []
    plan = insert_plan(runs, on_conflict, now=now, token="")
    try:
        if conn.info.transaction_status == pq.TransactionStatus.IDLE:
            await conn.execute("SELECT 1")
        async with conn.transaction():
            return (await drive_async(conn, plan))[0]
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"PostgreSQL failed during a transactional trigger: {exc}") from exc
