"""T05 ``reaper_completion_race``: a worker's last writes against the reaper, on both stores.

Each store applies a finish, a release, a heartbeat and a reap as one atomic statement or transaction, so the
race is interleaved at operation granularity: seeded interleavings of {complete, fail-and-retry, SIGTERM
release, heartbeat, reap, a second worker's claim} for one run each, with lease expiry driven by a fake DB
clock, every result checked against an oracle of the fence; some steps gather a worker's write and a reap at
the same instant (two pooled connections on PostgreSQL, the one writer thread's queue on SQLite). Then real
concurrent races: runs whose leases expire in real time, their workers' writes and several reaps gathered
at once around the expiry.

Pass: a run that reached ``succeeded`` or ``failed`` is never changed by the reaper; a heartbeat that renews a
lease before the reaper's write wins (the reaper leaves the run alone until the renewed lease expires); exactly
one of {worker commit (finish or release), reaper reclaim} takes effect per attempt, and the attempt rows say
which. The fence now includes the lease's expiry: an expired lease refuses its worker's finish and heartbeat
even before the reaper comes (release is fenced by owner and attempt only).

The interleavings are dealt to four independent stores (SQLite files, or PostgreSQL schemas of the test
database) that play side by side, one interleaving at a time each: a store's reaper sees only its own run.

Replay: ``CHAOS_SEED=N`` (printed) replays every interleaving; a failure names the interleaving, its seed and
its operations.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from harness.checker import LEGAL
from harness.fastdb import drop_lanes, lane_urls
from harness.scenario import record_figures, scale

from runlane.models import ErrorInfo, Run
from runlane.store import Finish, Lease, NewRun, Store, create_store
from runlane.testing import FakeClock

LEASE = 5.0
JOB = "race"
LANES = 4  # independent stores playing interleavings side by side


# -- seeded interleavings under a fake clock ---------------------------------------------------------------------


@dataclass
class Claim:
    """One attempt as a worker holds it: the unit of "exactly one of commit or reclaim"."""

    worker: str
    attempt: int
    max_attempts: int
    effect: str | None = None  # succeeded | failed | retrying | released | reclaimed


@dataclass
class Oracle:
    """The run as the fence says it must be."""

    status: str = "pending"
    attempt: int = 0
    max_attempts: int = 3
    owner: str | None = None
    lease_until: float | None = None
    due: float = 0.0
    claims: list[Claim] = field(default_factory=list)

    def holds(self, claim: Claim, now: float, *, expiry_fences: bool = True) -> bool:
        held = self.status == "running" and self.attempt == claim.attempt and self.owner == claim.worker
        if expiry_fences:
            held = held and self.lease_until is not None and self.lease_until > now
        return held

    def current(self) -> Claim:
        return self.claims[-1]


class Interleaving:
    """One run, one seeded sequence of worker and reaper operations, each checked as it returns."""

    def __init__(self, store: Store, clock: FakeClock, rng: random.Random, stats: Counter[str]) -> None:
        self.store, self.clock, self.rng, self.stats = store, clock, rng, stats
        self.queue = f"t05-{uuid.uuid4().hex[:8]}"
        self.ops: list[str] = []
        self.oracle = Oracle(max_attempts=rng.choice([1, 2, 3]))
        self.run_id = 0
        self.workers = 0
        self.saved_by_heartbeat: list[float] = []  # lease ends a heartbeat replaced
        self.ended: Run | None = None  # the run as it was when it became terminal

    @property
    def now(self) -> float:
        return self.clock.now

    def die(self, message: str) -> None:
        raise AssertionError(f"{message}\nops so far: {self.ops}\noracle: {self.oracle}")

    def check(self, condition: bool, message: str) -> None:
        if not condition:
            self.die(message)

    async def play(self, steps: int) -> None:
        (run,) = await self.store.insert_runs(
            [NewRun(JOB, {"i": 0}, queue=self.queue, max_attempts=self.oracle.max_attempts)]
        )
        self.run_id = run.id
        self.oracle.due = self.now
        await self.claim()
        for _ in range(steps):
            op = self.rng.choices(
                [
                    "complete",
                    "fail",
                    "release",
                    "heartbeat",
                    "reap",
                    "advance",
                    "claim",
                    "renew_then_reap",
                    "pair",
                ],
                weights=[3, 3, 1, 3, 4, 4, 2, 1, 3],
            )[0]
            await getattr(self, op)()
        await self.settle()
        await self.verify()

    def pick(self) -> Claim:
        """Mostly the newest attempt's worker; sometimes an older one that lost its lease (a zombie)."""
        claims = self.oracle.claims
        return claims[-1] if self.rng.random() < 0.75 else self.rng.choice(claims)

    def took_effect(self, claim: Claim, effect: str) -> None:
        self.check(
            claim.effect is None, f"attempt {claim.attempt} of {claim.worker}: {effect} after {claim.effect}"
        )
        claim.effect = effect
        self.stats[f"effect {effect}"] += 1
        self.saved_by_heartbeat = []  # the lease those renewals extended has ended

    async def claim(self) -> None:
        o = self.oracle
        due = o.status == "pending" or (o.status == "retrying" and o.due <= self.now)
        self.workers += 1
        worker = f"w{self.workers}-{self.queue}"
        self.ops.append(f"claim by {worker} at {self.now}")
        got = await self.store.claim(worker, queues=[self.queue], jobs=[JOB], limit=1, lease_timeout=LEASE)
        self.check(len(got) == (1 if due else 0), f"claim returned {got}, due={due}")
        if got:
            o.status, o.attempt, o.owner, o.lease_until = "running", o.attempt + 1, worker, self.now + LEASE
            self.check(got[0].attempt == o.attempt, f"claimed attempt {got[0].attempt}, oracle {o.attempt}")
            o.claims.append(Claim(worker, o.attempt, got[0].max_attempts))

    async def complete(self) -> None:
        await self._finish(self.pick(), "succeeded")

    async def fail(self) -> None:
        claim = self.pick()
        # The worker's own decision (the executor's): retry while attempts remain, else fail.
        await self._finish(claim, "retrying" if claim.attempt < claim.max_attempts else "failed")

    async def _finish(self, claim: Claim, outcome: str) -> None:
        o = self.oracle
        expected = o.holds(claim, self.now)
        delay = self.rng.choice([0.0, 1.0])
        error = None if outcome == "succeeded" else ErrorInfo("ValueError", "boom")
        self.ops.append(
            f"{outcome} by {claim.worker} attempt {claim.attempt} at {self.now} (expect {expected})"
        )
        finish = Finish(self.run_id, claim.attempt, outcome, result=1, error=error, retry_delay=delay)  # type: ignore[arg-type]
        (done,) = await self.store.finish_attempts([finish], worker_id=claim.worker)
        self.check(done == expected, f"finish returned {done}, the fence says {expected}")
        await self.finished(claim, outcome, delay, done)

    async def finished(self, claim: Claim, outcome: str, delay: float, done: bool) -> None:
        o = self.oracle
        self.stats[f"finish {'applied' if done else 'fenced off'}"] += 1
        if done:
            self.took_effect(claim, outcome)
            o.status, o.owner, o.lease_until = outcome, None, None
            if outcome == "retrying":
                o.due = self.now + delay
            else:
                await self.remember_end()

    async def remember_end(self) -> None:
        """The record of the run as it ended: nothing (the reaper least of all) may change it afterwards."""
        self.ended = await self.store.get_run(self.run_id)

    async def release(self) -> None:
        claim, o = self.pick(), self.oracle
        expected = o.holds(claim, self.now, expiry_fences=False)
        self.ops.append(
            f"release by {claim.worker} attempt {claim.attempt} at {self.now} (expect {expected})"
        )
        got = await self.store.release_runs([Lease(self.run_id, claim.attempt)], worker_id=claim.worker)
        self.check(
            got == ([self.run_id] if expected else []), f"release returned {got}, fence says {expected}"
        )
        if expected:
            self.released(claim)

    def released(self, claim: Claim) -> None:
        o = self.oracle
        self.took_effect(claim, "released")
        o.status, o.attempt, o.owner, o.lease_until = "pending", o.attempt - 1, None, None

    async def heartbeat(self) -> None:
        claim, o = self.pick(), self.oracle
        expected = o.holds(claim, self.now)
        self.ops.append(
            f"heartbeat by {claim.worker} attempt {claim.attempt} at {self.now} (expect {expected})"
        )
        # Called on the loop's thread: nothing else runs meanwhile, and it saves a thread hop per call.
        got = self.store.heartbeat_blocking(claim.worker, [Lease(self.run_id, claim.attempt)], LEASE)
        self.check(
            got == ({self.run_id} if expected else set()), f"heartbeat returned {got}, fence {expected}"
        )
        self.renewed(expected)

    def renewed(self, held: bool) -> None:
        o = self.oracle
        self.stats[f"heartbeat {'renewed' if held else 'refused'}"] += 1
        if held:
            assert o.lease_until is not None
            self.saved_by_heartbeat.append(o.lease_until)
            o.lease_until = self.now + LEASE

    async def reap(self) -> None:
        o = self.oracle
        expected = o.status == "running" and o.lease_until is not None and o.lease_until < self.now
        self.ops.append(f"reap at {self.now} (expect {expected})")
        got = await self.store.reap_expired_leases()
        self.check(got == ([self.run_id] if expected else []), f"reap returned {got}, expected {expected}")
        if o.status in ("succeeded", "failed"):
            self.stats["reap of a terminal run: untouched"] += 1  # verify() compares the record
        if any(end < self.now for end in self.saved_by_heartbeat) and o.status == "running" and not expected:
            self.stats["heartbeat before the reap won"] += 1  # reaped at the old lease end, it would be gone
        self.saved_by_heartbeat = [end for end in self.saved_by_heartbeat if end >= self.now]
        if expected:
            await self.reclaimed()

    async def reclaimed(self) -> None:
        o = self.oracle
        self.took_effect(o.current(), "reclaimed")
        o.owner, o.lease_until = None, None
        o.status = "pending" if o.attempt < o.max_attempts else "failed"
        if o.status == "failed":
            await self.remember_end()

    async def pair(self) -> None:
        """A worker's write and the reaper at the same instant, really concurrent (two pooled connections on
        PostgreSQL, queued to the one writer thread on SQLite): at most one may take effect, and which one is
        the fence's call, except for a release of an expired lease (not expiry-fenced), where either may."""
        claim, o = self.pick(), self.oracle
        kind = self.rng.choice(["complete", "fail", "release", "heartbeat"])
        fenced = o.holds(claim, self.now)
        owned = o.holds(claim, self.now, expiry_fences=False)
        reapable = o.status == "running" and o.lease_until is not None and o.lease_until < self.now
        self.ops.append(f"pair: {kind} by {claim.worker} attempt {claim.attempt} with a reap at {self.now}")
        lease = Lease(self.run_id, claim.attempt)
        outcome = (
            "succeeded"
            if kind == "complete"
            else "retrying"
            if claim.attempt < claim.max_attempts
            else "failed"
        )
        delay = 1.0
        worker_op: Any
        if kind == "release":
            worker_op = self.store.release_runs([lease], worker_id=claim.worker)
        elif kind == "heartbeat":
            worker_op = asyncio.to_thread(self.store.heartbeat_blocking, claim.worker, [lease], LEASE)
        else:
            error = None if outcome == "succeeded" else ErrorInfo("ValueError", "boom")
            finish = Finish(self.run_id, claim.attempt, outcome, result=1, error=error, retry_delay=delay)  # type: ignore[arg-type]
            worker_op = self.store.finish_attempts([finish], worker_id=claim.worker)
        result, reaped_ids = await asyncio.gather(worker_op, self.store.reap_expired_leases())
        wrote = result in ([True], [self.run_id], {self.run_id})
        reaped = reaped_ids == [self.run_id]
        self.check(reaped_ids in ([], [self.run_id]), f"the reaper took {reaped_ids}")
        self.check(not (wrote and reaped), f"both took effect: {kind} {result} and the reap {reaped_ids}")
        if kind == "release" and owned and reapable:
            self.check(wrote or reaped, "neither the release nor the reap took effect")
            self.stats[f"pair release/reap won by {'release' if wrote else 'reaper'}"] += 1
        else:
            self.check(wrote == (owned if kind == "release" else fenced), f"{kind} returned {result}")
            self.check(reaped == reapable, f"the reap returned {reaped_ids}, expected {reapable}")
        self.stats[f"pair {kind}: {'worker' if wrote else 'reaper' if reaped else 'neither'}"] += 1
        if kind == "heartbeat":
            self.renewed(wrote)
        elif wrote and kind == "release":
            self.released(claim)
        elif kind != "release":
            await self.finished(claim, outcome, delay, wrote)
        if reaped:
            await self.reclaimed()

    async def renew_then_reap(self) -> None:
        """The race of the plan, spelled out: a heartbeat lands just before the lease would expire, then the
        reaper runs past the old expiry (and before the new one)."""
        o = self.oracle
        if o.status == "running" and o.lease_until is not None and o.lease_until - self.now > 0.5:
            self.clock.advance(o.lease_until - self.now - 0.5)
            self.ops.append("advance to 0.5 s before the lease ends")
        await self.heartbeat()
        self.clock.advance(1.0)
        self.ops.append("advance 1.0")
        await self.reap()

    async def advance(self) -> None:
        seconds = self.rng.choice([0.5, LEASE - 0.5, LEASE, LEASE + 0.5, 2 * LEASE])
        self.clock.advance(seconds)
        self.ops.append(f"advance {seconds}")

    async def settle(self) -> None:
        """Let every attempt end: expire what is held, reap it, run the rest to success."""
        o = self.oracle
        for _ in range(10):
            if o.status in ("succeeded", "failed"):
                return
            if o.status == "running":
                self.clock.advance(2 * LEASE)
                self.ops.append(f"settle: advance {2 * LEASE}")
                await self.reap()
            elif o.status == "retrying" and o.due > self.now:
                self.clock.advance(o.due - self.now)
            else:
                await self.claim()
                await self._finish(o.current(), "succeeded")
        self.die("the run never settled")

    async def verify(self) -> None:
        o = self.oracle
        run, rows, events = await asyncio.gather(
            self.store.get_run(self.run_id), self.store.attempts(self.run_id), self.store.events(self.run_id)
        )
        assert run is not None
        self.check(
            run.status == o.status and run.attempt == o.attempt, f"final run {run.status} {run.attempt}"
        )
        self.check(run == self.ended, f"the {o.status} run changed after it ended:\n{self.ended}\n{run}")
        for claim in o.claims:
            self.check(claim.effect is not None, f"attempt {claim.attempt} of {claim.worker} never ended")
        # The attempt rows: one per claim that was not released (a release gives its number back).
        kept = [c for c in o.claims if c.effect != "released"]
        got = [(a.number, a.worker_id, a.status.value, a.error.type if a.error else None) for a in rows]
        want = [
            (
                c.attempt,
                c.worker,
                "succeeded" if c.effect == "succeeded" else "failed",
                None
                if c.effect == "succeeded"
                else "WorkerLost"
                if c.effect == "reclaimed"
                else "ValueError",
            )
            for c in kept
        ]
        self.check(got == want, f"attempt rows\n{got}\nexpected from the effects\n{want}")
        status: str | None = None
        for event in events:
            frm, to = event.data["from"], event.data["to"]
            self.check((frm, to) in LEGAL, f"illegal transition {frm}->{to}")
            self.check(status is None or frm == status, f"event {frm}->{to} after {status}")
            status = to
        self.check(status == o.status, f"last status event {status}, run {o.status}")


async def _lane(url: str, cases: list[tuple[int, int]], seed: int, stats: Counter[str]) -> None:
    """Play ``cases`` (index, seed) one after another on a store of their own, under its own fake clock."""
    clock = FakeClock()
    store = create_store(url, clock=clock)
    await store.open()
    await store.migrate()
    try:
        for index, case_seed in cases:
            case = Interleaving(store, clock, random.Random(case_seed), stats)
            try:
                await case.play(steps=case.rng.randint(2, 7))
            except AssertionError as exc:
                exc.add_note(f"T05 interleaving {index} (seed {case_seed}) of CHAOS_SEED={seed}")
                raise
    finally:
        await store.close()


async def _interleavings(urls: list[str], count: int, seed: int) -> Counter[str]:
    """The interleavings, dealt round-robin to independent stores that play side by side (each store's
    reaper sees only its own lane's run; the stores only share the machine)."""
    master = random.Random(seed)
    cases = [(index, master.randrange(1 << 32)) for index in range(count)]
    stats: Counter[str] = Counter()
    await asyncio.gather(*(_lane(url, cases[k :: len(urls)], seed, stats) for k, url in enumerate(urls)))
    return stats


# -- real concurrent races around a real lease expiry ---------------------------------------------------------------

RT_LEASE = 0.12  # seconds of real time: the worker writes and the reaps land around it


@dataclass
class Race:
    run: Run
    worker: str
    action: str
    at: float
    result: Any = None
    began: float = 0.0
    done_at: float = 0.0


async def _concurrent_round(store: Store, rng: random.Random, size: int, stats: Counter[str]) -> None:
    queue = f"t05rt-{uuid.uuid4().hex[:8]}"
    await store.insert_runs([NewRun(JOB, {"i": i}, queue=queue, max_attempts=2) for i in range(size)])
    worker = f"rt-{queue}"
    start = time.monotonic()  # the leases start with this claim
    claimed = await store.claim(worker, queues=[queue], jobs=[JOB], limit=size, lease_timeout=RT_LEASE)
    assert len(claimed) == size, claimed
    races = [
        Race(
            run,
            worker,
            rng.choice(["complete", "fail", "release", "heartbeat"]),
            rng.uniform(0.6, 1.4) * RT_LEASE,
        )
        for run in claimed
    ]
    by_run = {race.run.id: race for race in races}
    reaps: list[tuple[float, float, list[int]]] = []

    async def act(race: Race) -> None:
        await asyncio.sleep(max(0.0, start + race.at - time.monotonic()))
        race.began = time.monotonic()
        lease = Lease(race.run.id, race.run.attempt)
        if race.action == "heartbeat":
            race.result = await asyncio.to_thread(store.heartbeat_blocking, race.worker, [lease], RT_LEASE)
        elif race.action == "release":
            race.result = await store.release_runs([lease], worker_id=race.worker)
        else:
            outcome = "succeeded" if race.action == "complete" else "retrying"
            error = None if outcome == "succeeded" else ErrorInfo("ValueError", "boom")
            finish = Finish(race.run.id, race.run.attempt, outcome, result=1, error=error, retry_delay=60.0)  # type: ignore[arg-type]
            race.result = await store.finish_attempts([finish], worker_id=race.worker)
        race.done_at = time.monotonic()

    async def reap(at: float) -> None:
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        began = time.monotonic()
        got = await store.reap_expired_leases()
        reaps.append((began, time.monotonic(), got))

    reap_times = [rng.uniform(0.6, 1.4) * RT_LEASE for _ in range(4)]
    await asyncio.gather(*(act(r) for r in races), *(reap(t) for t in reap_times))
    # Whatever neither side took in the window (a refused write before a reap that came too early) is left
    # running with an expired lease, and a renewed lease runs on: the reaper takes them once they expire.
    reaped: Counter[int] = Counter()
    for _, _, got in reaps:
        reaped.update(got)
    deadline = time.monotonic() + 30
    while True:
        reaped.update(await store.reap_expired_leases())
        running = [r.id for r in await store.get_runs(list(by_run)) if r.status.value == "running"]
        if not running:
            break
        assert time.monotonic() < deadline, f"runs {running} still running 30 s after their leases"
        await asyncio.sleep(RT_LEASE / 2)
    for run_id, race in by_run.items():
        committed = (
            bool(race.result == [True]) if race.action in ("complete", "fail") else race.result == [run_id]
        )
        if race.action == "heartbeat":
            renewed = race.result == {run_id}
            committed = False
            if renewed:  # a reap between the renewal and the renewed lease's end leaves the run alone
                for began, ended, got in reaps:
                    if race.done_at < began and ended < race.began + RT_LEASE * 0.9:
                        assert run_id not in got, (
                            f"run {run_id}: reaped {began - race.done_at:.3f}s after renewal"
                        )
                        stats["rt heartbeat before a reap won"] += 1
                stats["rt heartbeat renewed"] += 1
        effects = int(committed) + reaped[run_id]
        assert effects == 1, (
            f"run {run_id} ({race.action}): worker commit {committed}, reclaimed {reaped[run_id]} times "
            f"(result {race.result})"
        )
        stats[f"rt {race.action} {'committed' if committed else 'reclaimed'}"] += 1
        rows = await store.attempts(run_id)
        run = await store.get_run(run_id)
        assert run is not None
        if committed and race.action == "release":
            assert rows == [] and run.status == "pending" and run.attempt == 0, (run, rows)
        elif committed:
            assert [a.status.value for a in rows] == [
                "succeeded" if race.action == "complete" else "failed"
            ], rows
            assert run.status == ("succeeded" if race.action == "complete" else "retrying"), run
        else:
            assert len(rows) == 1 and rows[0].error is not None and rows[0].error.type == "WorkerLost", rows
            assert run.status == "pending", run
    await store.cancel_runs([r.run.id for r in races], reason="end of round")


async def _concurrent(url: str, rounds: int, size: int, seed: int) -> Counter[str]:
    store = create_store(url)  # the real clock: the database's, on PostgreSQL
    await store.open()
    await store.migrate()
    stats: Counter[str] = Counter()
    rng = random.Random(seed)
    try:
        for index in range(rounds):
            try:
                await _concurrent_round(store, rng, size, stats)
            except AssertionError as exc:
                exc.add_note(f"T05 concurrent round {index} of CHAOS_SEED={seed}")
                raise
    finally:
        await store.close()
    return stats


def test_reaper_completion_race(backend_url: str, seed: int) -> None:
    backend = "postgres" if backend_url.startswith("postgres") else "sqlite"
    count = scale(1_000, 10_000)
    rounds = scale(8, 100)
    started, cpu = time.monotonic(), time.process_time()
    urls = lane_urls(backend_url, "t05_lane", LANES)
    try:
        stats = asyncio.run(_interleavings(urls, count, seed))
    finally:
        drop_lanes(backend_url, "t05_lane", LANES)
    middle = time.monotonic()
    stats.update(asyncio.run(_concurrent(backend_url, rounds, 16, seed)))
    print(
        f"T05 {backend}: {count} interleavings in {middle - started:.1f}s, {rounds}x16 concurrent races in "
        f"{time.monotonic() - middle:.1f}s ({time.process_time() - cpu:.1f} s CPU in all); "
        f"{dict(sorted(stats.items()))}"
    )
    record_figures(
        "reaper_completion_race",
        backend,
        seed,
        interleavings=count,
        concurrent_races=rounds * 16,
        violations=0,
        worker_commits=sum(stats[f"effect {e}"] for e in ("succeeded", "failed", "retrying", "released")),
        reclaims=stats["effect reclaimed"],
        heartbeat_won=stats["heartbeat before the reap won"] + stats["rt heartbeat before a reap won"],
    )
    # The interesting cases happened (else the pass says nothing): both sides won races, stale writes were
    # refused, heartbeats beat the reaper, the reaper met terminal runs and left them.
    for needed in (
        "effect succeeded",
        "effect reclaimed",
        "effect released",
        "finish fenced off",
        "heartbeat before the reap won",
        "reap of a terminal run: untouched",
    ):
        assert stats[needed] > 0, f"no {needed!r} in {count} interleavings: {stats}"
    # Real time decides the concurrent races: across all of them, each side must have won some.
    for side in ("committed", "reclaimed"):
        won = sum(n for key, n in stats.items() if key.startswith("rt ") and key.endswith(side))
        assert won > 0, f"the concurrent races never ended {side}: {stats}"
