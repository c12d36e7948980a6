"""The PostgreSQL claim's plan, checked on a small table by the contract suite and on a loaded one by chaos
T21: candidates come from an ordered scan of the partial index ``runlane_runs_claim``, materialised, locked
under a LIMIT with no sort of the whole queue."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import psycopg

from runlane.store.postgres.queries import Q


def plan_nodes(plan: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    stack = [plan]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.get("Plans", []))
    return out


def assert_claim_plan(conn: psycopg.Connection[Any], queues: Sequence[str], jobs: Sequence[str]) -> None:
    """EXPLAIN the claim on ``conn`` (under the caller's ``plan_cache_mode``) and check its shape."""
    params = {
        "now": None,
        "queues": list(queues),
        "jobs": list(jobs),
        "limit": 10,
        "worker": "w",
        "lease_timeout": 30.0,
        "token": "t",
        "channels": [],
    }
    row = conn.execute("EXPLAIN (FORMAT JSON) " + Q["claim"], params).fetchone()
    assert row is not None
    plan = row[0] if not isinstance(row[0], str) else json.loads(row[0])
    nodes = plan_nodes(plan[0]["Plan"])
    candidates = [n for n in nodes if n.get("Subplan Name") == "CTE candidates"]
    assert candidates, "candidates must be a materialised CTE"
    under = plan_nodes(candidates[0])
    scans = [n for n in under if n.get("Index Name") == "runlane_runs_claim"]
    assert scans and all(n["Node Type"] == "Index Scan" for n in scans), [n["Node Type"] for n in under]
    # The locking happens under a LIMIT fed straight by the ordered index scan: no sort of the whole queue.
    lock_rows = [n for n in under if n["Node Type"] == "LockRows"]
    assert lock_rows
    assert all(n["Node Type"] != "Sort" for n in plan_nodes(lock_rows[0]))
