"""Concurrent triggers with one dedup id, for T14: fired from threads of the test process and of helper
processes (forked from a forkserver that has Runlane imported, so a round can use them at once).

A shot is one ``trigger`` with ``dedup_id``: plain, or (PostgreSQL) inside a caller transaction that rolls
back after holding the dedup id for a moment. Every shot waits for the same wall-clock start, then reports
``ok`` (a run, created or, with ``return_existing``, found), ``conflict`` (RunConflict and the id it
carries), ``rolled_back`` (it inserted in its transaction, which then rolled back) or ``error``.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

from runlane import Client, Runlane
from runlane.errors import RunConflict

JOB = "dedup_probe"


def make_app(url: str) -> Runlane:
    app = Runlane(url)

    @app.job(name=JOB)
    def dedup_probe(key: str) -> str:
        return key

    return app


@dataclass
class Shot:
    index: int
    on_conflict: str  # raise | return_existing
    txn: bool = False  # inside a caller transaction that rolls back
    hold_s: float = 0.0  # how long that transaction keeps the dedup id before rolling back
    early_s: float = 0.0  # starts this much before the others


@dataclass
class Result:
    index: int
    outcome: str  # ok | conflict | rolled_back | error
    run_id: int | None = None
    error: str | None = None
    pid: int = 0


class Rollback(Exception):
    """Ends a shot's transaction by rolling it back."""


def fire(
    client: Client,
    shot: Shot,
    dedup_id: str,
    start_at: float,
    *,
    conn: Any = None,
    queue: str | None = None,
    not_before: Any = None,
) -> Result:
    """Wait for ``start_at`` (wall clock, shared by processes), then trigger once."""
    import os

    delay = start_at - shot.early_s - time.time()
    if delay > 0:
        time.sleep(delay)
    options: dict[str, Any] = {
        "dedup_id": dedup_id,
        "on_conflict": shot.on_conflict,
        "queue": queue,
        "tags": [dedup_id],
        "not_before": not_before,
    }
    try:
        if shot.txn:
            assert conn is not None
            got: list[int] = []
            try:
                with conn.transaction():
                    run = client.trigger(JOB, {"key": f"{dedup_id}/{shot.index}"}, connection=conn, **options)
                    got.append(run.id)
                    time.sleep(shot.hold_s)
                    raise Rollback
            except Rollback:
                pass
            return Result(shot.index, "rolled_back", got[0], pid=os.getpid())
        run = client.trigger(JOB, {"key": f"{dedup_id}/{shot.index}"}, **options)
        return Result(shot.index, "ok", run.id, pid=os.getpid())
    except RunConflict as exc:
        return Result(shot.index, "conflict", exc.existing_run_id, pid=os.getpid())
    except Exception as exc:
        return Result(shot.index, "error", None, f"{type(exc).__name__}: {exc}", pid=os.getpid())


def lane(pipe: Connection, url: str, threads: int) -> None:
    """A helper process: fires the shots it is sent from its own threads (through two clients on SQLite,
    so that two writers of this process contend too)."""
    apps = [make_app(url) for _ in range(1 if url.startswith("postgres") else 2)]
    clients = [app.client for app in apps]
    for client in clients:
        client.get_run(0)  # open the store now, so that the first round starts warm
    pool = ThreadPoolExecutor(max_workers=threads)
    pipe.send(("ready",))
    try:
        while True:
            msg: Any = pipe.recv()
            if msg[0] == "stop":
                return
            _, dedup_id, shots, start_at, queue, not_before_s = msg
            not_before = None if not_before_s is None else timedelta(seconds=not_before_s)
            futures = [
                pool.submit(
                    fire,
                    clients[i % len(clients)],
                    Shot(**s),
                    dedup_id,
                    start_at,
                    queue=queue,
                    not_before=not_before,
                )
                for i, s in enumerate(shots)
            ]
            pipe.send(("done", [asdict(f.result()) for f in futures]))
    except Exception:
        pipe.send(("failed", traceback.format_exc()))
    finally:
        pool.shutdown(wait=False)
        for app in apps:
            app.close()


def context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["harness.dedup_lane", *(["pytest"] if "pytest" in sys.modules else [])])
    return ctx
