"""Wake-ups: payload-free "something changed" signals that let idle loops react at once.

A notification only shortens a wait; nothing relies on it for correctness, so every waiter also has a timeout
(the poll interval) and re-reads the store. Generations avoid the lost-wake-up race: a waiter snapshots the
generation *before* it reads the store and waits only if nothing was signalled since.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Literal

Topic = Literal["work", "change", "cancel"]
TOPICS: tuple[Topic, ...] = ("work", "change", "cancel")
"""``work``: runs may have become claimable. ``change``: some run changed status or got events.
``cancel``: some running run was cancelled, so workers should check the leases they hold."""


class Notifier:
    """Thread-safe and loop-agnostic: any thread may notify; waiters on any event loop are woken."""

    def __init__(self) -> None:
        self._on_first_wait: Callable[[Topic], None] | None = None
        self._waited: set[Topic] = set()
        self._lock = threading.Lock()
        self._generation: dict[Topic, int] = dict.fromkeys(TOPICS, 0)
        self._last: dict[Topic, float] = dict.fromkeys(TOPICS, float("-inf"))
        self._waiters: dict[Topic, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {
            t: set() for t in TOPICS
        }

    def on_first_wait(self, hook: Callable[[Topic], None] | None) -> None:
        """Call ``hook`` at the first ``wait`` for each topic from now on: a store that receives other
        processes' wake-ups only for what something waits for (a process that only triggers waits for
        nothing) starts receiving them there."""
        self._on_first_wait = hook
        self._waited = set()

    def generation(self, topic: Topic) -> int:
        return self._generation[topic]

    def last_signalled(self, topic: Topic) -> float:
        """When ``topic`` was last signalled (``time.monotonic()``), or -inf."""
        return self._last[topic]

    def notify(self, *topics: Topic) -> None:
        woken: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        now = time.monotonic()
        with self._lock:
            for topic in topics:
                self._generation[topic] += 1
                self._last[topic] = now
                woken.extend(self._waiters[topic])
                self._waiters[topic].clear()
        for loop, event in woken:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed; its waiter is gone with it
                pass

    async def wait(
        self, topic: Topic, since: int, timeout: float | None, *, event: asyncio.Event | None = None
    ) -> bool:
        """Wait until ``topic`` moves past generation ``since``; ``False`` on timeout.

        A caller may pass its own ``event`` so that a local kick (a freed slot, a new waiter) ends the same
        wait; it should clear that event before it snapshots the generation for the next round.
        """
        if topic not in self._waited:
            self._waited.add(topic)
            if self._on_first_wait is not None:
                self._on_first_wait(topic)
        event = event if event is not None else asyncio.Event()
        if event.is_set():
            return True
        entry = (asyncio.get_running_loop(), event)
        with self._lock:
            if self._generation[topic] != since:
                return True
            self._waiters[topic].add(entry)
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            with self._lock:
                self._waiters[topic].discard(entry)
