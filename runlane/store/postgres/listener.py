"""LISTEN on the wake-up channels and feed the store's notifier, on a thread of its own.

One dedicated connection per store, outside the pool (a pooled connection would be handed to queries, and
LISTEN belongs to a session). It lives on a private event loop in a daemon thread so that it keeps working
whichever loops the store is used from, and while any of them is blocked by a job.

It listens only to the channels of the topics something in this process waits for (``want``): a worker never
waits for ``change``, which every claim and finish of every worker notifies, and each notification wakes the
session's server process and this thread (2-process drains ran ~20 % faster without it).

Notifications only shorten waits: every waiter also polls. So a dropped connection is simply reconnected with
capped backoff, and since wake-ups may have been missed before a channel was listened to (while down, or
before anything wanted it), each topic is signalled once when its LISTEN takes effect. Notifications that
carry this store's own token are skipped: the store already signalled those locally after its commit.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Iterable

import psycopg

from runlane.store.notify import Notifier, Topic

log = logging.getLogger("runlane.store.postgres")

CHANNELS: dict[Topic, str] = {"work": "runlane_work", "change": "runlane_change", "cancel": "runlane_cancel"}
TOPIC_OF: dict[str, Topic] = {channel: topic for topic, channel in CHANNELS.items()}


@functools.cache
def channel_array(*topics: Topic) -> str:
    """The ``text[]`` parameter of a statement's notifications (built once per set of topics)."""
    return "{" + ",".join(CHANNELS[t] for t in topics) + "}"


_MIN_BACKOFF = 0.05
_MAX_BACKOFF = 2.0  # a lost listener is back within 2 s once the server is


class Listener:
    def __init__(self, conninfo: str, notifier: Notifier, token: str, topics: Iterable[Topic]) -> None:
        self._conninfo = conninfo
        self._notifier = notifier
        self._token = token
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed: asyncio.Event | None = None  # set when ``want`` adds topics to a live session
        self._ready = threading.Event()
        self._listening = threading.Condition()  # guards the four fields below
        self._wanted: set[Topic] = set(topics)
        self.topics: frozenset[Topic] = frozenset()
        """The topics the live session listens to."""
        self.backend_pid: int | None = None
        """The server process of the live LISTEN session, None while disconnected (for tests and operators)."""
        self.connections = 0
        """How many times a LISTEN session was established."""

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._thread_main, name="runlane-pg-listener", daemon=True)
        self._thread.start()
        self._ready.wait()

    def want(self, topics: Iterable[Topic]) -> None:
        """Listen to these topics too (from any thread); the live session adds them at once."""
        with self._listening:
            new = set(topics) - self._wanted
            if not new:
                return
            self._wanted |= new
        loop, changed = self._loop, self._changed
        if loop is not None and changed is not None:
            try:
                loop.call_soon_threadsafe(changed.set)
            except RuntimeError:  # stopped: there is no session to change
                pass

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the listening task and join the thread. Blocking: call it from a worker thread."""
        thread, loop, task = self._thread, self._loop, self._task
        if thread is None:
            return
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop already finished
                pass
        thread.join(timeout)
        self._thread = None

    def wait_listening(self, timeout: float, *, after: int = 0, topics: Iterable[Topic] = ()) -> bool:
        """Block until more than ``after`` LISTEN sessions were established and one is live, listening to
        ``topics``."""
        wanted = set(topics)
        with self._listening:
            return self._listening.wait_for(
                lambda: self.connections > after and self.backend_pid is not None and wanted <= self.topics,
                timeout,
            )

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._changed = asyncio.Event()
        try:
            self._task = loop.create_task(self._run())
            self._ready.set()
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        finally:
            self._ready.set()
            loop.close()

    async def _run(self) -> None:
        backoff = _MIN_BACKOFF
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            except psycopg.Error as exc:
                log.warning("LISTEN connection failed (%s); retrying in %.2fs", str(exc).strip(), backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            sessions = self.connections
            try:
                async with conn:
                    await self._session(conn)
            except psycopg.Error as exc:
                if self.connections > sessions:  # it was live: a new outage starts from the shortest wait
                    backoff = _MIN_BACKOFF
                log.warning("LISTEN connection lost (%s); reconnecting in %.2fs", str(exc).strip(), backoff)
            finally:
                with self._listening:
                    self.backend_pid = None
                    self.topics = frozenset()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _session(self, conn: psycopg.AsyncConnection[object]) -> None:
        """Listen to the wanted topics, receive until more are wanted, listen to those too, and so on."""
        assert self._changed is not None
        listened: set[Topic] = set()
        while True:
            self._changed.clear()
            with self._listening:
                new = sorted(self._wanted - listened)
            for topic in new:
                await conn.execute(f"LISTEN {CHANNELS[topic]}")
            listened.update(new)
            with self._listening:
                if self.backend_pid is None:
                    self.backend_pid = conn.info.backend_pid
                    self.connections += 1
                self.topics = frozenset(listened)
                self._listening.notify_all()
            if new:
                self._notifier.notify(*new)
            receiving = asyncio.ensure_future(self._receive(conn))
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait((receiving, changed), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for future in (receiving, changed):
                    future.cancel()
                await asyncio.gather(receiving, changed, return_exceptions=True)
            if not receiving.cancelled():
                receiving.result()  # the connection failed: raise to reconnect
                raise psycopg.OperationalError("the notification stream ended")

    async def _receive(self, conn: psycopg.AsyncConnection[object]) -> None:
        async for note in conn.notifies():
            topic = TOPIC_OF.get(note.channel)
            if topic is not None and note.payload != self._token:
                self._notifier.notify(topic)
