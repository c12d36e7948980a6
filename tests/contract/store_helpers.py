"""Helpers shared by the store contract tests (imported by name: this directory is on sys.path)."""

from __future__ import annotations

from typing import Any

from runlane.models import Run
from runlane.store import Finish, Lease, NewRun, Store

T0 = 1_700_000_000.0
LEASE = 30.0


class FakeClock:
    """A mutable clock: ``clock()`` is now, ``clock.advance(s)`` moves it."""

    def __init__(self, start: float = T0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


def new(job: str = "j", args: dict[str, Any] | None = None, **options: Any) -> NewRun:
    return NewRun(job=job, args={} if args is None else args, **options)


async def insert(store: Store, job: str = "j", **options: Any) -> Run:
    (run,) = await store.insert_runs([new(job, **options)])
    return run


async def claim(
    store: Store,
    worker: str = "w1",
    *,
    jobs: tuple[str, ...] = ("j",),
    queues: tuple[str, ...] = ("default",),
    limit: int = 10,
    lease_timeout: float = LEASE,
) -> list[Run]:
    return await store.claim(worker, queues=queues, jobs=jobs, limit=limit, lease_timeout=lease_timeout)


async def claim_one(store: Store, worker: str = "w1", **options: Any) -> Run:
    runs = await claim(store, worker, limit=1, **options)
    assert len(runs) == 1, runs
    return runs[0]


def lease(run: Run) -> Lease:
    return Lease(run.id, run.attempt)


async def finish(store: Store, run: Run, outcome: str = "succeeded", worker: str = "w1", **kw: Any) -> bool:
    (ok,) = await store.finish_attempts([Finish(run.id, run.attempt, outcome, **kw)], worker_id=worker)  # type: ignore[arg-type]
    return ok


async def status_changes(store: Store, run_id: int) -> list[tuple[str, str]]:
    return [(e.data["from"], e.data["to"]) for e in await store.events(run_id) if e.kind == "status"]


async def get(store: Store, run_id: int) -> Run:
    run = await store.get_run(run_id)
    assert run is not None
    return run
