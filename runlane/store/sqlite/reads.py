"""The read verbs, as functions of a reader connection (or of the writer's, for ``:memory:``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from runlane.models import Attempt, Batch, Event, JobInfo, Run, RunFilter, to_timestamp
from runlane.serialization import dumps
from runlane.store.base import Lease
from runlane.store.sqlite.rows import (
    attempt_from_row,
    batch_from_row,
    event_from_row,
    job_from_row,
    run_from_row,
)
from runlane.store.sqlite.sql import Q

# list_runs: one predicate per RunFilter field; the SQL text depends only on which fields are set, so the
# statement cache holds one prepared statement per combination in use.
_EQUALS = ("job", "queue", "parent_run_id", "root_run_id", "batch_id", "schedule_id")


def get_run(conn: sqlite3.Connection, run_id: int) -> Run | None:
    row = conn.execute(Q["get_run"], (run_id,)).fetchone()
    return None if row is None else run_from_row(row)


def get_runs(conn: sqlite3.Connection, run_ids: Sequence[int]) -> list[Run]:
    if not run_ids:
        return []
    return [run_from_row(row) for row in conn.execute(Q["get_runs"], (dumps(list(run_ids)),))]


def list_runs(conn: sqlite3.Connection, f: RunFilter, limit: int, before_id: int | None) -> list[Run]:
    where: list[str] = []
    params: list[object] = []
    for name in _EQUALS:
        value = getattr(f, name)
        if value is not None:
            where.append(f"{name} = ?")
            params.append(value)
    statuses = f.statuses
    if statuses:
        where.append(f"status IN ({', '.join('?' * len(statuses))})")
        params.extend(s.value for s in statuses)
    if f.tag is not None:
        where.append("EXISTS (SELECT 1 FROM json_each(tags) WHERE value = ?)")
        params.append(f.tag)
    if f.created_after is not None:  # both bounds exclusive
        where.append("created_at > ?")
        params.append(to_timestamp(f.created_after))
    if f.created_before is not None:
        where.append("created_at < ?")
        params.append(to_timestamp(f.created_before))
    if before_id is not None:
        where.append("id < ?")
        params.append(before_id)
    sql = f"SELECT {Q['run_columns']} FROM runlane_runs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    params.append(limit)
    return [run_from_row(row) for row in conn.execute(sql, params)]


def attempts(conn: sqlite3.Connection, run_id: int) -> list[Attempt]:
    return [attempt_from_row(row) for row in conn.execute(Q["attempts"], (run_id,))]


def events(conn: sqlite3.Connection, run_id: int, since: int | None, limit: int) -> list[Event]:
    rows = conn.execute(Q["events"], (run_id, since or 0, limit))
    return [event_from_row(row) for row in rows]


def get_job(conn: sqlite3.Connection, name: str) -> JobInfo | None:
    row = conn.execute(Q["get_job"], (name,)).fetchone()
    return None if row is None else job_from_row(row)


def held_leases(conn: sqlite3.Connection, now: float, worker_id: str, leases: Sequence[Lease]) -> set[int]:
    if not leases:
        return set()
    param = dumps([[lease.run_id, lease.attempt] for lease in leases])
    rows = conn.execute(Q["held_leases"], {"worker": worker_id, "leases": param, "now": now})
    return {row[0] for row in rows}


def next_due_at(conn: sqlite3.Connection, queues: Sequence[str], jobs: Sequence[str]) -> float | None:
    if not queues or not jobs:
        return None
    row = conn.execute(Q["next_due_at"], (dumps(list(queues)), dumps(list(jobs)))).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def get_batch(conn: sqlite3.Connection, batch_id: int) -> Batch | None:
    row = conn.execute(Q["get_batch"], (batch_id,)).fetchone()
    return None if row is None else batch_from_row(row)


def batch_runs(
    conn: sqlite3.Connection, batch_id: int, after_seq: int, up_to_seq: int | None, limit: int
) -> list[tuple[int, Run]]:
    upper = up_to_seq if up_to_seq is not None else 2**62
    rows = conn.execute(Q["batch_runs"], (batch_id, after_seq, upper, limit))
    return [(row[0], run_from_row(row[1:])) for row in rows]
