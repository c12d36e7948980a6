"""Rows to records, and batches to the parallel arrays that the UNNEST statements take.

A batch may name one run more than once (two drafts of different attempts, a duplicated finish); an
``UPDATE … FROM unnest(…)`` would apply only one of them, so such batches are cut into rounds in which each
run appears once, run one after the other in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from runlane.models import Attempt, Batch, ErrorInfo, Event, JobInfo, Run, RunStatus, to_datetime
from runlane.serialization import dumps
from runlane.store.base import EventDraft, Finish

RUN_WIDTH = 24


def text_array(items: Iterable[str]) -> str:
    """A ``text[]`` parameter as an array literal, for a statement that casts it (``%(x)s::text[]``).

    psycopg's generic list dumper inspects every element for its type: ~9 µs a list, and a worker's flight
    passes seven lists. Ragged per-row arrays (tags) cannot travel as one 2-D array parameter either."""
    quoted = ('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"' for item in items)
    return "{" + ",".join(quoted) + "}"


def int_array(items: Iterable[int]) -> str:
    """A ``bigint[]``/``int[]`` parameter as an array literal (see ``text_array``)."""
    return "{" + ",".join([str(int(i)) for i in items]) + "}"


T = TypeVar("T")


def run_from_row(row: Sequence[Any], start: int = 0) -> Run:
    (id_, job, args, status, queue, priority, attempt, max_attempts, not_before, not_after, dedup_id, tags,
     parent, root, batch, schedule, created, started, finished, progress, progress_message, result, error,
     worker) = row[start : start + RUN_WIDTH]  # fmt: skip
    return Run(
        id=id_,
        job=job,
        args=args,
        status=RunStatus(status),
        queue=queue,
        priority=priority,
        attempt=attempt,
        max_attempts=max_attempts,
        not_before=not_before,
        not_after=not_after,
        dedup_id=dedup_id,
        tags=tuple(tags),
        parent_run_id=parent,
        root_run_id=root,
        batch_id=batch,
        schedule_id=schedule,
        created_at=created,
        started_at=started,
        finished_at=finished,
        progress=progress,
        progress_message=progress_message,
        result=result,
        error=ErrorInfo.from_dict(error),
        worker_id=worker,
    )


_BATCH_COUNTS = (
    RunStatus.SCHEDULED,
    RunStatus.PENDING,
    RunStatus.RUNNING,
    RunStatus.RETRYING,
    RunStatus.SUCCEEDED,
    RunStatus.FAILED,
    RunStatus.CANCELLED,
    RunStatus.SKIPPED,
)
BATCH_WIDTH = 13


def batch_from_row(row: Sequence[Any]) -> Batch:
    """``id, created_at, parent_run_id, total``, the eight counts in ``_BATCH_COUNTS`` order, ``finish_seq``."""
    return Batch(
        id=row[0],
        created_at=row[1],
        parent_run_id=row[2],
        total=row[3],
        counts=dict(zip(_BATCH_COUNTS, row[4:12], strict=True)),
        finish_seq=row[12],
    )


def attempt_from_row(row: Sequence[Any]) -> Attempt:
    number, worker_id, started_at, finished_at, status, error = row
    return Attempt(number, worker_id, started_at, finished_at, RunStatus(status), ErrorInfo.from_dict(error))


def event_from_row(row: Sequence[Any]) -> Event:
    id_, run_id, kind, at, data = row
    return Event(id_, run_id, kind, at, data)


def job_from_row(row: Sequence[Any]) -> JobInfo:
    name, queue, options, args_schema = row
    return JobInfo(name, queue, options or {}, args_schema or {})


def rounds(items: Sequence[T], key: Any) -> list[list[tuple[int, T]]]:
    """Cut ``items`` into rounds in which ``key(item)`` (a run id) occurs at most once, keeping each run's
    items in order; items keep their input index."""
    out: list[list[tuple[int, T]]] = []
    seen: dict[Any, int] = {}
    for index, item in enumerate(items):
        k = key(item)
        n = seen.get(k, -1) + 1
        seen[k] = n
        if n == len(out):
            out.append([])
        out[n].append((index, item))
    return out


@dataclass
class EventArrays:
    """Drafts as ``(run, seq, kind, at, data)`` arrays; ``seq`` numbers each run's drafts from 1."""

    run: list[int] = field(default_factory=list)
    seq: list[int] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    at: list[datetime | None] = field(default_factory=list)
    data: list[str] = field(default_factory=list)

    def add(self, draft: EventDraft, seq: int) -> None:
        self.run.append(draft.run_id)
        self.seq.append(seq)
        self.kind.append(draft.kind)
        self.at.append(to_datetime(draft.at))
        self.data.append(dumps(draft.data))

    def params(self) -> dict[str, Any]:
        return {
            "e_run": self.run,
            "e_seq": self.seq,
            "e_kind": self.kind,
            "e_at": self.at,
            "e_data": self.data,
        }


def last_progress(drafts: Sequence[EventDraft]) -> tuple[bool, float | None, str | None]:
    """Whether ``drafts`` hold a progress event, and the fields the last one sets."""
    for draft in reversed(drafts):
        if draft.kind == "progress":
            data = draft.data if isinstance(draft.data, dict) else {}
            percent = data.get("percent")
            return True, None if percent is None else float(percent), data.get("message")
    return False, None, None


def append_params(groups: Sequence[tuple[int, int | None, list[EventDraft]]]) -> dict[str, Any]:
    """Parameters of ``append_events`` for groups of ``(run_id, attempt, drafts)``, one group per run."""
    events = EventArrays()
    g_run, g_attempt, g_count, g_has, g_progress, g_message = [], [], [], [], [], []
    for run_id, attempt, drafts in groups:
        has, percent, message = last_progress(drafts)
        g_run.append(run_id)
        g_attempt.append(attempt)
        g_count.append(len(drafts))
        g_has.append(has)
        g_progress.append(percent)
        g_message.append(message)
        for seq, draft in enumerate(drafts, 1):
            events.add(draft, seq)
    return {
        "g_run": g_run,
        "g_attempt": g_attempt,
        "g_count": g_count,
        "g_has_progress": g_has,
        "g_progress": g_progress,
        "g_message": g_message,
        **events.params(),
    }


def iso_time(ts: float | None) -> str | None:
    """An epoch time as the text of the datetime psycopg would send (``to_datetime``), for JSON parameters:
    both paths store the same microsecond (a schedule's fire is unique by its not_before)."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def finish_params(finishes: Sequence[Finish]) -> dict[str, Any]:
    """Parameters of ``finish_attempts`` for finishes of distinct runs: the finishes and their events as
    two JSON documents of positional rows, in the statement's column order."""
    rows: list[tuple[Any, ...]] = []
    events: list[tuple[Any, ...]] = []
    for f in finishes:
        has, percent, message = last_progress(f.events)
        rows.append(
            (
                f.run_id,
                f.attempt,
                f.outcome,
                f.result if f.outcome == "succeeded" else None,
                None if f.error is None else f.error.to_dict(),
                max(0.0, float(f.retry_delay)),
                len(f.events),
                has,
                percent,
                message,
            )
        )
        for seq, draft in enumerate(f.events, 1):
            events.append((f.run_id, seq, draft.kind, iso_time(draft.at), draft.data))
    return {"finishes": dumps(rows), "events": dumps(events), "ids": int_array(f.run_id for f in finishes)}
