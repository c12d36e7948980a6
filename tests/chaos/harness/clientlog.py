"""The client log: every trigger as invoked, then ok(run id), failed(error) or indeterminate (Jepsen-style)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from runlane import Client
from runlane.errors import InvalidArguments, JobNotFound, RunConflict


@dataclass(slots=True)
class Op:
    key: str
    job: str
    t_invoke: float
    t_complete: float | None = None
    outcome: str = "invoked"  # ok | failed | indeterminate
    run_id: int | None = None
    error: str | None = None


@dataclass
class ClientLog:
    ops: list[Op] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def trigger(self, client: Client, job: str, args: dict[str, Any], **options: Any) -> Op:
        """Trigger ``job`` and log the outcome; never raises for store trouble (that is what is tested)."""
        key = str(args["key"])
        op = Op(key, job, time.time())
        with self._lock:
            self.ops.append(op)
        try:
            run = client.trigger(job, args, **options)
        except RunConflict as exc:
            op.outcome, op.run_id, op.error = "failed", exc.existing_run_id, f"RunConflict: {exc}"
        except (InvalidArguments, JobNotFound) as exc:
            op.outcome, op.error = "failed", f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # connection reset, timeout, store unavailable: it may or may not exist
            op.outcome, op.error = "indeterminate", f"{type(exc).__name__}: {exc}"
        else:
            op.outcome, op.run_id = "ok", run.id
        op.t_complete = time.time()
        return op

    def snapshot(self) -> list[Op]:
        with self._lock:
            return list(self.ops)

    def count(self, outcome: str) -> int:
        return sum(1 for op in self.snapshot() if op.outcome == outcome)
