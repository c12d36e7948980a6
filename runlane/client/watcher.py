"""One watcher per client and loop turns many waits into one store read per change.

Without it, N callers waiting on N runs would each re-read their run on every change in the store (a
thundering herd); with it, one task reads all watched runs in one query and resolves their futures.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from runlane.errors import RunNotFound
from runlane.models import Run
from runlane.store import Store

_CHUNK = 500


class RunWatcher:
    def __init__(self, store: Store, poll_interval: float) -> None:
        self._store = store
        self._poll_interval = poll_interval
        self._waiters: defaultdict[int, list[asyncio.Future[Run]]] = defaultdict(list)
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def wait_terminal(self, run_id: int, timeout: float | None = None) -> Run:
        """The run once it is terminal. Raises RunNotFound, or TimeoutError after ``timeout`` seconds."""
        future: asyncio.Future[Run] = asyncio.get_running_loop().create_future()
        self._waiters[run_id].append(future)
        self._kick.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._watch(), name="runlane-run-watcher")
        try:
            async with asyncio.timeout(timeout):
                return await future
        finally:
            futures = self._waiters.get(run_id)
            if futures is not None:
                if future in futures:
                    futures.remove(future)
                if not futures:
                    del self._waiters[run_id]

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._task = None

    async def _watch(self) -> None:
        notifier = self._store.notifier
        while self._waiters:
            self._kick.clear()
            generation = notifier.generation("change")
            ids = list(self._waiters)
            try:
                found: dict[int, Run] = {}
                for start in range(0, len(ids), _CHUNK):
                    for fetched in await self._store.get_runs(ids[start : start + _CHUNK]):
                        found[fetched.id] = fetched
            except Exception as exc:  # the store is down: let every waiter see why
                for futures in list(self._waiters.values()):
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                return
            for run_id in ids:
                run = found.get(run_id)
                if run is not None and not run.status.is_terminal:
                    continue
                for future in self._waiters.get(run_id, []):
                    if not future.done():
                        if run is None:
                            future.set_exception(RunNotFound(run_id))
                        else:
                            future.set_result(run)
            if any(not f.done() for futures in self._waiters.values() for f in futures):
                await notifier.wait("change", generation, self._poll_interval, event=self._kick)
            else:
                await asyncio.sleep(0)  # let the resolved waiters unregister before we look again
