"""The workloads, written once against the `System` interface. Each returns a flat dict of figures.

Timing sources: enqueue rates use `time.perf_counter()` around the client calls; everything a worker does is
read from `bench.probe` (wall-clock times written by the job bodies in the worker processes), identically for
every system.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from typing import Any

from bench.probe import COUNTER, SLOT
from bench.systems.base import PROBE_ROOT, System

DRAIN_CONCURRENCY = 16  # per worker process, w3 (and the idle workers of w4)
W5_CONCURRENCY = 50
W5_SLEEP = 0.05


class Probe:
    """The harness side of `bench.probe`: a fresh tmpfs directory per cell."""

    def __init__(self, tag: str, slots: int = 0) -> None:
        self.dir = PROBE_ROOT / f"{tag}-{os.getpid()}"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        os.environ["BENCH_PROBE_DIR"] = str(self.dir)
        if slots:
            (self.dir / "slots").write_bytes(bytes(SLOT.size * slots))

    def counters(self) -> tuple[int, float, float]:
        """(completions, first completion, last completion) over all worker processes."""
        total, first, last = 0, 0.0, 0.0
        for path in self.dir.glob("c.*"):
            data = path.read_bytes()
            if len(data) < COUNTER.size:
                continue
            count, f, lst = COUNTER.unpack_from(data)
            total += count
            if f and (not first or f < first):
                first = f
            last = max(last, lst)
        return total, first, last

    def slots(self, n: int) -> list[tuple[float, float]]:
        data = (self.dir / "slots").read_bytes()
        return [SLOT.unpack_from(data, i * SLOT.size) for i in range(n)]

    def wait_count(self, target: int, timeout: float, system: System, what: str) -> tuple[int, float, float]:
        deadline = time.monotonic() + timeout
        while True:
            state = self.counters()
            if state[0] >= target:
                time.sleep(0.05)  # let the last write land, then read once more
                return self.counters()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: {state[0]}/{target} done after {timeout:.0f} s")
            check_alive(system)
            time.sleep(0.01)

    def wait_slots(self, n: int, timeout: float, system: System, field: int) -> list[tuple[float, float]]:
        deadline = time.monotonic() + timeout
        while True:
            slots = self.slots(n)
            missing = sum(1 for s in slots if not s[field])
            if not missing:
                return slots
            if time.monotonic() > deadline:
                raise TimeoutError(f"{missing}/{n} probe jobs never reported after {timeout:.0f} s")
            check_alive(system)
            time.sleep(0.02)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def check_alive(system: System) -> None:
    workers = getattr(system, "workers", None)
    if workers is not None:
        workers.check_alive()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def warm_up(system: System, probe: Probe, processes: int) -> None:
    """Wait until the workers have booted and each could have claimed a run, then let them go idle."""
    base = probe.counters()[0]
    n = max(4, processes * 4)
    system.enqueue_one(n)
    probe.wait_count(base + n, 120, system, "warm-up")
    time.sleep(0.5)


def w1(system: System, scale: float) -> dict[str, Any]:
    n = max(100, int(10_000 * scale))
    system.setup()
    t0 = time.perf_counter()
    system.enqueue_one(n)
    elapsed = time.perf_counter() - t0
    figures = {"runs": n, "runs_per_s": n / elapsed}
    open_blocking_client = getattr(system, "open_blocking_client", None)
    if open_blocking_client is not None:  # Runlane: its blocking client too (each peer has one API)
        system.close_client()
        system.setup()
        enqueue_one_blocking = open_blocking_client()
        t0 = time.perf_counter()
        enqueue_one_blocking(n)
        figures["blocking_runs_per_s"] = n / (time.perf_counter() - t0)
    return figures


def w2(system: System, scale: float) -> dict[str, Any]:
    n = max(500, int(50_000 * scale))
    system.setup()
    t0 = time.perf_counter()
    system.enqueue_bulk(n)
    elapsed = time.perf_counter() - t0
    return {"runs": n, "runs_per_s": n / elapsed}


def w3(system: System, scale: float, processes: int) -> dict[str, Any]:
    """Drain n pre-enqueued runs. Time-boxed: a system still draining after BENCH_DRAIN_TIMEBOX seconds (default
    60) from the first completion is measured on what it completed by then (`completed` < `runs`)."""
    n = max(200, int(20_000 * scale))
    timebox = float(os.environ.get("BENCH_DRAIN_TIMEBOX", "60"))
    probe = Probe(f"{system.name}-w3")
    try:
        system.setup()
        system.enqueue_bulk(n)
        launched = time.time()
        system.start_workers(processes, DRAIN_CONCURRENCY)
        probe.wait_count(1, 120, system, "drain start")
        try:
            count, first, last = probe.wait_count(n, timebox, system, "drain")
        except TimeoutError:
            count, first, last = probe.counters()
        system.stop_workers()
    finally:
        probe.close()
    return {
        "runs": n,
        "completed": min(count, n),
        "processes": processes,
        "with_startup_per_s": min(count, n) / (last - launched),
        "steady_per_s": (min(count, n) - 1) / (last - first),
        "startup_s": first - launched,
        "extra_executions": max(0, count - n),
    }


def latency_scale(scale: float) -> float:
    """Latency samples are only shrunk for smoke runs: percentiles need the full count."""
    return 1.0 if scale >= 0.5 else scale


def w4(system: System, scale: float) -> dict[str, Any]:
    n = max(50, int(300 * latency_scale(scale)))
    interval = 0.02
    probe = Probe(f"{system.name}-w4", slots=n)
    try:
        system.setup()
        system.start_workers(1, DRAIN_CONCURRENCY)
        warm_up(system, probe, 1)
        enqueued = [0.0] * n
        next_at = time.perf_counter()
        for seq in range(n):
            enqueued[seq] = time.time()
            system.enqueue_probe(seq)
            next_at += interval
            pause = next_at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        slots = probe.wait_slots(n, 60, system, 0)
        system.stop_workers()
    finally:
        probe.close()
    lat = [(start - t) * 1000 for (start, _end), t in zip(slots, enqueued, strict=True)]
    return {
        "runs": n,
        "p50_ms": statistics.median(lat),
        "p95_ms": percentile(lat, 95),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat),
    }


def w5(system: System, scale: float) -> dict[str, Any]:
    n = max(250, int(2_000 * scale))
    ideal = n / W5_CONCURRENCY * W5_SLEEP
    probe = Probe(f"{system.name}-w5", slots=n)
    try:
        system.setup()
        system.start_workers(1, W5_CONCURRENCY)
        warm_up(system, probe, 1)
        t0 = time.time()
        system.enqueue_sleepers(range(n))
        slots = probe.wait_slots(n, 60 + 20 * ideal, system, 1)
        system.stop_workers()
    finally:
        probe.close()
    first_start = min(s for s, _ in slots)
    last_end = max(e for _, e in slots)
    in_flight = max_in_flight(slots)
    return {
        "runs": n,
        "ideal_s": ideal,
        "wall_s": last_end - first_start,
        "wall_from_enqueue_s": last_end - t0,
        "max_in_flight": in_flight,
    }


def max_in_flight(slots: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in slots] + [(e, -1) for _, e in slots])
    best = cur = 0
    for _, delta in events:
        cur += delta
        best = max(best, cur)
    return best


def w6(system: System, scale: float) -> dict[str, Any]:
    round_trips = getattr(system, "round_trips", None)
    if round_trips is None:
        raise NotImplementedError("w6 is Runlane only")
    probe = Probe(f"{system.name}-w6")
    try:
        system.setup()
        system.start_workers(1, DRAIN_CONCURRENCY)
        warm_up(system, probe, 1)
        result: dict[str, Any] = round_trips(
            max(20, int(200 * latency_scale(scale))),
            max(1000, int(10_000 * latency_scale(scale))),
        )
        system.stop_workers()
    finally:
        probe.close()
    return result


WORKLOADS: dict[str, Any] = {
    "w1": w1,
    "w2": w2,
    "w3a": lambda s, scale: w3(s, scale, 1),
    "w3b": lambda s, scale: w3(s, scale, 2),
    "w4": w4,
    "w5": w5,
    "w6": w6,
}
