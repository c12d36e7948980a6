"""The store seam: domain verbs that every backend implements with its own SQL.

Policy (validation, retry decisions, limits parsing) stays above this line; only implementations know SQL.
Every state change a worker makes is compare-and-swap on ``(run id, attempt, lease owner)`` so that a stale
worker can never overwrite a run that was reclaimed, cancelled or released. Status changes, their events and
batch counters are written in one transaction.

Contract shared by all implementations (the store contract tests pin it):

* Times are epoch seconds (float) at this seam and measured by the store's own clock (``now()``), so that
  one database host decides what "due" and "expired" mean for every worker.
* A run's first status is the one it is created with (``scheduled`` when ``not_before`` is in the future,
  else ``pending``). Every later status change appends a ``status`` event whose data is
  ``{"from": old, "to": new, "attempt": n, "reason": str | None}``; event ids increase per run from 1.
* ``due_at`` (internal) is when a run becomes claimable: ``not_before`` or creation time, then the backoff
  time while ``retrying``. Claim order is priority (higher first), then due time, then id.
* Error values are :class:`ErrorInfo`; the reasons the store itself writes use these types:
  ``WorkerLost`` (lease expired), ``Expired`` (``not_after`` passed before start), ``Cancelled`` (by a user
  or by cascade; the message says which).
* Batch counters (``Batch.counts``, ``finish_seq``) follow every status change of a child in the same
  transaction, whichever verb made it: each schema keeps them with a trigger on the runs table (migration
  0002), so a new verb cannot forget them. A child that becomes terminal gets the batch's next ``finish_seq``;
  the batch row's lock orders these numbers by commit, so a reader can fetch finished children incrementally.
* Continuations (``NewRun.continue_when``) wait ``scheduled`` with no due time until their parent is terminal.
  Every transaction that makes runs terminal (finish, cancel, reap, expire) then decides the waiting
  continuations of those runs, recursively along chains: ``pending`` (or ``scheduled`` until ``not_before``)
  when the parent's status matches ``continue_when`` (``finished`` matches any), else ``cancelled``. An
  insert whose parent is already terminal decides at once. A cancel cascade does not descend into
  continuations still waiting on a run it cancels: the continuation rule decides them.
* Connection failures raise :class:`~runlane.errors.StoreUnavailable` with the driver error as ``__cause__``;
  an outdated schema raises :class:`~runlane.errors.SchemaOutdated`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from runlane.models import (
    ACTIVE_STATUSES,
    Attempt,
    Batch,
    ErrorInfo,
    Event,
    EventKind,
    JobInfo,
    Run,
    RunFilter,
    RunStatus,
    to_datetime,
)
from runlane.store.flow import SchedulesAndLimits
from runlane.store.notify import TOPICS, Notifier, Topic

ConflictPolicy = Literal["raise", "return_existing"]
FinishOutcome = Literal["succeeded", "failed", "retrying"]
ContinueWhen = Literal["succeeded", "failed", "cancelled", "finished"]
CONTINUE_WHEN: tuple[ContinueWhen, ...] = ("succeeded", "failed", "cancelled", "finished")

WORKER_LOST = "WorkerLost"
EXPIRED = "Expired"
CANCELLED = "Cancelled"


@dataclass(frozen=True, slots=True)
class NewRun:
    """A run to insert. ``args`` is already validated and JSON-safe."""

    job: str
    args: dict[str, Any]
    queue: str = "default"
    priority: int = 0
    max_attempts: int = 3
    not_before: float | None = None
    not_after: float | None = None
    dedup_id: str | None = None
    tags: tuple[str, ...] = ()
    parent_run_id: int | None = None
    batch_id: int | None = None
    schedule_id: str | None = None
    concurrency_key: str | None = None
    """The partition of the job's limits this run counts in (computed from its arguments at trigger time)."""
    continue_when: ContinueWhen | None = None
    """Set for a continuation of ``parent_run_id`` (see the module docstring). ``batch_id`` is set by
    ``insert_batch`` only."""

    def to_run(self, run_id: int, status: RunStatus, root_run_id: int, created_at: datetime) -> Run:
        """The record of this run as just inserted: both stores return it without reading the row back."""
        return Run(
            id=run_id,
            job=self.job,
            args=self.args,
            status=status,
            queue=self.queue,
            priority=self.priority,
            attempt=0,
            max_attempts=self.max_attempts,
            not_before=to_datetime(self.not_before),
            not_after=to_datetime(self.not_after),
            dedup_id=self.dedup_id,
            tags=tuple(self.tags),
            parent_run_id=self.parent_run_id,
            root_run_id=root_run_id,
            batch_id=self.batch_id,
            schedule_id=self.schedule_id,
            created_at=created_at,
            started_at=None,
            finished_at=None,
            progress=None,
            progress_message=None,
            result=None,
            error=None,
            worker_id=None,
        )


@dataclass(frozen=True, slots=True)
class Lease:
    """What a worker holds: one attempt of one run. Writes under a lease are fenced by it."""

    run_id: int
    attempt: int


@dataclass(frozen=True, slots=True)
class EventDraft:
    """An event to append. ``attempt`` set: written only while that attempt still holds the run (fenced);
    ``attempt`` None: a client-side event (an input item), written while the run is not terminal."""

    run_id: int
    kind: EventKind
    data: Any
    attempt: int | None = None
    at: float | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    """The end of an attempt, as the worker decided it.

    ``succeeded`` stores ``result``; ``failed`` ends the run (the dead-letter set) with ``error``;
    ``retrying`` records ``error`` on the attempt and makes the run due again ``retry_delay`` seconds from
    the store's now. ``events`` (progress, log, output still buffered by the job) are appended first, in
    the same transaction, under the same fence.
    """

    run_id: int
    attempt: int
    outcome: FinishOutcome
    result: Any = None
    error: ErrorInfo | None = None
    retry_delay: float = 0.0
    events: tuple[EventDraft, ...] = ()


class Store(SchedulesAndLimits):
    """One store per app and process, usable from any thread and any event loop. The schedule, queue and
    limit verbs are declared in ``runlane.store.flow``."""

    url: str
    notifier: Notifier

    # -- lifecycle and schema -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect. Idempotent. Does not migrate; raises StoreUnavailable if the store cannot be reached."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads. Idempotent."""

    async def listen(self, topics: Iterable[Topic] = TOPICS) -> None:
        """Receive other processes' wake-ups on ``topics`` from now on (a worker, before its first claim).
        Without it a store starts receiving a topic at the first ``notifier.wait`` for it, so a process pays
        only for the wake-ups it waits for; that first waiter is woken once reception is live, in case it
        missed one."""

    async def release_loop(self) -> None:
        """Release what this store holds for the running event loop (a pool bound to it) before that loop
        stops; the store stays usable from other loops and from this one again later."""

    @abc.abstractmethod
    async def migrate(self) -> list[int]:
        """Apply pending migrations in order (each in its own transaction); return the versions applied.
        Safe to run concurrently from several processes and while old workers run (additive migrations)."""

    @abc.abstractmethod
    async def schema_version(self) -> tuple[int, int]:
        """(version applied in the store, latest version this code knows); 0 for an empty store."""

    async def check_schema(self) -> None:
        """Raise SchemaOutdated unless the store's schema is the latest this code knows."""
        from runlane.errors import SchemaOutdated

        current, latest = await self.schema_version()
        if current < latest:
            raise SchemaOutdated(
                f"the store at {self.display_url} has schema version {current} but this Runlane needs "
                f"{latest}: run `runlane migrate` first"
            )
        if current > latest:
            raise SchemaOutdated(
                f"the store at {self.display_url} has schema version {current}, newer than this Runlane "
                f"knows ({latest}): upgrade runlane"
            )

    @property
    def display_url(self) -> str:
        """The URL without a password, for messages."""
        return self.url

    @abc.abstractmethod
    def now(self) -> float:
        """The store's clock, epoch seconds (an injected clock in tests)."""

    # -- job catalogue and workers --------------------------------------------------------------------------

    @abc.abstractmethod
    async def register_jobs(self, jobs: Sequence[JobInfo]) -> None:
        """Insert or update catalogue entries by name."""

    @abc.abstractmethod
    async def get_job(self, name: str) -> JobInfo | None: ...

    @abc.abstractmethod
    async def register_worker(self, worker_id: str, info: dict[str, Any]) -> None:
        """Record a live worker (host, pid, queues, concurrency) for operators and the dashboard."""

    @abc.abstractmethod
    async def deregister_worker(self, worker_id: str) -> None: ...

    # -- triggering and reading -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def insert_runs(
        self, runs: Sequence[NewRun], *, on_conflict: ConflictPolicy = "raise"
    ) -> list[Run]:
        """Insert runs in one transaction and return them in input order.

        A ``dedup_id`` shared with a non-terminal run (or with an earlier item of the same call) conflicts:
        ``raise`` raises RunConflict and inserts nothing; ``return_existing`` returns the existing run in that
        position. ``parent_run_id`` must exist (else RunNotFound, nothing inserted); ``root_run_id`` is the
        parent's root, or the run's own id. Wakes ``work`` when a run is pending.
        """

    async def insert_chunks(self, chunks: Sequence[Sequence[NewRun]]) -> list[Run]:
        """``insert_runs`` for each chunk, in order, each all-or-nothing (``trigger_many``). A chunk that fails
        raises and leaves the chunks before it inserted and the ones after it untried. Stores may overlap one
        chunk's client-side work with the previous chunk's statement."""
        out: list[Run] = []
        for chunk in chunks:
            out.extend(await self.insert_runs(chunk))
        return out

    async def insert_runs_in_transaction(
        self, conn: Any, runs: Sequence[NewRun], *, on_conflict: ConflictPolicy = "raise"
    ) -> list[Run]:
        """Insert runs inside the caller's open transaction on ``conn`` (transactional enqueue): they exist
        iff that transaction commits, and no worker sees them before. Only stores that share a database
        connection with the application can do this."""
        from runlane.errors import InvalidConnection

        raise InvalidConnection(f"transactional enqueue needs a PostgreSQL store, not {self.display_url}")

    def insert_runs_in_transaction_blocking(
        self, conn: Any, runs: Sequence[NewRun], *, on_conflict: ConflictPolicy = "raise"
    ) -> list[Run]:
        """``insert_runs_in_transaction`` with a blocking connection, on the calling thread. The blocking
        client uses it so that an insert waiting for another transaction (a dedup id it holds) blocks only
        its caller, never the client's shared loop (whose next call may be the one that ends that other
        transaction)."""
        from runlane.errors import InvalidConnection

        raise InvalidConnection(f"transactional enqueue needs a PostgreSQL store, not {self.display_url}")

    def insert_runs_blocking(
        self, runs: Sequence[NewRun], *, on_conflict: ConflictPolicy = "raise"
    ) -> list[Run] | None:
        """``insert_runs`` on the calling thread, for the blocking client, or None when this store needs an
        event loop for it (the client then inserts through its own loop)."""
        return None

    @abc.abstractmethod
    async def get_run(self, run_id: int) -> Run | None: ...

    @abc.abstractmethod
    async def get_runs(self, run_ids: Sequence[int]) -> list[Run]:
        """The runs that exist among ``run_ids``, in no particular order."""

    @abc.abstractmethod
    async def list_runs(
        self, filter: RunFilter, *, limit: int = 100, before_id: int | None = None
    ) -> list[Run]:
        """Newest first (id descending), ids below ``before_id`` when given: keyset pagination."""

    @abc.abstractmethod
    async def attempts(self, run_id: int) -> list[Attempt]:
        """A run's attempts, oldest first."""

    @abc.abstractmethod
    async def events(self, run_id: int, *, since: int | None = None, limit: int = 1000) -> list[Event]:
        """A run's events with id greater than ``since``, oldest first."""

    @abc.abstractmethod
    async def append_events(self, events: Sequence[EventDraft], *, worker_id: str | None = None) -> set[int]:
        """Append events; return the run ids whose events were refused.

        Fenced drafts (``attempt`` set) are refused unless the run is ``running`` under that attempt and
        ``worker_id``. Unfenced drafts are refused when the run is terminal or missing. A ``progress`` event
        (data ``{"percent": float | None, "message": str | None}``) also sets the run's progress fields.
        """

    # -- batches --------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def insert_batch(
        self, runs: Sequence[NewRun], *, parent_run_id: int | None = None
    ) -> tuple[Batch, list[Run]]:
        """Create a batch and its children (``runs``, without dedup ids) in one transaction and one round
        trip; the children get the batch id and ``parent_run_id`` (RunNotFound if it does not exist).
        Returns the batch and the children in input order."""

    @abc.abstractmethod
    async def get_batch(self, batch_id: int) -> Batch | None: ...

    @abc.abstractmethod
    async def batch_runs(
        self, batch_id: int, *, after_seq: int = 0, up_to_seq: int | None = None, limit: int = 1000
    ) -> list[tuple[int, Run]]:
        """``(finish_seq, run)`` of the children whose latest terminal transition has a ``finish_seq`` in
        ``(after_seq, up_to_seq]``, in that order. A child retried since is returned in its current
        (non-terminal) state: it will come back with a later number when it ends again."""

    async def cancel_batch(self, batch_id: int, *, reason: str | None = None) -> int:
        """Cancel every non-terminal child (and its descendants); return how many children were cancelled."""
        children: list[int] = []
        before: int | None = None
        active = RunFilter(batch_id=batch_id, status=tuple(ACTIVE_STATUSES))
        while True:
            page = await self.list_runs(active, limit=5000, before_id=before)
            children.extend(run.id for run in page)
            if len(page) < 5000:
                break
            before = page[-1].id
        if not children:
            return 0
        cancelled = await self.cancel_runs(children, reason=reason or f"cancelled with batch {batch_id}")
        return len(set(cancelled) & set(children))

    # -- user actions ---------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def cancel_runs(self, run_ids: Sequence[int], *, reason: str = "cancelled by user") -> list[int]:
        """Cancel the non-terminal runs among ``run_ids`` and all their non-terminal descendants, in one
        transaction; return the ids cancelled. A running attempt is marked cancelled and its worker is told
        through the ``cancel`` topic; its later writes are fenced off. Error type ``Cancelled``."""

    @abc.abstractmethod
    async def retry_run(self, run_id: int) -> bool:
        """A failed or cancelled run back to ``pending`` under the same id, allowed one more attempt even
        when ``max_attempts`` was reached; False for any other status. RunNotFound when missing; RunConflict
        when its dedup id is now held by another active run."""

    # -- worker verbs ------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def claim(
        self,
        worker_id: str,
        *,
        queues: Sequence[str],
        jobs: Sequence[str],
        limit: int,
        lease_timeout: float,
    ) -> list[Run]:
        """Claim up to ``limit`` due runs of ``jobs`` in ``queues`` in one transaction.

        First promotes ``scheduled`` and ``retrying`` runs whose due time has come to ``pending``. Never
        claims a run before its due time or after its ``not_after``. Each claimed run becomes ``running``
        with ``attempt + 1``, an attempt row, ``worker_id`` and a lease until now + ``lease_timeout``.
        """

    async def finish_and_claim(
        self,
        finishes: Sequence[Finish],
        *,
        worker_id: str,
        queues: Sequence[str],
        jobs: Sequence[str],
        limit: int,
        lease_timeout: float,
    ) -> tuple[list[bool], list[Run]]:
        """``finish_attempts(finishes)`` then ``claim(limit=limit)``, with the semantics of the two calls in
        that order (so a run made due by a finish, a retry or a continuation, can be claimed at once), in as
        few round trips as the store allows. A store that does both in one transaction writes nothing when
        it raises. The default makes the two calls."""
        done = await self.finish_attempts(finishes, worker_id=worker_id) if finishes else []
        runs = await self.claim(worker_id, queues=queues, jobs=jobs, limit=limit, lease_timeout=lease_timeout)
        return done, runs

    @abc.abstractmethod
    def heartbeat_blocking(self, worker_id: str, leases: Sequence[Lease], lease_timeout: float) -> set[int]:
        """Extend the leases still held; return the run ids still held (the rest were lost: cancelled,
        reclaimed or released). Blocking and callable from any thread, so that a heartbeat thread keeps
        leases alive even while a job blocks the worker's event loop. Also marks the worker as seen."""

    @abc.abstractmethod
    async def held_leases(self, worker_id: str, leases: Sequence[Lease]) -> set[int]:
        """Read-only: the run ids among ``leases`` that ``worker_id`` still holds."""

    @abc.abstractmethod
    async def finish_attempts(self, finishes: Sequence[Finish], *, worker_id: str) -> list[bool]:
        """Apply each attempt's end under its fence; True where it took effect, False where the run was no
        longer this attempt's (its events are then dropped too). One transaction for the batch."""

    @abc.abstractmethod
    async def release_runs(self, leases: Sequence[Lease], *, worker_id: str) -> list[int]:
        """Give runs back without consuming an attempt (graceful shutdown): ``running`` to ``pending``,
        attempt number restored, the attempt row removed. Returns the run ids released."""

    @abc.abstractmethod
    async def reap_expired_leases(self) -> list[int]:
        """Reclaim running runs whose lease has expired: the attempt becomes ``failed`` with a ``WorkerLost``
        error, the run ``pending`` again if attempts remain, else ``failed``. Returns the run ids reaped."""

    @abc.abstractmethod
    async def expire_runs(self) -> list[int]:
        """Cancel not-yet-started runs whose ``not_after`` has passed (error type ``Expired``)."""

    @abc.abstractmethod
    async def next_due_at(self, *, queues: Sequence[str], jobs: Sequence[str]) -> float | None:
        """When the earliest waiting (``scheduled`` or ``retrying``) run becomes due, so that an idle worker
        can sleep exactly until then."""

    # -- housekeeping -------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def prune(self, older_than: float) -> int:
        """Delete terminal runs finished before ``older_than`` with their attempts and events, except runs
        with a non-terminal descendant. Returns how many runs were deleted."""


def split_url(url: str) -> tuple[str, str]:
    """``scheme://rest`` → (scheme, rest); the scheme picks the store implementation."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a store URL: {url!r} (expected sqlite:///path.db or postgresql://…)")
    return scheme.lower(), rest
