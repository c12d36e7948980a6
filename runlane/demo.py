"""``runlane demo``: Runlane at work in one process, on a SQLite file, with nothing to set up.

Four example jobs show the run states a user meets first: ``fast`` succeeds at once, ``slow`` reports
progress, ``flaky`` fails at random and is retried, ``doomed`` always fails and ends ``failed``. A worker
runs in the same event loop while runs are triggered over time; a live view shows them move.

``runlane worker runlane.demo:app --url sqlite:///runlane-demo.db`` runs the same jobs in a separate worker.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import time
from collections import Counter
from typing import TextIO

from runlane.app import Runlane
from runlane.cli.output import attempt_text, fmt_time, progress_text, table, truncate
from runlane.context import JobContext
from runlane.models import Run, RunFilter, RunStatus, to_datetime
from runlane.retry import Retry
from runlane.worker import Worker

DEMO_URL = "sqlite:///runlane-demo.db"
REFRESH = 0.5
LATEST = 12
_MIX = [("fast", 40), ("slow", 20), ("flaky", 25), ("doomed", 15)]


def build_app(url: str = DEMO_URL) -> Runlane:
    """The demo's app. Short timings so that retries and shutdown happen while the user watches."""
    app = Runlane(
        url, shutdown_timeout=2.0, poll_interval=0.5, progress_flush_interval=0.25, lease_timeout=10
    )

    @app.job
    def fast(n: int = 0) -> int:
        return n * 2

    @app.job
    async def slow(ctx: JobContext, seconds: float = 3.0) -> str:
        steps = 10
        for step in range(steps):
            ctx.progress(step * 100 / steps, f"step {step + 1}/{steps}")
            await asyncio.sleep(seconds / steps)
        ctx.progress(100, "done")
        return f"slept {seconds:.1f} s"

    @app.job(retry=Retry(attempts=4, backoff=0.5))
    async def flaky(chance: float = 0.5) -> str:
        await asyncio.sleep(0.2)
        if random.random() < chance:
            raise ConnectionError("the upstream service timed out")
        return "ok"

    @app.job(retry=Retry(attempts=3, backoff=0.3))
    async def doomed() -> None:
        await asyncio.sleep(0.1)
        raise RuntimeError("this job always fails")

    return app


app = build_app()


def _sample_args(job: str, n: int) -> dict[str, object]:
    if job == "fast":
        return {"n": n}
    if job == "slow":
        return {"seconds": round(random.uniform(2.0, 5.0), 1)}
    if job == "flaky":
        return {"chance": 0.5}
    return {}


class _Demo:
    def __init__(self, url: str, runs: int, duration: float, concurrency: int, out: TextIO) -> None:
        self.app = build_app(url)
        self.runs, self.duration, self.concurrency, self.out = runs, duration, concurrency, out
        self.tty = out.isatty()
        self.stop = asyncio.Event()
        self.worker: Worker | None = None
        self.triggered = 0
        self.started = time.monotonic()
        self.last_plain = -1.0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _on_signal(self) -> None:
        if self.stop.is_set() and self.worker is not None:
            self.worker.stop(graceful=False)  # a second Ctrl-C: do not wait for the drain
        self.stop.set()

    async def _feed(self) -> None:
        """Trigger sample runs: spread over the first 60% of the demo, or steadily when it has no end."""
        client = self.app.async_client
        interval = 0.4 if self.duration == 0 or self.runs == 0 else self.duration * 0.6 / self.runs
        interval = min(max(interval, 0.05), 1.0)
        names = [name for name, _ in _MIX]
        weights = [weight for _, weight in _MIX]
        while self.runs == 0 or self.triggered < self.runs:
            job = random.choices(names, weights)[0]
            await client.trigger(job, _sample_args(job, self.triggered))
            self.triggered += 1
            await asyncio.sleep(interval)

    async def _session_runs(self, since: float) -> list[Run]:
        found = self.app.async_client.list_runs(RunFilter(created_after=to_datetime(since)), limit=None)
        return [run async for run in found]

    def _render(self, runs: list[Run], final: bool = False) -> None:
        counts = Counter(run.status.value for run in runs)
        summary = "  ".join(f"{s.value} {counts[s.value]}" for s in RunStatus if counts[s.value])
        if final:
            clock = f"stopped after {self.elapsed:.1f} s"
        else:
            clock = f"{self.elapsed:4.1f} s" + (
                f" / {self.duration:g} s" if self.duration else " (Ctrl-C to stop)"
            )
        header = f"Runlane demo · {self.app.url} · {clock} · {len(runs)} runs"
        if not self.tty and not final:
            if self.elapsed - self.last_plain >= 1.0:  # a log, not an animation: one line a second
                self.last_plain = self.elapsed
                self.out.write(f"[{self.elapsed:5.1f} s] {summary or 'no runs yet'}\n")
                self.out.flush()
            return
        rows = [
            (
                r.id,
                r.job,
                r.status.value,
                attempt_text(r),
                progress_text(r),
                fmt_time(r.created_at),
                "" if r.error is None else truncate(str(r.error), 50),
            )
            for r in runs[:LATEST]
        ]
        view = table(["id", "job", "status", "attempt", "progress", "created (UTC)", "error"], rows)
        screen = "\x1b[H\x1b[2J" if self.tty and not final else ""
        self.out.write(f"{screen}{header}\n{summary or 'no runs yet'}\n\n{view}\n")
        self.out.flush()

    async def main(self) -> int:
        store = None
        try:
            await self.app.migrate()
            store = await self.app.open_store()
            since = store.now() - 1.0  # created_at comes from the store's clock
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal)
            self.out.write(f"Runlane demo on {self.app.url}: jobs {', '.join(sorted(self.app.jobs))}\n")
            self.worker = self.app.worker(concurrency=self.concurrency)
            async with self.worker:
                feeder = asyncio.create_task(self._feed(), name="runlane-demo-feed")
                while not self.stop.is_set() and (self.duration == 0 or self.elapsed < self.duration):
                    self._render(await self._session_runs(since))
                    try:
                        async with asyncio.timeout(REFRESH):
                            await self.stop.wait()
                    except TimeoutError:
                        pass
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
                if feeder.done() and not feeder.cancelled() and feeder.exception() is not None:
                    raise feeder.exception()  # type: ignore[misc]
                timeout = self.app.settings.shutdown_timeout
                self.out.write(f"\nstopping the worker (running attempts get up to {timeout:g} s)…\n")
                self.out.flush()
            runs = await self._session_runs(since)
            self._render(runs, final=True)
            self._summary(runs)
            return 0
        finally:
            await self.app.aclose()

    def _summary(self, runs: list[Run]) -> None:
        counts = Counter(run.status for run in runs)
        retried = sum(1 for run in runs if run.attempt > 1)
        finished = sum(n for status, n in counts.items() if status.is_terminal)
        lines = [
            "",
            f"summary: {len(runs)} runs triggered in {self.elapsed:.1f} s, {finished} finished, "
            f"{retried} needed more than one attempt",
        ]
        lines += [f"  {status.value:<10} {counts[status]}" for status in RunStatus if counts[status]]
        waiting = len(runs) - finished
        if waiting:
            lines.append(
                f"{waiting} run{'s are' if waiting > 1 else ' is'} not finished; {'they resume' if waiting > 1 else 'it resumes'} with "
                f"`runlane worker runlane.demo:app --url {self.app.url}`"
            )
        lines.append(f"inspect them with `runlane runs --url {self.app.url}` and `runlane run ID --url …`")
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()


def run_demo(url: str = DEMO_URL, *, runs: int = 40, duration: float = 20.0, concurrency: int = 8) -> int:
    """Run the demo to its end (``duration`` seconds, or Ctrl-C when 0); returns the exit status."""
    return asyncio.run(_Demo(url, runs, duration, concurrency, sys.stdout).main())
