"""The SQLite store's SQL, loaded from ``queries.sql`` once at import."""

from __future__ import annotations

import re
from importlib import resources

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _load() -> dict[str, str]:
    text = resources.files("runlane.store.sqlite").joinpath("queries.sql").read_text("utf-8")
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.strip().splitlines() if not line.lstrip().startswith("--")]
        queries[name] = "\n".join(lines).strip()
    columns = queries["run_columns"]
    return {name: sql.replace("{run_columns}", columns) for name, sql in queries.items()}


Q = _load()


def claim_sql(queue_count: int) -> str:
    """The claim's SELECT for ``queue_count`` queues: one ordered, limited arm per queue, merged in claim order.
    Per-queue arms keep the claim an index range scan that stops after LIMIT rows, however long the backlog."""
    arm = Q["claim_arm"]
    if queue_count == 1:
        return arm.replace(":queue", ":q0")
    arms = " UNION ALL ".join(
        f"SELECT * FROM ({arm.replace(':queue', f':q{i}')})" for i in range(queue_count)
    )
    return f"SELECT * FROM ({arms}) ORDER BY priority DESC, due_at, id LIMIT :limit"
