"""LISTEN on the wake-up channels and feed the store's notifier, on a thread of its own.

One dedicated connection per store, outside the pool (a pooled connection would be handed to queries, and
LISTEN belongs to a session). It lives on a private event loop in a daemon thread so that it keeps working
whichever loops the store is used from, and while any of them is blocked by a job.

Notifications only shorten waits: every waiter also polls. So a dropped connection is simply reconnected with
capped backoff, and since wake-ups sent while it was down are lost, every topic is signalled once whenever a
session starts listening (also the first: it starts when something first waits, which may have missed one). Notifications that carry this store's own token are skipped: the store already signalled those
locally after its commit.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import psycopg

from runlane.store.notify import TOPICS, Notifier, Topic

log = logging.getLogger("runlane.store.postgres")

CHANNELS: dict[Topic, str] = {"work": "runlane_work", "change": "runlane_change", "cancel": "runlane_cancel"}
TOPIC_OF: dict[str, Topic] = {channel: topic for topic, channel in CHANNELS.items()}

_MIN_BACKOFF = 0.05
_MAX_BACKOFF = 2.0  # a lost listener is back within 2 s once the server is


class Listener:
    def __init__(self, conninfo: str, notifier: Notifier, token: str) -> None:
        self._conninfo = conninfo
        self._notifier = notifier
        self._token = token
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = threading.Event()
        self._listening = threading.Condition()
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

    def wait_listening(self, timeout: float, *, after: int = 0) -> bool:
        """Block until more than ``after`` LISTEN sessions were established and one is live."""
        with self._listening:
            return self._listening.wait_for(
                lambda: self.connections > after and self.backend_pid is not None, timeout
            )

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
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
            try:
                async with conn:
                    for channel in CHANNELS.values():
                        await conn.execute(f"LISTEN {channel}")
                    with self._listening:
                        self.backend_pid = conn.info.backend_pid
                        self.connections += 1
                        self._listening.notify_all()
                    self._notifier.notify(*TOPICS)
                    backoff = _MIN_BACKOFF
                    async for note in conn.notifies():
                        topic = TOPIC_OF.get(note.channel)
                        if topic is not None and note.payload != self._token:
                            self._notifier.notify(topic)
            except psycopg.Error as exc:
                log.warning("LISTEN connection lost (%s); reconnecting in %.2fs", str(exc).strip(), backoff)
            finally:
                self.backend_pid = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)
