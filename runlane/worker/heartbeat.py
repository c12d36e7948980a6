"""Lease renewal on its own OS thread, so that a job blocking the event loop (or a CPU-bound sync job
holding the GIL in short bursts) cannot let its own lease expire and get itself executed twice."""

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
    ) -> None:
        self._store = store
        self._worker_id = worker_id
        self._lease_timeout = lease_timeout
        self._interval = interval
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._leases: dict[int, Lease] = {}
        self._renewed: dict[int, float] = {}
        self._stop = threading.Event()
        self._frozen = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, name=f"runlane-heartbeat-{worker_id}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval + 10)

    def freeze(self) -> None:
        """Stop renewing (fault injection: proves that expired leases are reclaimed)."""
        self._frozen.set()

    def add(self, lease: Lease) -> None:
        with self._lock:
            self._leases[lease.run_id] = lease
            self._renewed[lease.run_id] = time.monotonic()

    def remove(self, run_id: int) -> None:
        with self._lock:
            self._leases.pop(run_id, None)
            self._renewed.pop(run_id, None)

    def _serve(self) -> None:
        while not self._stop.wait(self._interval):
            if not self._frozen.is_set():
                self.beat()

    def beat(self) -> None:
        with self._lock:
            leases = list(self._leases.values())
        started = time.monotonic()
        try:
            held = self._store.heartbeat_blocking(self._worker_id, leases, self._lease_timeout)
        except Exception as exc:
            log.warning("heartbeat of worker %s failed: %s", self._worker_id, exc)
            # Self-fence: a lease we could not renew for a whole lease period may already be reclaimed.
            with self._lock:
                lost = {rid for rid, at in self._renewed.items() if started - at >= self._lease_timeout}
        else:
            with self._lock:
                for run_id in held:
                    if run_id in self._renewed:
                        self._renewed[run_id] = started
            lost = {lease.run_id for lease in leases} - held
        if lost:
            self._on_lost(lost)
