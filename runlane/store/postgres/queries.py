"""The named queries of ``queries.sql``, expanded once at import.

SQL stays in the SQL file, where it can be read and EXPLAINed as a whole; this module only cuts it into named
statements and fills in the few shared fragments (clock, Run columns, status lists).
"""

from __future__ import annotations

import re
from importlib import resources
from typing import LiteralString

from runlane.models import ACTIVE_STATUSES, TERMINAL_STATUSES, RunStatus

RUN_COLUMNS = (
    "id, job, args, status, queue, priority, attempt, max_attempts, not_before, not_after, dedup_id, tags, "
    "parent_run_id, root_run_id, batch_id, schedule_id, created_at, started_at, finished_at, progress, "
    "progress_message, result, error, worker_id"
)
"""The Run record's fields, in its order, so rows map to it by position."""

# The injected test clock when one is given, else the database's transaction time.
NOW = "coalesce(%(now)s::timestamptz, now())"

# list_runs: one fragment per RunFilter field, ANDed together.
RUN_FILTERS: dict[str, LiteralString] = {
    "job": "r.job = %(job)s",
    "statuses": "r.status = ANY(%(statuses)s::text[])",
    "queue": "r.queue = %(queue)s",
    "parent_run_id": "r.parent_run_id = %(parent_run_id)s",
    # Matches the partial index runlane_runs_root (descendants) plus the root itself by primary key.
    "root_run_id": "((r.id = %(root_run_id)s AND r.parent_run_id IS NULL) "
    "OR (r.root_run_id = %(root_run_id)s AND r.parent_run_id IS NOT NULL))",
    "batch_id": "r.batch_id = %(batch_id)s",
    "schedule_id": "r.schedule_id = %(schedule_id)s",
    "tag": "r.tags @> ARRAY[%(tag)s::text] AND r.tags <> '{}'",
    "created_after": "r.created_at > %(created_after)s",
    "created_before": "r.created_at < %(created_before)s",
    "before_id": "r.id < %(before_id)s",
}

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _status_list(statuses: frozenset[RunStatus]) -> str:
    return "(" + ", ".join(f"'{s.value}'" for s in sorted(statuses)) + ")"


def _expand(sql: str) -> str:
    return (
        sql.replace("{now}", NOW)
        .replace("{run_columns}", ", ".join(f"r.{c}" for c in RUN_COLUMNS.split(", ")))
        .replace("{active}", _status_list(ACTIVE_STATUSES))
        .replace("{terminal}", _status_list(TERMINAL_STATUSES))
    )


def _load() -> dict[str, LiteralString]:
    text = resources.files(__package__).joinpath("queries.sql").read_text("utf-8")
    parts = _NAME.split(text)
    bodies: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in bodies:
            raise RuntimeError(f"query {name!r} is defined twice in queries.sql")
        bodies[name] = body.strip().rstrip(";")
    # Fragments (names starting with "_") are CTE lists that several statements share, spliced in as {_name}.
    fragments = {f"{{{name}}}": body for name, body in bodies.items() if name.startswith("_")}
    queries: dict[str, LiteralString] = {}
    for name, body in bodies.items():
        if name.startswith("_"):
            continue
        for placeholder, fragment in fragments.items():
            body = body.replace(placeholder, fragment)
        # The file is part of the package, not user input: it is as literal as a string constant.
        queries[name] = _expand(body)
    return queries


Q = _load()
