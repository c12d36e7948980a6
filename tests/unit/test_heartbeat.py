"""The heartbeat thread's self-fencing rules, against a store stand-in whose renewals we control."""

from __future__ import annotations

import time
from typing import Any, cast

from runlane.store import Lease, Store
from runlane.worker.heartbeat import Heartbeat, fence_age

LEASE = 2.0


class SlowStore:
    """Renews every lease it is sent, after ``delay`` seconds (a busy SQLite writer queue)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.sent: list[set[int]] = []

    def heartbeat_blocking(self, worker_id: str, leases: list[Lease], lease_timeout: float) -> set[int]:
        self.sent.append({lease.run_id for lease in leases})
        time.sleep(self.delay)
        return {lease.run_id for lease in leases}


def make(store: SlowStore, lost: list[tuple[float, set[int]]]) -> Heartbeat:
    return Heartbeat(
        cast(Store, store),
        "w1",
        lease_timeout=LEASE,
        interval=0.5,
        on_lost=lambda ids: lost.append((time.monotonic(), set(ids))),
    )


def test_zombie_pause_fencing_a_resumed_worker_stops_stale_attempts_before_asking_the_store() -> None:
    """T03 (full tier, SQLite): a worker resumed after a SIGSTOP of 3 x lease sent its stale leases to a busy
    store and stopped their attempts only when the refusal came back, 1.5 s later. A lease a whole period old
    is lost whatever the store says: it is fenced before the renewal is sent, and never sent."""
    lost: list[tuple[float, set[int]]] = []
    reported_at_renewal: list[list[set[int]]] = []

    class Watching(SlowStore):
        def heartbeat_blocking(self, worker_id: str, leases: list[Lease], lease_timeout: float) -> set[int]:
            reported_at_renewal.append([ids for _, ids in lost])  # what was stopped before the round trip
            return super().heartbeat_blocking(worker_id, leases, lease_timeout)

    store = Watching(delay=0.0)
    heartbeat = make(store, lost)
    now = time.monotonic()
    heartbeat.add(Lease(1, 1), renewed_at=now - 3 * LEASE)  # granted before the pause
    heartbeat.add(Lease(2, 1), renewed_at=now - 0.1)  # granted just before it: still ours

    heartbeat.beat()

    assert [ids for _, ids in lost] == [{1}]
    assert reported_at_renewal == [[{1}]], "fenced only after the renewal round trip"
    assert store.sent == [{2}], "a lease already lost was sent for renewal"


def test_a_renewed_lease_is_kept_and_a_refused_one_is_reported() -> None:
    class Refusing(SlowStore):
        def heartbeat_blocking(self, worker_id: str, leases: list[Lease], lease_timeout: float) -> set[int]:
            super().heartbeat_blocking(worker_id, leases, lease_timeout)
            return {1}

    store = Refusing(delay=0.0)
    lost: list[tuple[float, set[int]]] = []
    heartbeat = make(store, lost)
    heartbeat.add(Lease(1, 1))
    heartbeat.add(Lease(2, 3))
    heartbeat.beat()
    assert [ids for _, ids in lost] == [{2}]
    heartbeat.remove(Lease(2, 3))
    heartbeat.beat()
    assert store.sent == [{1, 2}, {1}]
    assert len(lost) == 1


def test_ending_an_attempt_keeps_renewing_the_next_attempt_of_its_run() -> None:
    """An immediate retry is claimed in the flight that records the attempt before it, so the next attempt's
    lease is added before the previous attempt is removed: removing the old one must leave the new one."""
    store = SlowStore(delay=0.0)
    heartbeat = make(store, [])
    heartbeat.add(Lease(1, 1))
    heartbeat.add(Lease(1, 2))  # the retry, claimed and started
    heartbeat.remove(Lease(1, 1))  # the first attempt's end, written
    assert heartbeat.renewed_at(1) is not None
    assert heartbeat.fresh(Lease(1, 2)) and not heartbeat.fresh(Lease(1, 1))
    heartbeat.beat()
    assert store.sent == [{1}]
    heartbeat.remove(Lease(1, 2))
    assert heartbeat.renewed_at(1) is None
    assert not heartbeat.fresh(Lease(1, 2))


def test_a_failed_renewal_fences_only_what_is_a_lease_old() -> None:
    class Failing(SlowStore):
        def heartbeat_blocking(self, *args: Any) -> set[int]:
            raise OSError("store down")

    lost: list[tuple[float, set[int]]] = []
    heartbeat = make(Failing(delay=0.0), lost)
    heartbeat.add(Lease(1, 1), renewed_at=time.monotonic() - 0.5)
    heartbeat.beat()
    assert lost == []  # still within its lease: the next renewal may get through


def test_limits_under_chaos_a_renewal_counts_from_when_it_was_sent() -> None:
    """T19 (full tier, SQLite): a queue limit of 10 saw 11 executions. A worker whose renewal waited seconds
    for the file's write lock (held by a stopped process) stamped the renewal with the reply time, so it
    believed its lease younger than the store did and ran on beside the attempt that replaced it. The store
    renewed the lease no earlier than the renewal was sent: that is the stamp."""
    store = SlowStore(delay=0.3)
    heartbeat = make(store, [])
    heartbeat.add(Lease(1, 1), renewed_at=time.monotonic() - 1.0)
    before = time.monotonic()
    heartbeat.beat()
    after = time.monotonic()
    renewed = heartbeat.renewed_at(1)
    assert renewed is not None and before <= renewed < after - 0.25


def test_limits_under_chaos_an_attempt_is_fenced_before_its_lease_can_expire() -> None:
    """T19: the watchdog fences each lease at its own deadline, a margin before the store may reclaim it,
    whatever the renewing thread is doing (here: nothing, as if stuck on the store)."""
    lost: list[tuple[float, set[int]]] = []
    heartbeat = make(SlowStore(delay=0.0), lost)
    granted = time.monotonic() - fence_age(LEASE) + 0.2  # deadlines within the next re-check (interval 0.5)
    heartbeat.add(Lease(1, 1), renewed_at=granted)
    heartbeat.add(Lease(2, 1), renewed_at=granted + 0.1)
    assert heartbeat.fence_after == fence_age(LEASE) < LEASE
    assert heartbeat._next_deadline() == granted + fence_age(LEASE)
    heartbeat._fence(granted + fence_age(LEASE) - 0.001)
    assert lost == []
    heartbeat._fence(granted + fence_age(LEASE) + 1e-6)
    assert [ids for _, ids in lost] == [{1}]
    assert heartbeat._next_deadline() == granted + 0.1 + fence_age(LEASE)


def test_a_lease_older_than_the_fence_is_not_fresh() -> None:
    heartbeat = make(SlowStore(delay=0.0), [])
    heartbeat.add(Lease(1, 1), renewed_at=time.monotonic() - heartbeat.fence_after - 0.01)
    heartbeat.add(Lease(2, 1))
    assert not heartbeat.fresh(Lease(1, 1))
    assert heartbeat.fresh(Lease(2, 1))
