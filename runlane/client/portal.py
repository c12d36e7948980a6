"""An event loop on a background thread, borrowed by blocking callers (the idea of an anyio portal).

The blocking client sends every call here instead of calling ``asyncio.run`` per call, which would throw
away connection pools, watchers and wake-up listeners each time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_CANCEL_GRACE = 10.0


class Portal:
    def __init__(self, name: str = "runlane-portal") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=serve, name=self._name, daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the portal loop and block for its result. An interrupt in the caller (Ctrl-C)
        cancels the coroutine and waits for it to unwind, so that calls owning a run cancel that run."""
        loop = self.loop
        if self._thread is threading.current_thread():
            coro.close()
            raise RuntimeError("a blocking Runlane call was made on the client's own loop thread")
        finished = threading.Event()

        async def tracked() -> T:
            try:
                return await coro
            finally:
                finished.set()

        future = asyncio.run_coroutine_threadsafe(tracked(), loop)
        try:
            return future.result()
        except BaseException:
            if not future.done():
                future.cancel()
                finished.wait(_CANCEL_GRACE)
            raise

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        """A blocking iterator over an async iterator that lives on the portal loop."""
        try:
            while True:
                try:
                    item: T = self.call(agen.__anext__())  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
                yield item
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None and self._loop is not None and not self._loop.is_closed():
                self.call(aclose())

    def close(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()
