"""Network faults between worker processes and PostgreSQL: one ``FaultProxy`` per worker slot (so one worker
can be partitioned alone), every fault logged with its target, and the checks that only these tests need."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from harness.checker import WORKER_LOST, StoreState
from harness.faults import Fault
from harness.ledger import Execution
from harness.procs import WorkerPool, WorkerSlot
from harness.proxy import FaultProxy
from harness.scenario import Scenario
from runlane import Client


def proxy_to(url: str) -> FaultProxy:
    """A started proxy in front of the PostgreSQL server of ``url``."""
    parts = urlsplit(url)
    return FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()


def pid_of(worker_id: str | None) -> int | None:
    """The OS pid inside a worker id (``host-pid-token``)."""
    if not worker_id:
        return None
    parts = worker_id.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def ts(at: datetime | None) -> float | None:
    return at.timestamp() if at is not None else None


class ProxiedWorkers:
    """A worker pool whose every slot reaches the store through its own proxy (restarts keep the slot's)."""

    def __init__(self, scenario: Scenario, size: int, **pool_options: Any) -> None:
        self.scenario = scenario
        self.proxies = [proxy_to(scenario.url) for _ in range(size)]
        env_for = {i: {"RUNLANE_URL": p.url_for(scenario.url)} for i, p in enumerate(self.proxies)}
        self.pool: WorkerPool = scenario.pool(size, env_for=env_for, **pool_options)

    def __enter__(self) -> ProxiedWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.pool.close()
        for proxy in self.proxies:
            proxy.close()

    def partition(self, slot: WorkerSlot, duration: float, detail: str = "") -> Fault:
        """Black-hole one worker's connections for ``duration`` seconds, then heal (logged as ``partition``)."""
        proxy = self.proxies[slot.index]
        proxy.blackhole(True)
        # Begun once the proxy forwards nothing more: a statement it passed just before was sent before the
        # partition and may commit (recorded before the cut, a 1 ms race failed T08).
        fault = self.scenario.faults.begin("partition", slot.pid, detail)
        try:
            time.sleep(duration)  # the fault's length, not a wait for an outcome
        finally:
            proxy.blackhole(False)
            self.scenario.faults.end(fault)
        return fault

    def cut_all(self, kind: str, detail: str = "", *, reset: bool = False) -> Fault:
        """Every worker loses the store (``reset``: live connections are also reset, as in a restart)."""
        for proxy in self.proxies:
            proxy.blackhole(True)
            if reset:
                proxy.reset_all()
        return self.scenario.faults.begin(kind, None, detail)  # once nothing passes (see partition)

    def heal_all(self, fault: Fault) -> None:
        for proxy in self.proxies:
            proxy.blackhole(False)
        self.scenario.faults.end(fault)


def busy_slots(pool: WorkerPool, executions: Iterable[Execution]) -> list[WorkerSlot]:
    """Live slots whose current process has executions open right now (something to cut off)."""
    open_pids = {e.pid for e in executions if e.t_end is None}
    return [s for s in pool.live() if s.pid in open_pids]


def stale_commits(state: StoreState, pid: int | None, cut: float, heal: float) -> list[str]:
    """Ends written for attempts of worker process ``pid`` (None: any worker) that it claimed before ``heal``
    and that were recorded at or after ``cut``: a result committed by an attempt that was cut off from the
    store for longer than its lease. Ends written by the reaper (``worker lost``) are not the worker's."""
    found = []
    for run_id, attempts in state.attempts.items():
        for a in attempts:
            if pid is not None and pid_of(a.worker_id) != pid:
                continue
            started, finished = ts(a.started_at), ts(a.finished_at)
            if started is None or started >= heal or finished is None or finished < cut:
                continue
            if a.status.value == "cancelled" or (a.error is not None and a.error.type == WORKER_LOST):
                continue
            found.append(
                f"run {run_id} attempt {a.number} by {a.worker_id}: started {started:.3f}, "
                f"recorded {a.status.value} at {finished:.3f} (cut {cut:.3f}, heal {heal:.3f})"
            )
    return found


def resumed_within(
    executions: Iterable[Execution], pid: int | None, after: float, limit: float
) -> float | None:
    """Seconds from ``after`` to the first execution started by ``pid`` after it, if within ``limit``."""
    starts = [e.t_start - after for e in executions if e.pid == pid and e.t_start >= after]
    first = min(starts, default=None)
    return first if first is not None and first <= limit else None


class TriggerLoad:
    """Another client triggering ``rate`` runs per second from a thread while the test runs, each trigger
    logged in the client log. ``dedup``: each logical request carries its key as ``dedup_id``; ``retry``:
    an indeterminate trigger is repeated (same dedup id) until it is ok or a RunConflict names the run."""

    def __init__(
        self,
        scenario: Scenario,
        client: Client,
        *,
        job: str = "ledger_probe",
        rate: float,
        prefix: str,
        duration_ms: tuple[int, int] = (20, 100),
        dedup: bool = False,
        retry: bool = False,
    ) -> None:
        self.scenario, self.client, self.job, self.rate = scenario, client, job, rate
        self.prefix, self.duration_ms, self.dedup, self.retry = prefix, duration_ms, dedup, retry
        self.requests = 0
        self.retries = 0
        self._rng = random.Random(scenario.seed + 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-triggers", daemon=True)
        self._errors: list[BaseException] = []

    def __enter__(self) -> TriggerLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        if self._errors:
            raise self._errors[0]

    def _run(self) -> None:
        try:
            started = time.monotonic()
            while not self._stop.is_set():
                due = started + self.requests / self.rate
                if self._stop.wait(max(due - time.monotonic(), 0.0)):
                    return
                key = f"{self.prefix}{self.requests}"
                args = {"key": key, "duration_ms": self._rng.randint(*self.duration_ms)}
                options = {"dedup_id": key} if self.dedup else {}
                while True:
                    op = self.scenario.clientlog.trigger(self.client, self.job, args, **options)
                    if op.outcome != "indeterminate" or not self.retry or self._stop.is_set():
                        break
                    self.retries += 1
                    self._stop.wait(0.05)
                self.requests += 1
        except BaseException as exc:  # surfaced by stop()
            self._errors.append(exc)
