"""Rows to records, and the small JSON payloads the store writes itself."""

from __future__ import annotations

from typing import Any

from runlane.models import Attempt, Batch, ErrorInfo, Event, JobInfo, Run, RunStatus, to_datetime
from runlane.serialization import dumps, loads

# Decoding ``RunStatus(x)`` is a hot path in claim and list: look the members up instead.
_STATUS = {s.value: s for s in RunStatus}


def _dt(ts: float) -> Any:
    return to_datetime(ts)


def _error(text: str | None) -> ErrorInfo | None:
    return None if text is None else ErrorInfo.from_dict(loads(text))


def error_json(error: ErrorInfo | None) -> str | None:
    return None if error is None else dumps(error.to_dict())


def run_from_row(row: Any) -> Run:
    """A row of ``{run_columns}`` (see queries.sql), in the Run record's field order."""
    return Run(
        id=row[0],
        job=row[1],
        args=loads(row[2]),
        status=_STATUS[row[3]],
        queue=row[4],
        priority=row[5],
        attempt=row[6],
        max_attempts=row[7],
        not_before=to_datetime(row[8]),
        not_after=to_datetime(row[9]),
        dedup_id=row[10],
        tags=() if row[11] == "[]" else tuple(loads(row[11])),
        parent_run_id=row[12],
        root_run_id=row[13],
        batch_id=row[14],
        schedule_id=row[15],
        created_at=_dt(row[16]),
        started_at=to_datetime(row[17]),
        finished_at=to_datetime(row[18]),
        progress=row[19],
        progress_message=row[20],
        result=loads(row[21]),
        error=_error(row[22]),
        worker_id=row[23],
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


def batch_from_row(row: Any) -> Batch:
    """``id, created_at, parent_run_id, total``, the eight counts in ``_BATCH_COUNTS`` order, ``finish_seq``."""
    return Batch(
        id=row[0],
        created_at=_dt(row[1]),
        parent_run_id=row[2],
        total=row[3],
        counts=dict(zip(_BATCH_COUNTS, row[4:12], strict=True)),
        finish_seq=row[12],
    )


def attempt_from_row(row: Any) -> Attempt:
    return Attempt(
        number=row[0],
        worker_id=row[1],
        started_at=_dt(row[2]),
        finished_at=to_datetime(row[3]),
        status=_STATUS[row[4]],
        error=_error(row[5]),
    )


def event_from_row(row: Any) -> Event:
    return Event(id=row[0], run_id=row[1], kind=row[2], at=_dt(row[3]), data=loads(row[4]))


def job_from_row(row: Any) -> JobInfo:
    return JobInfo(name=row[0], queue=row[1], options=loads(row[2]), args_schema=loads(row[3]))


def status_data(old: str, new: str, attempt: int, reason: str | None) -> str:
    """The data of a ``status`` event, as the seam's contract fixes it. Statuses are plain words, so the
    common reason-less event is formatted directly: it is written twice per run on the hot path."""
    if reason is None:
        return f'{{"from":"{old}","to":"{new}","attempt":{int(attempt)},"reason":null}}'
    return dumps({"from": old, "to": new, "attempt": attempt, "reason": reason})
