"""The worker: a claim loop plus supervised side tasks (heartbeat thread, maintenance, cancel watch,
event flushing). Runs are claimed in batches sized to free slots and finished through a batcher, so a
busy worker pays one store round trip for many runs in each direction."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import random
import secrets
import signal
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from runlane.context import EventBuffer, JobContext
from runlane.errors import RunlaneError, StoreUnavailable
from runlane.models import Run, RunFilter, RunStatus
from runlane.scheduler.schedules import Scheduler, sync_app
from runlane.store import Finish, Lease, Store
from runlane.worker.batcher import Batcher
from runlane.worker.executor import Body, execute_attempt, lower_thread_priority
from runlane.worker.heartbeat import Heartbeat
from runlane.worker.job_processes import JobProcesses
from runlane.worker.signals import handle_stop_signals

if TYPE_CHECKING:
    from runlane.app import Runlane

log = logging.getLogger("runlane.worker")
T = TypeVar("T")

_PRUNE_EVERY = 300.0
_PREFETCH_ROUND_TRIPS = 3
"""Round trips' worth of starts claimed ahead. A slot freed just after a flight left waits for that flight
to return and for the next to bring its replacement (two round trips), and flight times vary. With one,
w5 (2,000 runs of 50 ms, concurrency 50) lost a flight per run to those waits: 2.15-2.24 s against
2.11-2.12 with two and 2.108-2.109 with three (in-process, PostgreSQL, 3 runs each)."""
_PREFETCH_FACTOR = 8
"""Default bound on runs claimed ahead, per slot. Only runs far shorter than a claim round trip reach it. A
flight cost PostgreSQL ~1.7 ms whatever it carried (~1.1 ms since flights are one round trip), plus ~50 us per
run (``bench.drain_costs --replay``), so a drain of no-op runs sped up by 30 % from 4 (Celery's prefetch
multiplier) to 8; 16 added little more."""
_EMA = 0.2  # weight of the newest sample in the body and claim durations that size the prefetch


@dataclass(eq=False)
class ActiveAttempt:
    run: Run
    lease: Lease
    ctx: JobContext
    buffer: EventBuffer
    task: asyncio.Task[None] | None = None  # None while claimed ahead and waiting for a slot
    body: Body | None = None
    leased_at: float = 0.0  # monotonic time the claim that granted the lease was sent
    lost: bool = False  # the store no longer gives this attempt the run: write nothing more
    released: bool = False  # handed back at shutdown


class Worker:
    """``await app.worker(...).run()`` or ``async with app.worker(...)`` (runs in the background)."""

    def __init__(
        self,
        app: Runlane,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 16,
        burst: bool = False,
        worker_id: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("worker concurrency must be at least 1")
        self.app = app
        self.settings = app.settings
        self.queues = list(queues) if queues else app.queues
        self.concurrency = concurrency
        self.burst = burst
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.processed = 0
        self._active: dict[int, ActiveAttempt] = {}
        self._finishing: dict[int, ActiveAttempt] = {}  # slot freed, end being written: can still be lost
        self._late: set[asyncio.Task[Any]] = set()  # releases of runs whose claim reply came too late
        self._claim_lock = asyncio.Lock()  # one claim of this worker in flight at a time: see _claim
        self._orphans_suspected = False  # a claim failed: it may have committed and lost only its reply
        self._unrecorded: set[int] = set()  # runs executed here whose end could not be written
        self._reserved = 0  # slots promised to a claim in flight (the claim loop's or the finisher's)
        self._running = 0  # attempts whose body started and whose slot is not free yet
        self._waiting: deque[ActiveAttempt] = deque()  # claimed ahead (prefetched), not started yet
        self._body_time: float | None = None  # moving average of a body's duration, seconds
        self._claim_time: float | None = None  # moving average of a claim round trip, seconds
        self._limited = False  # limits apply to some job or queue of this worker: no prefetch
        self._found_empty: int | None = (
            None  # the `work` generation at which a finisher's claim found nothing
        )
        self._stopping = False
        self._hard_stop = False
        self._kick: asyncio.Event | None = None
        self._flush_kick: asyncio.Event | None = None
        self._flush_lock: asyncio.Lock | None = None
        self._crash: BaseException | None = None
        self._store: Store | None = None
        self._heartbeat: Heartbeat | None = None
        self._finisher: Batcher[Finish, bool] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._processes: JobProcesses | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._background: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Worker {self.id} queues={self.queues} concurrency={self.concurrency}>"

    @property
    def job_names(self) -> list[str]:
        return sorted(name for name, job in self.app.jobs.items() if job.queue in self.queues)

    @property
    def active_run_ids(self) -> list[int]:
        """Runs leased to this worker: running, or claimed ahead and waiting for a slot."""
        return list(self._active)

    @property
    def stopped_at_once(self) -> bool:
        """Stopped by a second signal (or ``stop(graceful=False)``): job threads may still be running."""
        return self._hard_stop

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def stop(self, *, graceful: bool = True) -> None:
        """Stop claiming and drain (graceful), or stop at once leaving leases to expire."""
        self._stopping = True
        if not graceful:
            self._hard_stop = True
            for active in self._active.values():
                active.ctx._cancel()  # sync jobs cannot be interrupted, but cooperative ones stop now
                if active.task is not None:
                    active.task.cancel()
        if self._kick is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._kick.set)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stopping:
            log.warning(
                "second %s: stopping at once; unfinished runs return after their lease expires", sig.name
            )
            self.stop(graceful=False)
        else:
            log.info(
                "%s: draining (up to %.0f s), then releasing unfinished runs",
                sig.name,
                self.settings.shutdown_timeout,
            )
            self.stop()

    async def run(self, *, handle_signals: bool = False) -> None:
        """Run until stopped (``burst``: until nothing is due and nothing runs)."""
        if not self.app.jobs:
            raise RunlaneError("the app defines no jobs: a worker needs at least one @app.job")
        if not self.job_names:
            raise RunlaneError(f"no job of this app uses the queues {self.queues}")
        self._loop = asyncio.get_running_loop()
        self._kick = asyncio.Event()
        self._flush_kick = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        store = self._store = await self.app.open_store()
        # An idle worker must hear of new work from its first wait on. Not of changes: every claim and finish
        # notifies those, and a worker's own jobs rarely wait for another run (their first wait listens).
        await store.listen(("work", "cancel"))
        self._limited = self._declares_limits()
        await store.register_jobs([job.info() for job in self.app.jobs.values()])
        await sync_app(self.app, store, self.id)  # limits and declared schedules, before the first claim
        await store.register_worker(
            self.id,
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "queues": self.queues,
                "jobs": self.job_names,
                "concurrency": self.concurrency,
            },
        )
        self._finisher = Batcher(lambda batch: self._flush_finishes(store, batch))
        self.scheduler = Scheduler(store, poll_interval=self.settings.poll_interval)
        self._pool = ThreadPoolExecutor(
            max_workers=self.concurrency,
            thread_name_prefix=f"runlane-job-{self.id}",
            initializer=lower_thread_priority,
            initargs=(self.settings.job_thread_nice,),
        )
        processes = None
        if any(self.app.jobs[name].options.executor == "process" for name in self.job_names):
            processes = self._processes = JobProcesses(
                self.app,
                processes=self.settings.job_processes or self.concurrency,
                flags=self.concurrency * 4,
                nice=self.settings.job_process_nice,
                lease_timeout=self.settings.lease_timeout,
                renewed_at=lambda run_id: heartbeat.renewed_at(run_id),
            )
        heartbeat = self._heartbeat = Heartbeat(
            store,
            self.id,
            lease_timeout=self.settings.lease_timeout,
            interval=self.settings.effective_heartbeat_interval,
            on_lost=self._lost_from_thread,
            on_renewed=processes.renewed if processes is not None else None,
        )
        self._heartbeat.start()
        await self._housekeep(store)  # runs orphaned while no worker was up come back before we claim
        side_tasks = [
            asyncio.create_task(self._supervise(self._maintenance(store)), name="runlane-maintenance"),
            asyncio.create_task(
                self._supervise(self._watch_cancellations(store)), name="runlane-cancel-watch"
            ),
            asyncio.create_task(
                self._supervise(self._flush_events_loop(store)), name="runlane-event-flusher"
            ),
            asyncio.create_task(self._supervise(self.scheduler.run()), name="runlane-scheduler"),
        ]
        self._started.set()
        log.info(
            "worker %s started: queues=%s jobs=%s concurrency=%d",
            self.id,
            self.queues,
            self.job_names,
            self.concurrency,
        )
        try:
            if handle_signals:
                with handle_stop_signals(self._on_signal):
                    await self._claim_loop(store)
                    await self._drain(store)
            else:
                await self._claim_loop(store)
                await self._drain(store)
        finally:
            late = list(self._late)  # best-effort hand-backs: the reaper requeues what they leave
            for task in side_tasks + late:
                task.cancel()
            await asyncio.gather(*side_tasks, *late, return_exceptions=True)
            self._heartbeat.stop()
            self._pool.shutdown(wait=False, cancel_futures=True)
            if self._processes is not None:
                await asyncio.to_thread(self._processes.close)
            try:
                await store.deregister_worker(self.id)
            except Exception as exc:  # the store may be the reason we are stopping
                log.warning("could not deregister worker %s: %s", self.id, exc)
            log.info("worker %s stopped after %d runs", self.id, self.processed)
        if self._crash is not None:
            raise self._crash

    async def __aenter__(self) -> Worker:
        self._background = asyncio.create_task(self.run(), name=f"runlane-worker-{self.id}")
        started = asyncio.create_task(self._started.wait())
        await asyncio.wait({self._background, started}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if self._background.done():
            self._background.result()  # raises why it could not start
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._background is not None:
            self.stop()
            await self._background

    async def _supervise(self, coro: Any) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.exception("worker %s: a side task died; stopping", self.id)
            self._crash = exc
            self.stop()

    # -- claiming -------------------------------------------------------------------------------------------------

    async def _claim_loop(self, store: Store) -> None:
        assert self._kick is not None
        notifier = store.notifier
        jobs, queues = self.job_names, self.queues
        lease_timeout, poll = self.settings.lease_timeout, self.settings.poll_interval
        assert self._finisher is not None
        finisher = self._finisher
        while not self._stopping:
            free = self._free_slots()
            if free <= 0 or finisher.busy:
                # A finish being written claims the slots freed meanwhile in the same round trip; the
                # finisher kicks this loop when it is done.
                self._kick.clear()
                if (self._free_slots() <= 0 or finisher.busy) and not self._stopping:
                    await self._kick.wait()
                continue
            self._kick.clear()
            runs: list[Run] = []
            if self._found_empty is not None:
                # The finisher's claim just found nothing: claiming again before new work is signalled
                # would find nothing either, so wait for a signal newer than that claim.
                generation, self._found_empty = self._found_empty, None
            else:
                generation = notifier.generation("work")
                self._reserved += free
                try:
                    claim = functools.partial(
                        store.claim,
                        self.id,
                        queues=queues,
                        jobs=jobs,
                        limit=free,
                        lease_timeout=lease_timeout,
                    )
                    runs, sent = await self._claim(store, claim)
                except StoreUnavailable as exc:
                    log.warning("worker %s: claim failed, retrying in %.1f s: %s", self.id, poll, exc)
                    await notifier.wait("work", generation, poll, event=self._kick)
                    continue
                finally:
                    self._reserved -= free
                for run in runs:
                    self._start(run, sent)
            if len(runs) == free:
                await asyncio.sleep(0)  # let the attempts start before claiming more
                continue
            timeout = poll
            if not self._active or self.burst:
                next_due = await store.next_due_at(queues=queues, jobs=jobs)
                if next_due is not None:
                    timeout = min(timeout, max(next_due - store.now(), 0.0))
                if self.burst and not runs and not self._active and (next_due is None or timeout >= poll):
                    assert self._finisher is not None
                    if self._finisher.busy:  # an unwritten end may be a retry that is due at once
                        await self._finisher.drain()
                        continue
                    if notifier.generation("work") != generation:  # e.g. an end that started a continuation
                        continue
                    if await self._housekeep(store):  # a dead worker's runs count as work to finish
                        continue
                    if await self._held_by_limits(store):  # waiting for a slot or a rate window is not idle
                        await notifier.wait("work", generation, min(poll, 0.1), event=self._kick)
                        continue
                    return
            if timeout > 0:
                await notifier.wait("work", generation, timeout, event=self._kick)

    def _free_slots(self) -> int:
        return self.concurrency + self._prefetch() - len(self._active) - self._reserved

    def _prefetch(self) -> int:
        """How many runs to claim beyond the free slots: about as many as this worker starts during
        ``_PREFETCH_ROUND_TRIPS`` claim round trips, so that it executes runs while claims are at the store
        instead of waiting for them (a no-op drain: the whole ``prefetch`` setting), and none when bodies
        outlast a round trip by far (long jobs stay claimable by idle workers). A run claimed ahead waits
        a few round trips at most for its slot; it is leased and heartbeated like a running one, and handed
        back unstarted at shutdown. None under limits: a run claimed ahead would hold a limit slot while it
        waits for one of ours."""
        if self._limited:
            return 0
        limit = (
            _PREFETCH_FACTOR * self.concurrency if self.settings.prefetch is None else self.settings.prefetch
        )
        if limit <= 0 or self._body_time is None or self._claim_time is None:
            return 0
        ahead = _PREFETCH_ROUND_TRIPS * self.concurrency * self._claim_time / max(self._body_time, 1e-6)
        return min(limit, int(ahead))

    async def _flush_finishes(self, store: Store, batch: Sequence[Finish]) -> Sequence[bool]:
        """Write ends of attempts and, in the same round trip, claim runs for the slots they freed."""
        assert self._kick is not None
        limit = 0 if self._stopping else max(self._free_slots(), 0)
        if limit == 0:
            try:
                return await store.finish_attempts(batch, worker_id=self.id)
            finally:
                self._kick.set()  # the claim loop waits while a finish is in flight
        self._reserved += limit
        generation = store.notifier.generation("work")
        self._found_empty = None
        try:
            (done, runs), sent = await self._claim(
                store,
                lambda: store.finish_and_claim(
                    batch,
                    worker_id=self.id,
                    queues=self.queues,
                    jobs=self.job_names,
                    limit=limit,
                    lease_timeout=self.settings.lease_timeout,
                ),
            )
        finally:
            self._reserved -= limit
            self._kick.set()  # the claim loop waits while a finish is in flight
        if len(runs) < limit:
            self._found_empty = generation
        for run in runs:
            self._start(run, sent)
        return done

    async def _claim(self, store: Store, claim: Callable[[], Awaitable[T]]) -> tuple[T, float]:
        """Send one claim, alone, and say when it was sent (its leases run from then)."""
        async with self._claim_lock:
            if self._orphans_suspected:
                await self._release_orphans(store)
            sent = time.monotonic()
            try:
                result = await claim()
            except StoreUnavailable:
                self._orphans_suspected = True
                raise
            self._claim_time = _average(self._claim_time, time.monotonic() - sent)
            return result, sent

    async def _release_orphans(self, store: Store) -> None:
        """A claim that failed may have committed and lost only its reply (a connection reset): its runs are
        leased to this worker, which never heard of them. With no claim of ours in flight (``_claim_lock``),
        every running run leased to us that we do not run is such an orphan: hand it back at once, without
        using an attempt, rather than leave it to the reaper after the lease."""
        known = set(self._active) | set(self._finishing) | self._unrecorded
        orphans: list[Lease] = []
        before: int | None = None
        while True:
            page = await store.list_runs(RunFilter(status=RunStatus.RUNNING), limit=500, before_id=before)
            orphans += [Lease(r.id, r.attempt) for r in page if r.worker_id == self.id and r.id not in known]
            if len(page) < 500:
                break
            before = page[-1].id
        if orphans:
            released = await store.release_runs(orphans, worker_id=self.id)
            log.warning("worker %s: handed back %d runs claimed by a lost reply", self.id, len(released))
        self._orphans_suspected = False

    def _declares_limits(self) -> bool:
        """Whether a concurrency or rate limit applies to some job or queue of this worker."""
        app = self.app
        return any(app.jobs[j].options.limits.limited for j in self.job_names) or any(
            q in app.queue_limits for q in self.queues
        )

    async def _held_by_limits(self, store: Store) -> bool:
        """Burst mode: are runs of this worker's unpaused queues pending while limits hold them back?"""
        if not self._declares_limits():
            return False
        stats = await store.queue_stats()
        return any(q.pending and not q.paused for q in stats if q.name in self.queues)

    def _start(self, run: Run, leased_at: float) -> None:
        """Start an attempt whose claim was sent at ``leased_at`` (monotonic): its lease runs from then."""
        assert self._heartbeat is not None and self._flush_kick is not None and self._loop is not None
        settings = self.settings
        late = time.monotonic() - leased_at
        if late >= settings.lease_timeout - settings.effective_heartbeat_interval:
            # The reply was held up (a partition) for about a lease: the run may have been reclaimed and be
            # running elsewhere already, so starting it could execute it twice. Hand it back instead (fenced:
            # a no-op if it was reclaimed); if that fails too, the reaper requeues it.
            log.warning("run %s: claimed %.1f s ago, too close to its lease to start it", run.id, late)
            task = asyncio.create_task(self._release_late(run), name=f"runlane-late-{run.id}")
            self._late.add(task)
            task.add_done_callback(self._late.discard)
            return
        job = self.app.jobs[run.job]
        buffer = EventBuffer(on_output=self._output_pending)
        active = ActiveAttempt(
            run,
            Lease(run.id, run.attempt),
            JobContext(self.app, run, buffer=buffer),
            buffer,
            leased_at=leased_at,
        )
        self._active[run.id] = active
        self._heartbeat.add(active.lease, renewed_at=leased_at)
        if self._running < self.concurrency:
            self._begin(active, job)
        else:
            self._waiting.append(active)

    def _begin(self, active: ActiveAttempt, job: Any) -> None:
        self._running += 1
        active.task = asyncio.create_task(self._execute(active, job), name=f"runlane-run-{active.run.id}")

    def _begin_waiting(self) -> None:
        """Start runs claimed ahead, oldest first, while slots are free (not once stopping: they go back)."""
        while self._waiting and self._running < self.concurrency and not self._stopping:
            active = self._waiting.popleft()
            if active.task is None and self._active.get(active.run.id) is active:
                self._begin(active, self.app.jobs[active.run.job])

    async def _release_late(self, run: Run) -> None:
        assert self._store is not None
        try:
            await self._store.release_runs([Lease(run.id, run.attempt)], worker_id=self.id)
        except StoreUnavailable as exc:
            log.warning("run %s: could not hand back a late claim (the reaper will): %s", run.id, exc)

    def _output_pending(self) -> None:
        """Called from any thread when a job emits an output: stream consumers should not wait a flush tick."""
        if self._loop is not None and self._flush_kick is not None:
            self._loop.call_soon_threadsafe(self._flush_kick.set)

    async def _execute(self, active: ActiveAttempt, job: Any) -> None:
        assert self._finisher is not None and self._flush_lock is not None and self._pool is not None
        try:
            if not await self._still_leased(active):
                return
            began = time.monotonic()
            fresh = functools.partial(self._heartbeat.fresh, active.lease) if self._heartbeat else None
            outcome = await execute_attempt(job, active, self._pool, self._processes, fresh)
            self._body_time = _average(self._body_time, time.monotonic() - began)
            if outcome is None or active.lost or active.released:
                return
            async with self._flush_lock:  # events of an in-flight flush must land before the end
                events = tuple(active.buffer.drain())
            finish = dataclasses.replace(outcome, events=events) if events else outcome
            # Free the slot before the end is written, so that the next claim rides in the same store
            # round trip as this finish; the store fences the finish, so a late one can do no harm.
            self._finishing[active.run.id] = active
            self._free_slot(active)
            recorded = await self._record_finish(finish, active)
            if recorded is False:
                log.info(
                    "run %s attempt %s: result not recorded (cancelled or reclaimed meanwhile)",
                    active.run.id,
                    active.run.attempt,
                )
            elif recorded is None:
                self._unrecorded.add(active.run.id)  # ran, so not an orphan to hand back: the reaper's
            self.processed += 1
        finally:
            self._finishing.pop(active.run.id, None)
            self._free_slot(active)
            if self._heartbeat is not None:  # renewed until the end is written, even through an outage
                self._heartbeat.remove(active.lease)

    async def _record_finish(self, finish: Finish, active: ActiveAttempt) -> bool | None:
        """Write an attempt's end, retrying through a store outage for up to one lease period (the write is
        fenced, so repeating it is safe) or until the heartbeat gives the lease up. None if it could not be
        written: the lease then expires and the run is retried elsewhere — at-least-once, never lost."""
        assert self._finisher is not None
        deadline = time.monotonic() + self.settings.lease_timeout
        delay = 0.05
        while True:
            if active.lost:
                return False
            try:
                return await self._finisher.submit(finish)
            except StoreUnavailable as exc:
                if time.monotonic() + delay >= deadline:
                    log.error(
                        "run %s: could not record the end of attempt %s: %s",
                        finish.run_id,
                        finish.attempt,
                        exc,
                    )
                    return None
                log.warning("run %s: store unavailable (%s); retrying in %.2f s", finish.run_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _still_leased(self, active: ActiveAttempt) -> bool:
        """Bodies normally start within milliseconds of their claim. One that did not (the process was
        stopped or starved in between), or whose claim crossed a cancellation, asks the store first: its run
        may already be running elsewhere or be cancelled. Neither is the common case, so the hot path makes
        no extra round trip."""
        assert self._store is not None
        if active.lost:  # while it waited for a slot
            return False
        prompt = time.monotonic() - active.leased_at < self.settings.effective_heartbeat_interval
        if prompt and self._store.notifier.last_signalled("cancel") < active.leased_at:
            return True
        try:
            held = await self._store.held_leases(self.id, [active.lease])
        except StoreUnavailable:
            return not active.lost  # the heartbeat's self-fence decides once the store is back
        if active.run.id not in held:
            self._lose({active.run.id})
            return False
        return not active.lost

    def _free_slot(self, active: ActiveAttempt) -> None:
        if self._active.get(active.run.id) is not active:
            return
        del self._active[active.run.id]
        if active.task is not None:
            self._running -= 1
            self._begin_waiting()
        if self._kick is not None:
            self._kick.set()

    # -- losing runs ------------------------------------------------------------------------------------------------

    def _lost_from_thread(self, run_ids: set[int]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._lose, run_ids)

    def _lose(self, run_ids: set[int]) -> None:
        """The store says these attempts no longer own their runs (cancelled, reclaimed): stop them."""
        for run_id in run_ids:
            finishing = self._finishing.get(run_id)
            if finishing is not None:
                # Its body is done; it may be its own end that was just written. Either way: stop retrying.
                finishing.lost = True
                continue
            active = self._active.get(run_id)
            if active is None or active.lost:
                continue
            active.lost = True
            if active.task is None:  # claimed ahead, never started: nothing to stop or to write
                self._free_slot(active)
                if self._heartbeat is not None:
                    self._heartbeat.remove(active.lease)
                continue
            active.ctx._cancel()
            if active.body is not None and not active.body.done():
                active.body.cancel()
            log.info(
                "run %s attempt %s: lease lost (cancelled or reclaimed); stopping it",
                run_id,
                active.run.attempt,
            )

    async def _watch_cancellations(self, store: Store) -> None:
        notifier = store.notifier
        while True:
            generation = notifier.generation("cancel")
            leases = [a.lease for a in self._active.values() if not a.lost]
            if leases:
                try:
                    held = await store.held_leases(self.id, leases)
                except StoreUnavailable as exc:
                    log.warning("worker %s: cancellation check failed: %s", self.id, exc)
                else:
                    self._lose({lease.run_id for lease in leases} - held)
            await notifier.wait("cancel", generation, self.settings.poll_interval)

    # -- side tasks --------------------------------------------------------------------------------------------------

    async def _flush_events_loop(self, store: Store) -> None:
        assert self._flush_kick is not None
        interval = self.settings.progress_flush_interval
        while True:
            try:
                async with asyncio.timeout(interval):
                    await self._flush_kick.wait()
            except TimeoutError:
                pass
            self._flush_kick.clear()
            await self._flush_events(store)

    async def _flush_events(self, store: Store) -> None:
        assert self._flush_lock is not None
        async with self._flush_lock:
            drafts = [d for a in list(self._active.values()) if not a.lost for d in a.buffer.drain()]
            if not drafts:
                return
            try:
                refused = await store.append_events(drafts, worker_id=self.id)
            except StoreUnavailable as exc:
                log.warning("worker %s: could not write %d events: %s", self.id, len(drafts), exc)
                return
        if refused:
            self._lose(refused)

    async def _maintenance(self, store: Store) -> None:
        """Every worker reaps and expires; the store's conditional updates make concurrent reapers safe."""
        interval = self.settings.effective_reaper_interval
        retention = self.settings.retention
        last_prune = time.monotonic() - _PRUNE_EVERY * random.random()
        while True:
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))
            try:
                await self._housekeep(store)
                if retention is not None and time.monotonic() - last_prune >= _PRUNE_EVERY:
                    last_prune = time.monotonic()
                    await store.prune(store.now() - retention.total_seconds())
            except StoreUnavailable as exc:
                log.warning("worker %s: maintenance skipped: %s", self.id, exc)

    async def _housekeep(self, store: Store) -> int:
        """Reclaim runs of lost workers and expire runs past ``not_after``; how many runs changed."""
        reaped = await store.reap_expired_leases()
        if reaped:
            log.warning("reclaimed %d runs whose worker was lost: %s", len(reaped), reaped[:20])
        expired = await store.expire_runs()
        return len(reaped) + len(expired)

    # -- shutdown -------------------------------------------------------------------------------------------------------

    async def _release_waiting(self, store: Store) -> None:
        """Hand back at once the runs claimed ahead that never started: another worker can run them now."""
        waiting = [
            a for a in self._waiting if a.task is None and not a.lost and self._active.get(a.run.id) is a
        ]
        self._waiting.clear()
        if not waiting:
            return
        for active in waiting:
            active.released = True
        try:
            released = await store.release_runs([a.lease for a in waiting], worker_id=self.id)
            log.info("worker %s: handed back %d runs claimed ahead", self.id, len(released))
        except StoreUnavailable as exc:
            log.error(
                "worker %s: could not hand back runs claimed ahead (they return after lease expiry): %s",
                self.id,
                exc,
            )
        for active in waiting:
            self._free_slot(active)
            if self._heartbeat is not None:
                self._heartbeat.remove(active.lease)

    async def _drain(self, store: Store) -> None:
        """Let running attempts finish within ``shutdown_timeout``; hand the rest back without using an attempt."""
        assert self._finisher is not None
        if self._hard_stop:
            return
        await self._release_waiting(store)
        tasks = [a.task for a in self._active.values() if a.task is not None]
        if tasks:
            log.info(
                "worker %s: waiting up to %.1f s for %d running attempts",
                self.id,
                self.settings.shutdown_timeout,
                len(tasks),
            )
            await asyncio.wait(tasks, timeout=self.settings.shutdown_timeout)
        unfinished = [a for a in self._active.values() if not a.lost]
        if unfinished and not self._hard_stop:
            for active in unfinished:
                active.released = True
                active.ctx._cancel()
                if active.body is not None and not active.body.done():
                    active.body.cancel()
            try:
                released = await store.release_runs([a.lease for a in unfinished], worker_id=self.id)
                log.info("worker %s: released %d unfinished runs back to pending", self.id, len(released))
            except StoreUnavailable as exc:
                log.error(
                    "worker %s: could not release runs (they return after lease expiry): %s", self.id, exc
                )
            remaining = [a.task for a in unfinished if a.task is not None]
            if remaining:
                await asyncio.wait(remaining, timeout=1.0)
        await self._finisher.drain()
        await self._flush_events(store)


def _average(average: float | None, sample: float) -> float:
    return sample if average is None else average + _EMA * (sample - average)
