"""What the CLI prints: aligned tables for people, JSON for scripts.

Kept free of click and of the store so that the same formatting serves the demo's live view.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from runlane.models import Attempt, Event, Run

MAX_CELL = 48


def fmt_time(value: datetime | None) -> str:
    """UTC, to the second: runs are compared across hosts, so never local time."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def truncate(text: str, width: int = MAX_CELL) -> str:
    text = " ".join(text.split())  # a traceback or multi-line message must not break the table
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, max_width: int = MAX_CELL) -> str:
    """Left-aligned columns separated by two spaces; long cells are cut with an ellipsis."""
    cells = [[truncate("" if c is None else str(c), max_width) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return value


def record(obj: Run | Attempt | Event) -> dict[str, Any]:
    """A record as plain JSON types: ISO datetimes, statuses as strings, errors as objects."""
    data: dict[str, Any] = _jsonable(dataclasses.asdict(obj))
    return data


def dumps(data: Any) -> str:
    return json.dumps(_jsonable(data), indent=2, ensure_ascii=False, default=str)


def progress_text(run: Run) -> str:
    if run.progress is None:
        return "-" if not run.progress_message else run.progress_message
    text = f"{run.progress:.0f}%"
    return f"{text} {run.progress_message}" if run.progress_message else text


def attempt_text(run: Run) -> str:
    return f"{run.attempt}/{run.max_attempts}"


def runs_table(runs: Iterable[Run]) -> str:
    rows = [
        (
            r.id,
            r.job,
            r.status.value,
            r.queue,
            attempt_text(r),
            progress_text(r),
            fmt_time(r.created_at),
            fmt_time(r.finished_at),
            "" if r.error is None else str(r.error),
        )
        for r in runs
    ]
    headers = ["id", "job", "status", "queue", "attempt", "progress", "created", "finished", "error"]
    return table(headers, rows, max_width=40)


def _compact(value: Any, width: int = 200) -> str:
    return truncate(json.dumps(_jsonable(value), ensure_ascii=False, default=str), width)


def run_details(run: Run, attempts: Sequence[Attempt], events: Sequence[Event]) -> str:
    """One run as a key/value block, then its attempts and its (latest) events."""
    fields: list[tuple[str, object]] = [
        ("id", run.id),
        ("job", run.job),
        ("status", run.status.value),
        ("queue", run.queue),
        ("priority", run.priority),
        ("attempt", attempt_text(run)),
        ("args", _compact(run.args)),
        ("progress", progress_text(run)),
        ("created", fmt_time(run.created_at)),
        ("started", fmt_time(run.started_at)),
        ("finished", fmt_time(run.finished_at)),
    ]
    optional: list[tuple[str, object]] = [
        ("not before", run.not_before and fmt_time(run.not_before)),
        ("not after", run.not_after and fmt_time(run.not_after)),
        ("dedup id", run.dedup_id),
        ("tags", ", ".join(run.tags)),
        ("parent run", run.parent_run_id),
        ("root run", run.root_run_id if run.root_run_id != run.id else None),
        ("batch", run.batch_id),
        ("schedule", run.schedule_id),
        ("worker", run.worker_id),
    ]
    fields += [(k, v) for k, v in optional if v not in (None, "")]
    if run.status.value == "succeeded":
        fields.append(("result", _compact(run.result)))
    if run.error is not None:
        fields.append(("error", truncate(str(run.error), 200)))
    width = max(len(k) for k, _ in fields)
    lines = [f"{k.ljust(width)}  {v}" for k, v in fields]
    if run.error is not None and run.error.traceback:
        lines += ["", "traceback (last attempt):", run.error.traceback.rstrip()]
    lines += ["", "attempts:"]
    if attempts:
        rows = [
            (
                a.number,
                a.status.value,
                a.worker_id,
                fmt_time(a.started_at),
                fmt_time(a.finished_at),
                "" if a.error is None else str(a.error),
            )
            for a in attempts
        ]
        lines.append(table(["#", "status", "worker", "started", "finished", "error"], rows, max_width=60))
    else:
        lines.append("(none yet)")
    lines += ["", "events:"]
    if events:
        lines.append(
            table(
                ["id", "at", "kind", "data"],
                [(e.id, fmt_time(e.at), e.kind, event_text(e)) for e in events],
                max_width=80,
            )
        )
    else:
        lines.append("(none)")
    return "\n".join(lines)


def event_text(event: Event) -> str:
    """A one-line reading of an event's data, in the words of its kind."""
    data = event.data
    if event.kind == "status" and isinstance(data, dict):
        text = f"{data.get('from')} -> {data.get('to')}"
        return f"{text} ({data['reason']})" if data.get("reason") else text
    if event.kind == "progress" and isinstance(data, dict):
        percent, message = data.get("percent"), data.get("message")
        text = "" if percent is None else f"{float(percent):.0f}%"
        return f"{text} {message}".strip() if message else text
    if event.kind == "log" and isinstance(data, dict):
        return f"[{data.get('level', 'info')}] {data.get('message', '')}"
    return _compact(data)
