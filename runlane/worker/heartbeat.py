"""Lease renewal on its own OS thread, so that a job blocking the event loop (or a CPU-bound sync job
holding the GIL in short bursts) cannot let its own lease expire and get itself executed twice.

It also self-fences: a lease not renewed for a whole lease period may already belong to another worker, so
it is dropped and its attempt stopped. A watchdog thread applies that rule while a renewal is stuck on a
connection that neither answers nor fails (a network partition holds a statement for minutes)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from runlane.store import Lease, Store

log = logging.getLogger("runlane.worker")


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
        self._interval = interval
        self._on_lost = on_lost
        self._on_renewed = on_renewed
        self._lock = threading.Lock()
        self._leases: dict[int, Lease] = {}
        self._renewed: dict[int, float] = {}
        self._beat_started: float | None = None  # a renewal in flight since (monotonic)
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
        """When the store last renewed this lease (monotonic); None once it is no longer held."""
        with self._lock:
            return self._renewed.get(run_id)

    def remove(self, run_id: int) -> None:
        with self._lock:
            self._leases.pop(run_id, None)
            self._renewed.pop(run_id, None)

    def _serve(self) -> None:
        # At a fixed rate from each beat's start: a slow beat (a busy store, a starved thread) must not also
        # push the next one back, or the leases age by a beat's length plus an interval between renewals.
        due = time.monotonic() + self._interval
        while not self._stop.wait(max(due - time.monotonic(), 0.0)):
            due = max(due + self._interval, time.monotonic())
            if not self._frozen.is_set():
                self.beat()

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            if self._beat_started is not None:  # stuck: a renewal that ends (or fails) fences in beat()
                self._fence(time.monotonic())

    def _fence(self, now: float) -> None:
        """Drop the leases not renewed for a whole lease period: the store may have reclaimed them already."""
        with self._lock:
            lost = {rid for rid, at in self._renewed.items() if now - at >= self._lease_timeout}
            for run_id in lost:
                self._leases.pop(run_id, None)
                self._renewed.pop(run_id, None)
        if lost:
            log.warning(
                "worker %s: %d leases not renewed for %.1f s; stopping their attempts",
                self._worker_id,
                len(lost),
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
        self._beat_started = started
        try:
            held = self._store.heartbeat_blocking(self._worker_id, leases, self._lease_timeout)
        except Exception as exc:
            log.warning("heartbeat of worker %s failed: %s", self._worker_id, exc)
            self._fence(time.monotonic())
            return
        else:
            # The store renewed them between send and reply. A slow call mostly waited for a lock before it ran
            # (a busy SQLite file), so the reply time is the closer estimate; a late reply can only lengthen a
            # zombie's life by its delay, never let it commit (the store refuses writes on expired leases).
            renewed = time.monotonic()
            with self._lock:
                for run_id in held:
                    if run_id in self._renewed:
                        self._renewed[run_id] = renewed
            lost = {lease.run_id for lease in leases} - held
            if self._on_renewed is not None and held:
                self._on_renewed(held, renewed)
        finally:
            self._beat_started = None
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
