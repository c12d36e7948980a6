"""Lease renewal on its own OS thread, so that a job blocking the event loop (or a CPU-bound sync job
holding the GIL in short bursts) cannot let its own lease expire and get itself executed twice.

It also self-fences: an attempt is stopped before the store can hand its run to another worker. The store
renews a lease when the renewal arrives, so the lease runs at least ``lease_timeout`` from when the renewal
was *sent*; a lease unrenewed for ``lease_timeout`` minus a margin (the time a job takes to notice
``ctx.cancelled``) since then is dropped and its attempt stopped. A watchdog thread applies the rule at each
lease's deadline, whatever the renewing thread is doing (waiting for a busy SQLite file, stuck on a
connection that a partition holds for minutes), so that a worker cut off from its store never runs on
beside the attempt that replaced it (RELIABILITY.md, T19)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from runlane.store import Lease, Store

log = logging.getLogger("runlane.worker")


def fence_age(lease_timeout: float) -> float:
    """How long after a renewal was sent its attempt is stopped: a margin before the lease can expire, for the
    job to notice ``ctx.cancelled`` and the store's clock to differ from ours (0.2 s on a 2 s lease, 1 s from a
    10 s lease up)."""
    return lease_timeout - min(0.1 * lease_timeout, 1.0)


class Heartbeat:
    def __init__(
        self,
        store: Store,
        worker_id: str,
        *,
        lease_timeout: float,
        interval: float,
        on_lost: Callable[[set[int]], None],
        on_renewed: Callable[[set[int], float], None] | None = None,
    ) -> None:
        self._store = store
        self._worker_id = worker_id
        self._lease_timeout = lease_timeout
        self.fence_after = fence_age(lease_timeout)
        self._interval = interval
        self._on_lost = on_lost
        self._on_renewed = on_renewed
        self._lock = threading.Lock()
        self._leases: dict[int, Lease] = {}
        self._renewed: dict[int, float] = {}
        self._stop = threading.Event()
        self._frozen = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, name=f"runlane-heartbeat-{worker_id}", daemon=True
        )
        self._watchdog = threading.Thread(
            target=self._watch, name=f"runlane-heartbeat-watchdog-{worker_id}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        self._watchdog.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watchdog.is_alive():
            self._watchdog.join(timeout=self._interval + 1)
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval + 10)

    def freeze(self) -> None:
        """Stop renewing (fault injection: proves that expired leases are reclaimed)."""
        self._frozen.set()

    def add(self, lease: Lease, renewed_at: float | None = None) -> None:
        """Renew ``lease`` from now on; ``renewed_at`` (monotonic) is when the store granted it, if earlier."""
        with self._lock:
            self._leases[lease.run_id] = lease
            self._renewed[lease.run_id] = time.monotonic() if renewed_at is None else renewed_at

    def renewed_at(self, run_id: int) -> float | None:
        """When the last renewal the store granted was sent (monotonic); None once the lease is not held."""
        with self._lock:
            return self._renewed.get(run_id)

    def fresh(self, lease: Lease) -> bool:
        """Whether ``lease`` is held and younger than the fence (callable from any thread): a body may start."""
        with self._lock:
            held = self._leases.get(lease.run_id)
            renewed = self._renewed.get(lease.run_id)
        if held is None or held.attempt != lease.attempt or renewed is None:
            return False
        return time.monotonic() - renewed < self.fence_after

    def remove(self, lease: Lease) -> None:
        """Stop renewing ``lease``; a later attempt of the same run, already added, keeps its renewals (an
        immediate retry is claimed in the flight that records the attempt before it)."""
        with self._lock:
            held = self._leases.get(lease.run_id)
            if held is not None and held.attempt != lease.attempt:
                return
            self._leases.pop(lease.run_id, None)
            self._renewed.pop(lease.run_id, None)

    def _serve(self) -> None:
        # At a fixed rate from each beat's start: a slow beat (a busy store, a starved thread) must not also
        # push the next one back, or the leases age by a beat's length plus an interval between renewals.
        due = time.monotonic() + self._interval
        while not self._stop.wait(max(due - time.monotonic(), 0.0)):
            due = max(due + self._interval, time.monotonic())
            if not self._frozen.is_set():
                self.beat()

    def _watch(self) -> None:
        while not self._stop.wait(self._next_deadline() - time.monotonic()):
            self._fence(time.monotonic())

    def _next_deadline(self) -> float:
        """When the oldest lease must be fenced (re-checked at least once per interval: leases come and go)."""
        with self._lock:
            oldest = min(self._renewed.values(), default=None)
        soon = time.monotonic() + self._interval
        return soon if oldest is None else min(oldest + self.fence_after, soon)

    def _fence(self, now: float) -> None:
        """Drop the leases that the store may be about to hand to another worker, and stop their attempts."""
        with self._lock:
            lost = {rid for rid, at in self._renewed.items() if now - at >= self.fence_after}
            for run_id in lost:
                self._leases.pop(run_id, None)
                self._renewed.pop(run_id, None)
        if lost:
            log.warning(
                "worker %s: %d leases not renewed for %.1f s (lease %.1f s); stopping their attempts",
                self._worker_id,
                len(lost),
                self.fence_after,
                self._lease_timeout,
            )
            self._on_lost(lost)

    def beat(self) -> None:
        started = time.monotonic()
        # A lease already a whole period old (the process was stopped or starved) is lost whatever the store
        # would answer: stop its attempt now rather than after a renewal round trip on a busy store.
        self._fence(started)
        with self._lock:
            leases = list(self._leases.values())
        try:
            held = self._store.heartbeat_blocking(self._worker_id, leases, self._lease_timeout)
        except Exception as exc:
            log.warning("heartbeat of worker %s failed: %s", self._worker_id, exc)
            self._fence(time.monotonic())
            return
        else:
            # The store renewed them between send and reply: from the send time the lease surely runs a whole
            # lease_timeout. (The reply time would let a zombie run on beside its replacement for as long as
            # the reply took: seconds, on a SQLite file whose write lock a stopped process holds.)
            renewed = started
            with self._lock:
                for run_id in held:
                    if run_id in self._renewed:
                        self._renewed[run_id] = renewed
            lost = {lease.run_id for lease in leases} - held
            if self._on_renewed is not None and held:
                self._on_renewed(held, renewed)
        finally:
            took = time.monotonic() - started
            if took > self._lease_timeout / 2:  # a store this slow lets leases expire between renewals
                log.warning(
                    "heartbeat of worker %s took %.2f s (lease %.1f s)",
                    self._worker_id,
                    took,
                    self._lease_timeout,
                )
        if lost:
            self._on_lost(lost)
