"""T17 ``state_machine_model``: Hypothesis drives a real store (both backends, a fake DB clock) through random
programs of triggers, continuations, claims, heartbeats, completions, failures (retryable, ``NonRetryable``,
timeout), worker crashes with lease expiry and reaping, SIGTERM releases, ``not_after`` expiry, cancels,
retries and reruns, and compares it with a small model of spec §2 and of the store contract (base.py).

After every step: each verb's answer is the model's (what a claim may take, which finishes and heartbeats the
fence lets through — run, attempt, owner and an unexpired lease —, what the reaper and expiry take, what a
cancel reaches); every run's record is the model's and a run the step did not move is exactly as it was;
terminal statuses leave only by ``retry``; ``rerun`` leaves the old run, its attempts and events untouched; a
failure's delay is ``backoff * 2**(n-1)`` capped at ``max_delay`` within the jitter bounds and the store makes
the run due exactly then; attempt numbers only grow (a release gives one back); continuations stay
``scheduled`` while their parent is ``retrying`` and are cancelled when it fails (unless they wait for that).
At the end of each example: every run's attempt rows, and its status events (append-only, so every transition
of every step is still there) against the model's, each transition legal in spec §2 (harness.checker.LEGAL).

Scale: smoke splits the CI's 500 examples of up to 15 steps over the two backends (fewer on PostgreSQL, whose
steps cost more); ``RUNLANE_CHAOS_TIER=full`` runs 10,000 examples of up to 50 steps per backend.

Replay: the test prints ``CHAOS_SEED=N`` (and repeats it in a failure's notes): ``CHAOS_SEED=N pytest
tests/chaos/test_state_machine_model.py`` replays the same examples, and so does ``pytest
--hypothesis-seed=N`` (which wins over CHAOS_SEED). A failure is shrunk to a minimal program (for at most a
minute in the smoke tier), printed step by step with a ``@reproduce_failure(…)`` blob, and replayed first on
the next run from Hypothesis' example database (``.hypothesis/``).

The examples of one test share one store and one clock (a fresh database per example would cost more than the
example): each example works in its own queue and cancels its leftovers at teardown, so the next example sees
only terminal runs of its predecessors, which no verb touches.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from harness.checker import LEGAL
from harness.scenario import FULL, record_figures
from hypothesis import HealthCheck, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.internal.conjecture import engine
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from runlane import Runlane
from runlane.errors import JobTimeout, NonRetryable
from runlane.models import Run
from runlane.retry import Retry
from runlane.store import Finish, Lease, NewRun, Store
from runlane.testing import FakeClock

pytestmark = pytest.mark.serial  # CPU-heavy or measures latency: runs alone (scripts/test)

T = TypeVar("T")

LEASE = 5.0
TICK = 1 / 64  # every clock move is a multiple of this: exact in floats and in PostgreSQL's microseconds
ACTIVE = frozenset({"scheduled", "pending", "running", "retrying"})
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "skipped"})

# The jobs' retry policies, as the worker applies them (Retry.next_delay, the executor's decision).
POLICIES: dict[str, Retry] = {
    "flaky": Retry(attempts=3, backoff=1.0, max_delay=3.0),
    "steady": Retry(attempts=4, backoff=0.5, max_delay=2.0, jitter=False),
    "once": Retry(attempts=1),
    "picky": Retry(attempts=3, backoff=2.0, max_delay=300.0, on=(ValueError,)),
}
JOBS = tuple(POLICIES)
FAILURES: dict[str, Callable[[], BaseException]] = {
    "value_error": lambda: ValueError("boom"),  # retryable for every policy
    "runtime_error": lambda: RuntimeError("boom"),  # outside picky's `on`: fails at once
    "non_retryable": lambda: NonRetryable("give up"),
    "timeout": lambda: JobTimeout("attempt exceeded its timeout"),
}
WHENS = ("succeeded", "failed", "cancelled", "finished")
# Options drawn together (one draw each): job, not_before in, not_after in, max_attempts override.
TRIGGERS = list(
    itertools.product(JOBS, [None, None, 0.0, 1.0, 3.0], [None, None, None, 2.0, 8.0], [None, None, 1, 2, 5])
)
CONTINUATIONS = list(itertools.product(JOBS, WHENS, [None, None, 2.0], [None, None, None, 3.0]))
FAILS = list(itertools.product(sorted(FAILURES), [0, 0, 1]))  # failure kind, and claim
CLAIMS = list(itertools.product(["w1", "w2"], [1, 2, 3]))  # worker, limit
# Built once: a strategy over a long list inspects every element when it is made (its label).
TRIGGERS_ST, CONTINUATIONS_ST, FAILS_ST, CLAIMS_ST = map(
    st.sampled_from, (TRIGGERS, CONTINUATIONS, FAILS, CLAIMS)
)
ADVANCES = (0.25, 1.0, 2.0, LEASE - 1.0, LEASE, LEASE + 0.5, 2 * LEASE)  # LEASE: exactly at the lease end
ADVANCES_ST = st.sampled_from(ADVANCES)

SMOKE_EXAMPLES = {"sqlite": 350, "postgres": 150}  # the CI's 500, split so that the pair fits ~40 s
SMOKE_STEPS = 15
SMOKE_SHRINK_SECONDS = 60  # then report the failure as shrunk so far (Hypothesis' default is 5 minutes)
FULL_EXAMPLES = 10_000
FULL_STEPS = 50


def make_app(url: str, clock: FakeClock) -> Runlane:
    app = Runlane(url, clock=clock)
    for name, policy in POLICIES.items():

        def body(k: int) -> int:
            return k

        body.__name__ = name
        app.job(name=name, retry=policy)(body)
    return app


@dataclass
class World:
    """What the examples of one test share: the loop, the store under test, its fake clock and a client."""

    app: Runlane
    store: Store
    clock: FakeClock
    loop: asyncio.AbstractEventLoop
    examples: Iterator[int] = field(default_factory=itertools.count)
    stats: Counter[str] = field(default_factory=Counter)

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)


# -- the model ---------------------------------------------------------------------------------------------------


@dataclass
class MAttempt:
    status: str
    error: str | None
    worker: str


@dataclass
class MRun:
    id: int
    job: str
    args: dict[str, Any]
    status: str
    max_attempts: int
    root: int
    parent: int | None = None
    when: str | None = None
    waiting: bool = False  # a continuation whose parent has not ended yet
    not_before: float | None = None
    not_after: float | None = None
    due: float | None = None  # scheduled / pending / retrying: when it is (or becomes) claimable
    attempts: list[MAttempt] = field(default_factory=list)
    owner: str | None = None
    lease_until: float | None = None
    result: Any = None
    error: str | None = None  # error type of a failed or cancelled run
    events: list[tuple[str, str]] = field(default_factory=list)
    event_steps: list[str] = field(default_factory=list)  # the step that made each of `events`

    @property
    def attempt(self) -> int:
        return len(self.attempts)


@dataclass
class MWorker:
    name: str
    id: str
    generation: int = 0
    leases: list[Run] = field(default_factory=list)  # the runs it believes it executes (maybe stale)


def make_machine(world: World) -> type[RuleBasedStateMachine]:
    class StoreModel(RuleBasedStateMachine):
        """One example: a model of spec §2 beside the real store, compared after every step."""

        def __init__(self) -> None:
            super().__init__()
            self.w = world
            self.store = world.store
            self.n = next(world.examples)
            self.queue = f"t17-{self.n}-{uuid.uuid4().hex[:6]}"
            self.runs: dict[int, MRun] = {}
            self.workers = {name: MWorker(name, f"{name}.0-{self.queue}") for name in ("w1", "w2")}
            self.snapshots: dict[int, Run] = {}
            self.touched: set[int] = set()  # runs the step moved: their records are compared with the model
            self.broken = False  # a step failed: teardown only cleans up
            self.step = ""
            self.action = ""
            self.args_counter = itertools.count()

        # -- helpers ---------------------------------------------------------------------------------------------

        @property
        def now(self) -> float:
            return self.w.clock.now

        def _run(self, coro: Awaitable[T]) -> T:
            return self.w.run(coro)

        def _move(self, run: MRun, to: str) -> None:
            run.events.append((run.status, to))
            run.event_steps.append(self.step)
            run.status = to
            self.touched.add(run.id)

        def _active(self) -> list[MRun]:
            return [r for r in self.runs.values() if r.status in ACTIVE]

        def _children(self, run_id: int) -> list[MRun]:
            return sorted((r for r in self.runs.values() if r.parent == run_id), key=lambda r: r.id)

        def _decide(self, parent_ids: list[int]) -> list[int]:
            """The continuation rule (store/base.py): returns the continuations it cancelled."""
            cancelled: list[int] = []
            todo = sorted(set(parent_ids))
            while todo:
                nxt: list[int] = []
                for pid in todo:
                    parent = self.runs[pid]
                    if parent.status not in TERMINAL:
                        continue
                    for c in self._children(pid):
                        if not (c.waiting and c.status == "scheduled"):
                            continue
                        c.waiting = False
                        if c.when == "finished" or c.when == parent.status:
                            if c.not_before is not None and c.not_before > self.now:
                                c.due = c.not_before
                            else:
                                c.due = self.now
                                self._move(c, "pending")
                        else:
                            self._move(c, "cancelled")
                            c.error = "Cancelled"
                            cancelled.append(c.id)
                            nxt.append(c.id)
                todo = nxt
            return cancelled

        def _lease_held(self, worker: MWorker, lease: Run, *, expiry_fences: bool = True) -> bool:
            """The fence of every worker write: the run still runs this attempt for this worker, and the lease
            has not expired (an expired lease fences even before the reaper comes). A release is fenced
            without the expiry."""
            run = self.runs[lease.id]
            held = run.status == "running" and run.attempt == lease.attempt and run.owner == worker.id
            if expiry_fences:
                held = held and run.lease_until is not None and run.lease_until > self.now
            return held

        def _claim_model(self, worker: MWorker, claimed: list[Run], limit: int) -> None:
            """Check a claim's result against the model and apply it."""
            for r in self._active():
                if r.status in ("scheduled", "retrying") and r.due is not None and r.due <= self.now:
                    self._move(r, "pending")
            claimable = {
                r.id
                for r in self._active()
                if r.status == "pending" and (r.not_after is None or r.not_after > self.now)
            }
            ids = [r.id for r in claimed]
            assert len(ids) == len(set(ids)), f"a claim returned a run twice: {ids}"
            assert set(ids) <= claimable, f"claimed {ids}, but only {sorted(claimable)} were claimable"
            assert len(ids) == min(limit, len(claimable)), (
                f"claimed {ids} with limit {limit} while {sorted(claimable)} were claimable"
            )
            for got in claimed:
                run = self.runs[got.id]
                run.attempts.append(MAttempt("running", None, worker.id))
                run.owner, run.lease_until = worker.id, self.now + LEASE
                self._move(run, "running")
                assert got.status == "running" and got.attempt == run.attempt, got
                assert got.worker_id == worker.id
                worker.leases.append(got)

        def _finish_model(self, worker: MWorker, finish: Finish, applied: bool) -> None:
            lease = next(x for x in worker.leases if x.id == finish.run_id and x.attempt == finish.attempt)
            worker.leases.remove(lease)
            expected = self._lease_held(worker, lease)
            assert applied == expected, (
                f"finish of run {finish.run_id} attempt {finish.attempt} by {worker.id}: store says "
                f"{applied}, model says {expected} ({self.runs[finish.run_id]})"
            )
            self.note(f"finish {finish.outcome}: {'applied' if applied else 'fenced off'}")
            if not applied:
                return
            run = self.runs[finish.run_id]
            run.owner = run.lease_until = None
            current = run.attempts[-1]
            if finish.outcome == "succeeded":
                current.status = "succeeded"
                run.result = finish.result
                self._move(run, "succeeded")
                self._decide([run.id])
            else:
                assert finish.error is not None
                current.status, current.error = "failed", finish.error.type
                if finish.outcome == "retrying":
                    run.due = self.now + finish.retry_delay
                    self._move(run, "retrying")
                else:
                    run.error = finish.error.type
                    self._move(run, "failed")
                    self._decide([run.id])

        def _pick_run(self, data: st.DataObject, preferred: Callable[[MRun], bool]) -> int:
            """Mostly a run the rule can act on, sometimes any run (the verb must then refuse or do nothing).
            (One draw per choice, here and below: draws are most of Hypothesis' cost per step.)"""
            good = sorted(r.id for r in self.runs.values() if preferred(r))
            choice: int = data.draw(st.sampled_from(good * 4 + sorted(self.runs)), label="run")
            return choice

        def _claimable(self) -> bool:
            """Some run is due (a claim of nothing is checked often enough by claims after finishes)."""
            return any(
                (r.status == "pending" or (r.status in ("scheduled", "retrying") and r.due is not None))
                and (r.due is None or r.due <= self.now)
                and (r.not_after is None or r.not_after > self.now)
                for r in self.runs.values()
            )

        def _pick_lease(self, data: st.DataObject) -> tuple[MWorker, Run]:
            """A lease some worker believes it holds (it may be stale).

            Every choice must depend only on the example's own draws: the store's ids do not (the examples
            share one store, so the same program gets other ids in another example), only their order does.
            Sorting "run 99" and "run 100" as text did, and Hypothesis saw the same draws lead to different
            choices (FlakyStrategyDefinition)."""
            held = sorted(((w.name, x.id, x.attempt), w, x) for w in self.workers.values() for x in w.leases)
            _, worker, lease = held[data.draw(st.integers(0, len(held) - 1), label="lease")]
            return worker, lease

        def _pick_worker(self, data: st.DataObject) -> MWorker:
            """A worker that believes it holds leases."""
            names = [w.name for w in self.workers.values() if w.leases]
            return self.workers[data.draw(st.sampled_from(names), label="worker")]

        def _nudge(self) -> None:
            """Keep the clock off the (jittered, inexact) boundaries so both stores and the model agree."""
            bounds = [r.due for r in self.runs.values() if r.due is not None]
            bounds += [r.lease_until for r in self.runs.values() if r.lease_until is not None]
            while any(0 < abs(self.now - b) < 1e-3 for b in bounds):
                self.w.clock.advance(TICK)

        def note(self, outcome: str) -> None:
            """Count what the examples reached (printed at the end: a model that never gets anywhere proves
            nothing)."""
            self.w.stats[outcome] += 1

        def _restart(self, worker: MWorker) -> None:
            """The process is gone: a new one comes up with a new id and no leases."""
            worker.generation += 1
            worker.id = f"{worker.name}.{worker.generation}-{self.queue}"
            worker.leases = []

        # -- the one rule: a weighted choice of action ---------------------------------------------------------------
        # One rule rather than one per verb: Hypothesis favours the first rule (by name) when it generates and
        # shrinks, which made clock moves most of every program. Here ACTIONS' weights and order say what a
        # program is made of.

        @rule(data=st.data())
        def act(self, data: st.DataObject) -> None:
            ready = tuple(name for name, _, can in ACTIONS if can(self))
            name = data.draw(_choices(ready), label="action")
            self.action = name
            self.broken = True  # until the step and its check pass
            getattr(self, f"do_{name}")(data)

        # -- actions: clients -------------------------------------------------------------------------------------

        def do_trigger(self, data: st.DataObject) -> None:
            """A run, sometimes delayed, sometimes with a deadline, sometimes a child of another run."""
            job, delay, ttl, max_attempts = data.draw(
                TRIGGERS_ST, label="job, not_before in, not_after in, max_attempts"
            )
            parents: list[int | None] = [None, None, None, *sorted(self.runs)]
            parent = data.draw(st.sampled_from(parents), label="parent")
            self.step = f"trigger {job}"
            self._insert(job, delay, ttl, max_attempts, parent, None)

        def do_continue_with(self, data: st.DataObject) -> None:
            job, when, delay, ttl = data.draw(
                CONTINUATIONS_ST, label="job, when, not_before in, not_after in"
            )
            parent = self._pick_run(data, lambda r: r.status in ACTIVE)
            self.step = f"continue_with {parent} when={when}"
            self._insert(job, delay, ttl, None, parent, when)

        def _insert(
            self,
            job: str,
            delay: float | None,
            ttl: float | None,
            max_attempts: int | None,
            parent: int | None,
            when: str | None,
        ) -> None:
            attempts = max_attempts or POLICIES[job].attempts
            not_before = None if delay is None else self.now + delay
            not_after = None if ttl is None else self.now + ttl
            args = {"k": next(self.args_counter)}
            new = NewRun(
                job=job,
                args=args,
                queue=self.queue,
                max_attempts=attempts,
                not_before=not_before,
                not_after=not_after,
                parent_run_id=parent,
                continue_when=when,  # type: ignore[arg-type]
            )
            (got,) = self._run(self.store.insert_runs([new]))
            assert got.id not in self.runs
            if when is not None:
                status, due, waiting = "scheduled", None, True
            elif not_before is not None and not_before > self.now:
                status, due, waiting = "scheduled", not_before, False
            else:
                status, due, waiting = "pending", not_before if not_before is not None else self.now, False
            root = got.id if parent is None else self.runs[parent].root
            run = MRun(
                got.id, job, args, status, attempts, root, parent, when, waiting, not_before, not_after, due
            )
            self.runs[got.id] = run
            if when is not None:
                self._decide([parent] if parent is not None else [])
            # Decided at once when the parent had already ended: the returned record says so.
            assert got.status == run.status, f"inserted as {got.status}, model says {run.status}"

        def do_cancel(self, data: st.DataObject) -> None:
            run_id = self._pick_run(data, lambda r: r.status in ACTIVE)
            self.step = f"cancel {run_id}"
            got = self._run(self.store.cancel_runs([run_id]))
            seeds = [run_id] if self.runs[run_id].status in ACTIVE else []
            found: list[int] = []
            stack, seen = list(seeds), set()
            while stack:
                x = stack.pop()
                if x in seen:
                    continue
                seen.add(x)
                if self.runs[x].status in ACTIVE:
                    found.append(x)
                stack.extend(c.id for c in self._children(x) if not (c.waiting and c.status == "scheduled"))
            for x in found:
                run = self.runs[x]
                if run.status == "running":
                    run.attempts[-1].status, run.attempts[-1].error = "cancelled", "Cancelled"
                run.owner = run.lease_until = None
                run.waiting = False
                run.error = "Cancelled"
                self._move(run, "cancelled")
            decided = self._decide(found)
            self.note(f"cancel: {'cascade' if len(found) > 1 else len(found)}")
            expected = set(found) | set(decided)
            assert set(got) == expected, (
                f"cancel({run_id}) cancelled {sorted(got)}, model expected {sorted(expected)}"
            )

        def do_retry(self, data: st.DataObject) -> None:
            run_id = self._pick_run(data, lambda r: r.status in ("failed", "cancelled"))
            self.step = f"retry {run_id}"
            got = self._run(self.store.retry_run(run_id))
            run = self.runs[run_id]
            expected = run.status in ("failed", "cancelled")
            assert got == expected, f"retry({run_id}) of a {run.status} run returned {got}"
            self.note(f"retry: {got}")
            if expected:
                run.max_attempts = max(run.max_attempts, run.attempt + 1)
                run.due, run.error, run.result, run.waiting = self.now, None, None, False
                self._move(run, "pending")

        def do_rerun(self, data: st.DataObject) -> None:
            run_id = data.draw(st.sampled_from(sorted(self.runs)), label="run")
            self.step = f"rerun {run_id}"
            before = self._run(self._full(run_id))
            new = self._run(self.w.app.async_client.rerun(run_id))
            after = self._run(self._full(run_id))
            assert before == after, f"rerun changed the old run {run_id}:\n{before}\n{after}"
            old = self.runs[run_id]
            assert new.id not in self.runs and new.id > run_id
            assert (new.job, new.args, new.queue, new.max_attempts) == (
                old.job,
                old.args,
                self.queue,
                old.max_attempts,
            )
            assert new.status == "pending" and new.attempt == 0 and new.parent_run_id is None
            self.runs[new.id] = MRun(
                new.id, old.job, dict(old.args), "pending", old.max_attempts, new.id, due=self.now
            )

        async def _full(self, run_id: int) -> tuple[Any, ...]:
            return (
                await self.store.get_run(run_id),
                await self.store.attempts(run_id),
                await self.store.events(run_id),
            )

        # -- actions: workers ---------------------------------------------------------------------------------------

        def do_claim(self, data: st.DataObject) -> None:
            name, limit = data.draw(CLAIMS_ST, label="worker, limit")
            w = self.workers[name]
            self.step = f"claim {w.id} limit={limit}"
            claimed = self._run(
                self.store.claim(w.id, queues=[self.queue], jobs=JOBS, limit=limit, lease_timeout=LEASE)
            )
            self._claim_model(w, claimed, limit)

        def do_heartbeat(self, data: st.DataObject) -> None:
            w = self._pick_worker(data)
            self.step = f"heartbeat {w.id}"
            leases = [Lease(x.id, x.attempt) for x in w.leases]
            expected = {x.id for x in w.leases if self._lease_held(w, x)}
            held = self._run(self.store.held_leases(w.id, leases)) if leases else set()
            assert held == expected, f"held_leases {sorted(held)}, model {sorted(expected)}"
            got = self.store.heartbeat_blocking(w.id, leases, LEASE)
            assert got == expected, f"heartbeat kept {sorted(got)}, model {sorted(expected)}"
            for run_id in expected:
                self.runs[run_id].lease_until = self.now + LEASE
            w.leases = [x for x in w.leases if x.id in expected]  # the worker stops what it lost

        def do_complete(self, data: st.DataObject) -> None:
            w, lease = self._pick_lease(data)
            and_claim = data.draw(st.sampled_from([0, 0, 1, 2]), label="and claim")
            self.step = f"complete run {lease.id} attempt {lease.attempt} by {w.id}"
            finish = Finish(lease.id, lease.attempt, "succeeded", result={"k": lease.args["k"]})
            self._finish(w, finish, and_claim)

        def do_fail(self, data: st.DataObject) -> None:
            w, lease = self._pick_lease(data)
            kind, and_claim = data.draw(FAILS_ST, label="failure, and claim")
            jitter_seed = data.draw(st.integers(0, 2**32 - 1), label="jitter seed")
            self.step = f"fail ({kind}) run {lease.id} attempt {lease.attempt} by {w.id}"
            policy = POLICIES[lease.job]
            exc = FAILURES[kind]()
            delay = policy.next_delay(exc, lease.attempt, lease.max_attempts, random.Random(jitter_seed))
            # The policy, restated: retryable unless NonRetryable or outside `on` (timeouts always are).
            retryable = kind == "timeout" or (kind != "non_retryable" and isinstance(exc, policy.on))
            if not retryable or lease.attempt >= lease.max_attempts:
                assert delay is None, f"{kind} on attempt {lease.attempt}/{lease.max_attempts}: delay {delay}"
                finish = Finish(lease.id, lease.attempt, "failed", error=_error(exc))
            else:
                assert delay is not None, f"{kind} on attempt {lease.attempt}/{lease.max_attempts}: no retry"
                base = min(policy.backoff * 2 ** (lease.attempt - 1), policy.max_delay)
                low = base / 2 if policy.jitter else base
                assert low <= delay <= base, f"attempt {lease.attempt}: delay {delay} outside [{low}, {base}]"
                finish = Finish(lease.id, lease.attempt, "retrying", error=_error(exc), retry_delay=delay)
            waiting = [c for c in self._children(lease.id) if c.waiting]
            self._finish(w, finish, and_claim)
            run = self.runs[lease.id]
            if finish.outcome == "retrying" and run.status == "retrying":
                self._check_due(run.job)
            if waiting and run.status in ("retrying", "failed"):
                # Spelled out (the invariant checks it too): a retrying parent keeps its continuations
                # waiting; a failed one cancels those that wait for its success (or its cancellation).
                now = {r.id: r.status.value for r in self._run(self.store.get_runs([c.id for c in waiting]))}
                for c in waiting:
                    if run.status == "retrying":
                        assert now[c.id] == "scheduled", f"parent retrying, continuation {c.id} {now[c.id]}"
                    elif c.when in ("succeeded", "cancelled"):
                        assert now[c.id] == "cancelled", f"parent failed, continuation {c.id} {now[c.id]}"
                    else:  # started: it may even have been claimed by the finish's claim
                        assert now[c.id] in ("pending", "scheduled", "running"), (
                            f"continuation {c.id} {now[c.id]}"
                        )

        def _check_due(self, job: str) -> None:
            """The store's next due time for ``job`` is the model's: the backoff landed where it should."""
            waiting = [
                r.due
                for r in self.runs.values()
                if r.job == job and r.status in ("scheduled", "retrying") and r.due is not None
            ]
            got = self._run(self.store.next_due_at(queues=[self.queue], jobs=[job]))
            want = min(waiting, default=None)
            assert (got is None) == (want is None), f"next_due_at {got}, model {want}"
            if got is not None and want is not None:
                assert abs(got - want) < 1e-3, f"next_due_at {got}, model {want}"

        def _finish(self, w: MWorker, finish: Finish, and_claim: int) -> None:
            if and_claim:
                done, claimed = self._run(
                    self.store.finish_and_claim(
                        [finish],
                        worker_id=w.id,
                        queues=[self.queue],
                        jobs=JOBS,
                        limit=and_claim,
                        lease_timeout=LEASE,
                    )
                )
            else:
                done, claimed = self._run(self.store.finish_attempts([finish], worker_id=w.id)), []
            self._finish_model(w, finish, done == [True])
            if and_claim:
                self._claim_model(w, claimed, and_claim)

        def do_crash(self, data: st.DataObject) -> None:
            """kill -9: the leases stay in the store until they expire and the reaper takes them."""
            w = self._pick_worker(data)
            self.step = f"crash {w.id}"
            self._restart(w)

        def do_release(self, data: st.DataObject) -> None:
            """SIGTERM: unfinished runs go back to pending without consuming an attempt; then the process exits."""
            w = self._pick_worker(data)
            self.step = f"release {w.id}"
            leases = [Lease(x.id, x.attempt) for x in w.leases]
            got = self._run(self.store.release_runs(leases, worker_id=w.id)) if leases else []
            expected = [x.id for x in w.leases if self._lease_held(w, x, expiry_fences=False)]
            assert sorted(got) == sorted(expected), f"released {got}, model {expected}"
            self.note(f"release: {'some' if expected else 'none'}")
            for run_id in expected:
                run = self.runs[run_id]
                run.attempts.pop()
                run.owner = run.lease_until = None
                self._move(run, "pending")
            self._restart(w)

        def do_advance(self, data: st.DataObject) -> None:
            seconds = data.draw(ADVANCES_ST, label="seconds")
            self.step = f"advance {seconds}"
            self.w.clock.advance(seconds)
            self._nudge()

        def do_reap(self, data: st.DataObject) -> None:
            self.step = "reap"
            got = self._run(self.store.reap_expired_leases())
            expired = sorted(
                r.id
                for r in self._active()
                if r.status == "running" and r.lease_until is not None and r.lease_until < self.now
            )
            assert sorted(got) == expired, f"reaped {sorted(got)}, model expected {expired}"
            self.note(f"reap: {'some' if expired else 'none'}")
            ended = []
            for run_id in expired:
                run = self.runs[run_id]
                run.attempts[-1].status, run.attempts[-1].error = "failed", "WorkerLost"
                run.owner = run.lease_until = None
                if run.attempt < run.max_attempts:
                    self._move(run, "pending")
                else:
                    run.error = "WorkerLost"
                    self._move(run, "failed")
                    ended.append(run_id)
            self._decide(ended)

        def do_expire(self, data: st.DataObject) -> None:
            self.step = "expire"
            got = self._run(self.store.expire_runs())
            late = sorted(
                r.id
                for r in self._active()
                if r.status != "running" and r.not_after is not None and r.not_after <= self.now
            )
            assert sorted(got) == late, f"expired {sorted(got)}, model expected {late}"
            for run_id in late:
                run = self.runs[run_id]
                run.error, run.waiting = "Expired", False
                self._move(run, "cancelled")
            self._decide(late)

        # -- invariants ---------------------------------------------------------------------------------------------

        @invariant()
        def store_matches_model(self) -> None:
            """Every run's record is the model's; a run the step did not move is exactly as it was. (Attempt
            rows and status events are compared at the end of the example: events are append-only, so every
            transition of every step is still there, and each names the step that the model expected it of.)"""
            if self.action:
                self.note(f"step {self.action}")
            if not self.runs or self.action in OFFLINE:  # no store call, nothing to compare
                self.broken = False
                return
            got = {r.id: r for r in self._run(self.store.get_runs(sorted(self.runs)))}
            assert set(got) == set(self.runs), f"runs {sorted(got)} vs model {sorted(self.runs)}"
            for run_id, model in self.runs.items():
                run = got[run_id]
                previous = self.snapshots.get(run_id)
                where = f"after `{self.step}`: run {run_id}"
                if previous is not None and run_id not in self.touched:
                    assert run == previous, f"{where} changed without a cause:\n{previous}\n{run}"
                    continue
                if previous is not None:
                    if previous.status.is_terminal and run.status != previous.status:
                        assert run.status == "pending" and self.step == f"retry {run_id}", (
                            f"{where}: terminal {previous.status} became {run.status}, not by retry"
                        )
                    assert run.attempt >= previous.attempt or (
                        self.step.startswith("release") and run.attempt == previous.attempt - 1
                    ), f"{where}: attempt went from {previous.attempt} to {run.attempt}"
                self._compare(where, model, run)
                self.snapshots[run_id] = run
            self.touched.clear()
            self.broken = False

        def _compare(self, where: str, model: MRun, run: Run) -> None:
            assert run.status == model.status, f"{where} is {run.status}, model says {model.status}"
            assert run.attempt == model.attempt, f"{where} attempt {run.attempt}, model {model.attempt}"
            assert run.max_attempts == model.max_attempts, f"{where} max_attempts {run.max_attempts}"
            assert (run.parent_run_id, run.root_run_id) == (model.parent, model.root), where
            worker = model.attempts[-1].worker if model.attempts else None
            assert run.worker_id == worker, f"{where} worker {run.worker_id}, model {worker}"
            assert (run.finished_at is not None) == (model.status in TERMINAL), f"{where} finished_at"
            if model.status == "succeeded":
                assert run.result == model.result and run.error is None, f"{where}: {run.result} {run.error}"
            if model.status in ("failed", "cancelled"):
                assert run.error is not None and run.error.type == model.error, f"{where} error {run.error}"
            if model.waiting:
                parent = self.runs[model.parent] if model.parent is not None else None
                if parent is not None and parent.status == "retrying":
                    assert run.status == "scheduled", f"{where}: parent retrying, continuation {run.status}"

        async def _histories(self) -> dict[int, tuple[Any, Any]]:
            ids = sorted(self.runs)
            got = await asyncio.gather(
                *(asyncio.gather(self.store.attempts(run_id), self.store.events(run_id)) for run_id in ids)
            )
            return dict(zip(ids, got, strict=True))

        def _check_history(self, model: MRun, attempts: list[Any], events: list[Any]) -> None:
            """The run's attempt rows and status events are the model's; every transition is legal (§2)."""
            where = f"run {model.id}"
            got = [
                (a.number, a.status.value, a.error.type if a.error else None, a.worker_id) for a in attempts
            ]
            want = [(i + 1, a.status, a.error, a.worker) for i, a in enumerate(model.attempts)]
            assert got == want, f"{where} attempts\n{got}\nmodel\n{want}"
            changes: list[tuple[str, str]] = []
            last_id, status = 0, None
            for event in events:
                assert event.id > last_id, f"{where}: event id {event.id} after {last_id}"
                last_id = event.id
                assert event.kind == "status", f"{where}: unexpected {event.kind} event {event.data}"
                change = (event.data["from"], event.data["to"])
                assert change in LEGAL, f"{where}: illegal transition {change} (after {changes})"
                assert status is None or change[0] == status, f"{where}: {change} after {changes}"
                changes.append(change)
                status = change[1]
            if changes != model.events:
                i = next(
                    (
                        i
                        for i, pair in enumerate(zip(changes, model.events, strict=False))
                        if pair[0] != pair[1]
                    ),
                    min(len(changes), len(model.events)),
                )
                step = model.event_steps[i] if i < len(model.event_steps) else "(no step expected one)"
                raise AssertionError(
                    f"{where} status events {changes}\nmodel {model.events}\nfirst difference at #{i + 1}, "
                    f"which the model expected of `{step}`"
                )

        def teardown(self) -> None:
            """Check every run's history, then leave only terminal runs behind, so that the next example's
            global verbs (claims promote, the reaper and expiry act on every queue) never see these."""
            if not self.broken and self.runs:
                for run_id, history in self._run(self._histories()).items():
                    self._check_history(self.runs[run_id], *history)
            for _ in range(10):
                active = [
                    r.id
                    for r in self._run(self.store.get_runs(sorted(self.runs)))
                    if not r.status.is_terminal
                ]
                if not active:
                    return
                self._run(self.store.cancel_runs(active, reason="end of example"))
            raise AssertionError("could not end the example's runs")

    return StoreModel


@functools.cache
def _choices(ready: tuple[str, ...]) -> st.SearchStrategy[str]:
    """The weighted choice among the actions that can act now (one strategy per such set, built once)."""
    weights = {name: weight for name, weight, _ in ACTIONS}
    return st.sampled_from([name for name in ready for _ in range(weights[name])])


OFFLINE = frozenset({"advance", "crash"})  # actions that call no store verb (the store never acts by itself)


def _has_runs(m: Any) -> bool:
    return bool(m.runs)


def _holds(m: Any) -> bool:
    return any(w.leases for w in m.workers.values())


ACTIONS: list[tuple[str, int, Callable[[Any], bool]]] = [
    # (action, weight, when it can act). Hypothesis draws the first choice far more often than its weight (its
    # "simplest" value), so the first is the one a program can never have too many of.
    ("claim", 12, lambda m: m._claimable()),
    ("trigger", 12, lambda m: True),
    ("continue_with", 6, _has_runs),
    ("heartbeat", 6, _holds),
    ("complete", 10, _holds),
    ("fail", 10, _holds),
    ("crash", 4, _holds),
    ("release", 4, _holds),
    ("advance", 12, lambda m: True),
    ("reap", 7, lambda m: any(r.status == "running" for r in m.runs.values())),
    ("expire", 3, lambda m: any(r.not_after is not None and r.status in ACTIVE for r in m.runs.values())),
    ("cancel", 4, _has_runs),
    ("retry", 4, lambda m: any(r.status in TERMINAL for r in m.runs.values())),
    ("rerun", 2, _has_runs),
]


def _error(exc: BaseException) -> Any:
    from runlane.models import ErrorInfo

    return ErrorInfo(type(exc).__name__, str(exc))


# Smoke: a minute to spare for a failure's shrinking. Full: 10,000 examples of 50 steps take hours.
@pytest.mark.timeout(4 * 3600 if FULL else 300)
def test_state_machine_model(
    backend_url: str, seed: int, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = "postgres" if backend_url.startswith("postgres") else "sqlite"
    examples = FULL_EXAMPLES if FULL else SMOKE_EXAMPLES[backend]
    steps = FULL_STEPS if FULL else SMOKE_STEPS
    if not FULL:  # documented as monkeypatchable: a failure must be reported well within the test's timeout
        monkeypatch.setattr(engine, "MAX_SHRINKING_SECONDS", SMOKE_SHRINK_SECONDS)
    forced = request.config.getoption("hypothesis_seed", None)
    replay = f"--hypothesis-seed={forced}" if forced is not None else f"CHAOS_SEED={seed}"
    print(f"T17 {backend}: {examples} examples of up to {steps} steps; replay with {replay}")
    clock = FakeClock()
    app = make_app(backend_url, clock)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(app.migrate())
        store = loop.run_until_complete(app.open_store())
        world = World(app, store, clock, loop)
        machine = make_machine(world)

        def factory() -> RuleBasedStateMachine:
            return machine()

        if forced is None:
            factory = hypothesis_seed(seed)(factory)
        config = settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )
        started, cpu = time.monotonic(), time.process_time()
        try:
            run_state_machine_as_test(factory, settings=config)
        except BaseException as exc:
            used = forced if forced is not None else seed
            exc.add_note(f"T17 {backend}: replay with {replay} (the Hypothesis seed, as @seed({used}) would)")
            raise
        elapsed, cpu = time.monotonic() - started, time.process_time() - cpu
        stats = world.stats
        total = sum(n for key, n in stats.items() if key.startswith("step "))
        print(
            f"T17 {backend}: {elapsed:.1f} s ({cpu:.1f} s CPU), {total} steps; {dict(sorted(stats.items()))}"
        )
        record_figures(
            "state_machine_model",
            backend,
            seed,
            examples=examples,
            max_steps=steps,
            steps=total,
            violations=0,
            finishes_fenced_off=sum(n for key, n in stats.items() if key.endswith("fenced off")),
            reaps_with_effect=stats["reap: some"],
            seconds=round(elapsed, 1),
        )
    finally:
        loop.run_until_complete(store.close() if "store" in locals() else asyncio.sleep(0))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
