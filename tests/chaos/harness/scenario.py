"""One chaos scenario's records and helpers: store URL, ledger, fault log, client log, worker pools,
and the full-tier figures file."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.checker import Report, StoreState, check, read_store, wait_all_terminal
from harness.clientlog import ClientLog
from harness.faults import FaultLog
from harness.ledger import Ledger
from harness.procs import FULL, Timing, WorkerPool, chaos_env, migrate
from runlane import Client, Runlane

RESULTS_DIR = Path(
    os.environ.get("RUNLANE_CHAOS_RESULTS", Path(__file__).resolve().parents[3] / "chaos-results")
)


SPAN_CAP = float(os.environ.get("RUNLANE_CHAOS_SPAN_CAP", "0") or 0) or None
_capped: list[tuple[float, float]] = []  # (planned, used) spans of the running test, reset per scenario


def scale(smoke: int, full: int) -> int:
    """The plan's load for this tier: ``[CI]`` figure in smoke runs, the written figure in ``make chaos``."""
    return full if FULL else smoke


def span(smoke: float, full: float) -> float:
    """A time box (seconds of chaos, of outage, of load) for this tier.

    ``RUNLANE_CHAOS_SPAN_CAP`` shortens the full tier's long boxes (the plan's 30 min outages and 6 h soak) to
    fit a session; the load (processes, rates, run counts) stays at full scale, and the figures of a test whose
    box was shortened say so (``span_capped``), so a capped run is never mistaken for the plan's.
    """
    if not FULL:
        return smoke
    if SPAN_CAP is not None and full > SPAN_CAP:
        _capped.append((full, SPAN_CAP))
        return SPAN_CAP
    return full


def _cap_note() -> dict[str, str]:
    if not _capped:
        return {}
    return {"span_capped": "; ".join(f"{planned:g}s->{used:g}s" for planned, used in _capped)}


def record_figures(name: str, backend: str, seed: int, **figures: Any) -> None:
    """Full tier: keep a test's figures for RELIABILITY.md, for tests without a Scenario (in-process ones)."""
    if not FULL:
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    record = {"test": name, "backend": backend, "seed": seed, "at": _stamp(), **figures, **_cap_note()}
    (RESULTS_DIR / f"{name}-{backend}.json").write_text(json.dumps(record, indent=2))


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime())


@dataclass
class Scenario:
    name: str
    backend: str
    url: str
    workdir: Path
    seed: int
    timing: Timing = field(default_factory=Timing)
    ledger: Ledger = field(init=False)
    faults: FaultLog = field(default_factory=FaultLog)
    clientlog: ClientLog = field(default_factory=ClientLog)
    pools: list[WorkerPool] = field(default_factory=list)
    _app: Runlane | None = None

    def __post_init__(self) -> None:
        _capped.clear()
        self.ledger = Ledger(self.workdir / "ledger")
        self.random = random.Random(self.seed)

    def env(self, **extra: str) -> dict[str, str]:
        return chaos_env(self.url, Path(self.ledger.path), self.timing, **extra)

    def migrate(self) -> None:
        migrate(self.env(), self.workdir)

    @property
    def app(self) -> Runlane:
        """A client-only app on the scenario's store (the test process defines no jobs)."""
        if self._app is None:
            self._app = Runlane(self.url, lease_timeout=self.timing.lease_timeout)
        return self._app

    @property
    def client(self) -> Client:
        return self.app.client

    def pool(self, size: int, **options: Any) -> WorkerPool:
        env = options.pop("env", None) or self.env()
        pool = WorkerPool(env, self.workdir, self.faults, size=size, **options)
        self.pools.append(pool)
        return pool.start()

    def trigger_many_logged(self, job: str, args_list: list[dict[str, Any]], **options: Any) -> None:
        """Bulk-enqueue (fast set-up of a backlog) and log every run as an ok trigger."""
        from harness.clientlog import Op

        now = time.time()
        for i in range(0, len(args_list), 500):
            chunk = args_list[i : i + 500]
            runs = self.client.trigger_many(job, chunk, **options)
            for args, run in zip(chunk, runs, strict=True):
                self.clientlog.ops.append(Op(str(args["key"]), job, now, time.time(), "ok", run.id))

    def wait_terminal(self, timeout: float, expected: int | None = None) -> float:
        return wait_all_terminal(self.url, time.time() + timeout, expected=expected)

    def state(self) -> StoreState:
        return read_store(self.url)

    def check(self, **options: Any) -> Report:
        return check(
            self.state(),
            self.ledger.executions(),
            self.clientlog.snapshot(),
            self.faults.snapshot(),
            **options,
        )

    def logs(self) -> str:
        return "\n".join(p.logs() for p in self.pools) + f"\nseed={self.seed}"

    def record(self, report: Report, **extra: Any) -> None:
        """Full tier: keep the figures for RELIABILITY.md (written by ``tests/chaos/report.py``)."""
        if not FULL:
            return
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        figures = {
            "test": self.name,
            "backend": self.backend,
            "seed": self.seed,
            "at": _stamp(),
            "lease_s": self.timing.lease_timeout,
            **report.figures(),
            **extra,
            **_cap_note(),
        }
        (RESULTS_DIR / f"{self.name}-{self.backend}.json").write_text(json.dumps(figures, indent=2))

    def close(self) -> None:
        for pool in self.pools:
            pool.close()
        if self._app is not None:
            self._app.close()
        self.ledger.close()


@contextmanager
def every(
    interval: float, action: Callable[[], None], *, jitter: float = 0.0, rng: random.Random | None = None
) -> Iterator[None]:
    """Run ``action`` every ``interval`` seconds in a thread while the block runs (a nemesis schedule)."""
    import threading

    stop = threading.Event()
    rng = rng or random.Random()
    errors: list[BaseException] = []

    def loop() -> None:
        while not stop.wait(interval + rng.uniform(-jitter, jitter)):
            try:
                action()
            except BaseException as exc:  # surfaced when the block ends
                errors.append(exc)
                return

    thread = threading.Thread(target=loop, name="chaos-nemesis", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
        if errors:
            raise errors[0]
