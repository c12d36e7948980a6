"""T14 ``dedup_race_and_rollback``: 64 concurrent triggers with one dedup id per round, from threads of the
test process (each thread through one of several clients) and, every tenth round, from four helper processes;
on PostgreSQL half of them inside caller transactions that hold the dedup id for a moment and roll back.

Pass, every round: no trigger fails with anything but RunConflict and none hangs (no deadlock); exactly one run
exists for the dedup id (the committing triggers all happened, so a rolled-back holder never "won" and lost
the run, cf. oban-bg/oban#1087); every loser got RunConflict carrying the winner's id, or the winner itself
with ``on_conflict="return_existing"``; a rolled-back insert left nothing behind. Then the winner is held
``scheduled``, ``pending``, ``running`` or ``retrying`` while a second wave of triggers must all conflict with
it; once it has ended, a new trigger with the same dedup id succeeds.

Replay: ``CHAOS_SEED=N`` (printed) replays the rounds' choices; the interleavings are the machine's.
"""

from __future__ import annotations

import random
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict
from datetime import timedelta
from typing import Any

import pytest
from harness import dedup_lane
from harness.dedup_lane import JOB, Result, Shot, fire, make_app
from harness.scenario import record_figures, scale

from runlane import Runlane
from runlane.models import ErrorInfo, Run, RunFilter
from runlane.store import Finish

pytestmark = pytest.mark.serial  # CPU-heavy or measures latency: runs alone (scripts/test)

SHOTS = 64
SECOND_WAVE = 8
LANES = 4  # helper processes
PROCESS_EVERY = 10  # one round in ten fires half its shots from the helper processes
WAVE_TIMEOUT = 30.0  # a wave not done by then is a deadlock


def _with_query(url: str, param: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{param}"


class Bench:
    """The test process's side: clients, a thread per shot, caller connections, the helper processes."""

    def __init__(self, url: str, rng: random.Random) -> None:
        self.url = url
        self.pg = url.startswith("postgres")
        self.rng = rng
        self.token = uuid.uuid4().hex[:6]
        # Several clients (stores) on SQLite, so that several writers contend for the file; one pool on
        # PostgreSQL, whose connections (with the caller transactions' and the helpers') stay well under the
        # server's max_connections, which other tests share.
        pooled = _with_query(url, "pool_max_size=8") if self.pg else url
        self.apps: list[Runlane] = [make_app(pooled) for _ in range(1 if self.pg else 4)]
        self.clients = [app.client for app in self.apps]
        self.call = self.clients[0].portal.call
        self.call(self.apps[0].migrate())
        self.store = self.apps[0].store
        self.pool = ThreadPoolExecutor(max_workers=SHOTS, thread_name_prefix="t14-shot")
        self.conns: list[Any] = []
        if self.pg:
            import psycopg

            self.conns = [psycopg.connect(url) for _ in range(SHOTS // 2)]
        self.lanes: list[tuple[Any, Any]] = []
        self.stats: dict[str, int] = {}

    def start_lanes(self) -> None:
        ctx = dedup_lane.context()
        for _ in range(LANES):
            parent, child = ctx.Pipe()
            url = _with_query(self.url, "pool_max_size=2") if self.pg else self.url
            proc = ctx.Process(target=dedup_lane.lane, args=(child, url, SHOTS // LANES), daemon=True)
            proc.start()
            self.lanes.append((proc, parent))
        for proc, pipe in self.lanes:
            assert pipe.poll(60), f"helper process {proc.pid} never got ready"
            assert pipe.recv() == ("ready",)

    def close(self) -> None:
        for proc, pipe in self.lanes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        self.pool.shutdown(wait=False, cancel_futures=True)
        for conn in self.conns:
            conn.close()
        for app in self.apps:
            app.close()

    def count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    # -- one wave of concurrent triggers ---------------------------------------------------------------------

    def wave(
        self, dedup_id: str, queue: str, shots: list[Shot], *, lanes: bool, not_before_s: float | None
    ) -> list[Result]:
        """Fire ``shots`` at one instant from this process's threads; with ``lanes``, every other one (the
        odd ones, all plain triggers) from the helper processes instead."""
        start_at = time.time() + (0.2 if lanes else 0.01)  # time for every thread to reach its start line
        not_before = None if not_before_s is None else timedelta(seconds=not_before_s)
        remote = [s for s in shots if lanes and s.index % 2 == 1]
        local = [s for s in shots if not (lanes and s.index % 2 == 1)]
        futures: list[Future[Result]] = []
        conns = iter(self.conns)
        for i, shot in enumerate(local):
            conn = next(conns) if shot.txn else None
            client = self.clients[i % len(self.clients)]
            kwargs = {"conn": conn, "queue": queue, "not_before": not_before}
            futures.append(self.pool.submit(fire, client, shot, dedup_id, start_at, **kwargs))
        per_lane = [remote[i :: len(self.lanes)] for i in range(len(self.lanes))] if remote else []
        for (_, pipe), part in zip(self.lanes, per_lane, strict=False):
            pipe.send(("fire", dedup_id, [asdict(s) for s in part], start_at, queue, not_before_s))
        results: list[Result] = []
        deadline = time.monotonic() + WAVE_TIMEOUT
        for future in futures:
            try:
                results.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
            except FutureTimeout:
                raise AssertionError(
                    f"{dedup_id}: a trigger is stuck after {WAVE_TIMEOUT} s (deadlock?)"
                ) from None
        for (proc, pipe), part in zip(self.lanes, per_lane, strict=False):
            assert pipe.poll(max(0.0, deadline - time.monotonic())), f"helper {proc.pid} stuck on {dedup_id}"
            kind, payload = pipe.recv()
            assert kind == "done", f"helper {proc.pid} failed:\n{payload}"
            results.extend(Result(**r) for r in payload)
            if part:
                self.count("shots from helper processes")
        assert len(results) == len(shots)
        return results

    def shots(self, count: int, *, holders_first: bool = False) -> list[Shot]:
        """Half in rolled-back caller transactions on PostgreSQL; each raises or returns the existing run.
        ``holders_first``: the transactions start a little earlier and hold the id longer, so that the
        plain triggers find it taken by a holder that then rolls back (the oban#1087 case)."""
        out = []
        for i in range(count):
            txn = self.pg and i % 2 == 0
            mode = self.rng.choice(["raise", "return_existing"])
            hold = self.rng.uniform(0.003, 0.01) if holders_first else self.rng.uniform(0.0, 0.003)
            out.append(Shot(i, mode, txn, hold if txn else 0.0, 0.005 if txn and holders_first else 0.0))
        return out

    def runs_of(self, dedup_id: str) -> list[Run]:
        return list(self.clients[0].list_runs(RunFilter(tag=dedup_id), limit=None))

    def judge(self, dedup_id: str, shots: list[Shot], results: list[Result], winner: Run | None) -> Run:
        """The wave's pass criteria; returns the one run that holds the dedup id."""
        by_index = {s.index: s for s in shots}
        errors = [r for r in results if r.outcome == "error"]
        assert not errors, f"{dedup_id}: triggers failed: {errors[:5]}"
        runs = self.runs_of(dedup_id)
        assert len(runs) == 1, (
            f"{dedup_id}: {len(runs)} runs after the wave: {[(r.id, r.status) for r in runs]}"
        )
        (run,) = runs
        assert winner is None or run.id == winner.id, f"{dedup_id}: the holder {winner} was replaced by {run}"
        created = [r for r in results if r.outcome == "ok" and by_index[r.index].on_conflict == "raise"]
        assert len(created) <= 1, f"{dedup_id}: {len(created)} triggers created a run: {created}"
        vanished: set[int] = set()
        for r in results:
            if r.outcome in ("ok", "conflict"):
                assert r.run_id == run.id, f"{dedup_id}: {r} does not name the winner {run.id}"
                self.count(f"{r.outcome} ({by_index[r.index].on_conflict})")
            elif r.outcome == "rolled_back":
                assert r.run_id is not None
                if r.run_id != run.id:  # its own insert, rolled back; else the winner, returned
                    vanished.add(r.run_id)
                self.count(
                    "rolled back (held the id)" if r.run_id != run.id else "rolled back (got the winner)"
                )
        if vanished:
            ghosts = self.call(self.store.get_runs(sorted(vanished)))
            assert not ghosts, f"{dedup_id}: rolled-back inserts exist: {ghosts}"
        return run

    # -- one round ------------------------------------------------------------------------------------------

    def round(self, index: int) -> None:
        dedup_id = f"t14-{self.token}-{index}"
        queue = f"t14-{self.token}-q{index}"
        lanes = bool(self.lanes) and index % PROCESS_EVERY == PROCESS_EVERY // 2
        scheduled = index % 4 == 1
        not_before_s = 3600.0 if scheduled else None
        shots = self.shots(SHOTS, holders_first=index % 2 == 1)
        winner = self.judge(
            dedup_id, shots, self.wave(dedup_id, queue, shots, lanes=lanes, not_before_s=not_before_s), None
        )
        assert winner.status.value == ("scheduled" if scheduled else "pending"), winner

        # The winner holds its dedup id in every non-terminal state.
        state = "scheduled" if scheduled else ("pending", "running", "retrying")[index % 3]
        worker = f"t14-worker-{self.token}"
        if state in ("running", "retrying"):
            claimed = self.call(
                self.store.claim(worker, queues=[queue], jobs=[JOB], limit=1, lease_timeout=300)
            )
            assert [r.id for r in claimed] == [winner.id], claimed
            if state == "retrying":
                failure = Finish(
                    winner.id, 1, "retrying", error=ErrorInfo("ValueError", "boom"), retry_delay=3600
                )
                assert self.call(self.store.finish_attempts([failure], worker_id=worker)) == [True]
        held = self.call(self.store.get_run(winner.id))
        assert held is not None and held.status.value == state, held
        self.count(f"held while {state}")
        second = self.shots(SECOND_WAVE)
        self.judge(
            dedup_id, second, self.wave(dedup_id, queue, second, lanes=False, not_before_s=None), winner
        )

        # Once it has ended, the dedup id is free again.
        if state == "running":
            done = Finish(winner.id, 1, "succeeded", result="ok")
            assert self.call(self.store.finish_attempts([done], worker_id=worker)) == [True]
        else:
            assert self.call(self.store.cancel_runs([winner.id])) == [winner.id]
        client = self.clients[index % len(self.clients)]
        if self.pg and index % 2:
            conn = self.conns[0]
            with conn.transaction():  # a caller transaction that commits this time
                fresh = client.trigger(
                    JOB, {"key": "again"}, dedup_id=dedup_id, tags=[dedup_id], connection=conn
                )
        else:
            fresh = client.trigger(JOB, {"key": "again"}, dedup_id=dedup_id, tags=[dedup_id], queue=queue)
        assert fresh.id != winner.id
        after = {r.id: r.status.value for r in self.runs_of(dedup_id)}
        assert after == {winner.id: after[winner.id], fresh.id: "pending"}, after
        assert after[winner.id] in ("succeeded", "cancelled"), after
        self.call(self.store.cancel_runs([fresh.id]))


def test_dedup_race_and_rollback(backend_url: str, seed: int) -> None:
    backend = "postgres" if backend_url.startswith("postgres") else "sqlite"
    rounds = scale(100, 2_000)
    bench = Bench(backend_url, random.Random(seed))
    started, cpu = time.monotonic(), time.process_time()
    try:
        bench.start_lanes()
        for index in range(rounds):
            try:
                bench.round(index)
            except AssertionError as exc:
                exc.add_note(f"T14 {backend} round {index} of CHAOS_SEED={seed}")
                raise
    finally:
        bench.close()
    elapsed = time.monotonic() - started
    cpu = time.process_time() - cpu
    print(
        f"T14 {backend}: {rounds} rounds in {elapsed:.1f}s ({cpu:.1f} s CPU); {dict(sorted(bench.stats.items()))}"
    )
    record_figures(
        "dedup_race_and_rollback",
        backend,
        seed,
        rounds=rounds,
        triggers=rounds * (SHOTS + SECOND_WAVE + 1),
        violations=0,
        rolled_back_holders=bench.stats.get("rolled back (held the id)", 0),
        seconds=round(elapsed, 1),
    )
    assert bench.stats.get("shots from helper processes", 0) > 0
    if backend == "postgres":
        assert bench.stats.get("rolled back (held the id)", 0) > 0, bench.stats
