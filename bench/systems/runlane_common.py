"""What the two Runlane adapters share: the public API only (`Runlane(url)`, `trigger`, `trigger_many`,
`runlane worker … --processes N --concurrency C`)."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from bench.systems.base import Base, version


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


class RunlaneBase(Base):
    url = ""

    def reset_store(self) -> None:
        raise NotImplementedError

    def jobs(self) -> ModuleType:
        os.environ["RUNLANE_URL"] = self.url
        from bench.systems import runlane_jobs

        return runlane_jobs

    def setup(self) -> None:
        self.reset_store()
        module = self.jobs()
        self.app = module.app
        self.run(self.app.migrate())
        self.client = self.app.async_client
        self.run(self.client.get_run(0))  # open the store and its pool outside the timings

    def env(self) -> dict[str, str]:
        return {"RUNLANE_URL": self.url}

    def worker_commands(self, processes: int, concurrency: int) -> list[list[str]]:
        return [
            [
                sys.executable,
                "-m",
                "runlane",
                "worker",
                "bench.systems.runlane_jobs:app",
                "--processes",
                str(processes),
                "--concurrency",
                str(concurrency),
                "--log-level",
                "warning",
            ]
        ]

    def enqueue_one(self, n: int) -> None:
        async def go() -> None:
            for _ in range(n):
                await self.client.trigger("noop")

        self.run(go())

    def open_blocking_client(self) -> Callable[[int], None]:
        """After ``setup``: open the blocking client, and return ``enqueue_one`` through it."""
        client = self._blocking = self.app.client  # the blocking Client: what a Django view or a script calls
        client.get_run(0)  # open the store on its loop outside the timing

        def enqueue_one(n: int) -> None:
            for _ in range(n):
                client.trigger("noop")

        return enqueue_one

    def enqueue_bulk(self, n: int) -> None:
        self.run(self.client.trigger_many("noop", [{} for _ in range(n)]))

    def enqueue_probe(self, seq: int) -> None:
        self.run(self.client.trigger("probe_start", {"seq": seq}))

    def enqueue_sleepers(self, seqs: Sequence[int]) -> None:
        self.run(self.client.trigger_many("sleeper", [{"seq": s} for s in seqs]))

    def close_client(self) -> None:
        if getattr(self, "app", None) is not None:
            self.run(self.app.aclose())
        blocking = getattr(self, "_blocking", None)
        if blocking is not None:
            self._blocking = None
            blocking.close()

    def describe(self) -> str:
        return f"runlane {version('runlane')}"

    # -- w6: Runlane only ------------------------------------------------------------------------------------

    def round_trips(self, n: int, stream_items: int) -> dict[str, Any]:
        """`run()` round trip (trigger → worker → result back to the caller) and `stream` throughput."""

        async def go() -> dict[str, Any]:
            out: dict[str, Any] = {}
            for _ in range(5):  # warm-up: every worker path is hot
                await self.client.run("echo")
            lat = []
            for _ in range(n):
                t0 = time.perf_counter()
                await self.client.run("echo")
                lat.append((time.perf_counter() - t0) * 1000)
            out["run_p50_ms"] = statistics.median(lat)
            out["run_p99_ms"] = percentile(lat, 99)
            stream: Any = getattr(self.client, "stream", None)
            if stream is None:
                out["stream_items_per_s"] = None
                out["note"] = "client.stream not available in this checkout"
                return out
            t0 = time.perf_counter()
            count = 0
            async for _item in stream("items", {"n": stream_items}):
                count += 1
            elapsed = time.perf_counter() - t0
            if count != stream_items:
                raise RuntimeError(f"stream yielded {count} items, expected {stream_items}")
            out["stream_items_per_s"] = count / elapsed
            return out

        return self.run(go())
