"""A TCP fault proxy between Runlane processes and PostgreSQL (RELIABILITY.md §1 nemesis; no root needed).

It runs its own event loop in a daemon thread, so tests drive it with plain calls from any thread. Faults:

- ``blackhole(True)``: a partition. Bytes stop flowing both ways and new connections are accepted but left
  silent; nothing is closed. Bytes are held, not dropped, like TCP retransmitting through a broken link, so
  a statement sent during the partition reaches the server after the heal (the case fencing must survive).
- ``reset_all()``: every live connection is aborted with a TCP RST on both sides (a server crash or restart
  as the client sees it).
- ``set_delay(s)``: latency added to every chunk, each direction.
- ``reset_after(pattern, p, rng)``: with probability ``p``, a client→server chunk containing ``pattern`` is
  forwarded and then the client connection is reset before the server's reply is relayed: the statement
  ran, its caller cannot know (an indeterminate commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")
_CHUNK = 65536


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    doomed: bool = False  # reset_after matched: drop whatever the server says next and reset the client
    tail: bytes = b""  # the end of the last client chunk, so that a pattern split across chunks still matches
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Abort with RST (SO_LINGER 0), not FIN: the peer sees 'connection reset', as after a crash."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """``FaultProxy(host, port).start()`` listens on 127.0.0.1:``.port`` and forwards to ``host:port``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = 0
        self.connections_accepted = 0
        self.resets_injected = 0  # connections reset by reset_after
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._open: asyncio.Event | None = None  # set while not black-holed
        self._conns: set[_Conn] = set()
        self._delay = 0.0
        self._pattern: bytes | None = None
        self._probability = 0.0
        self._rng: random.Random = random.Random()
        self._lock = threading.Lock()  # guards the reset_after settings read by the loop thread

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    async def _start(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        conns = list(self._conns)
        tasks = [t for conn in conns for t in conn.tasks]
        for conn in conns:
            self._drop(conn)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let the aborted transports finish closing

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def url_for(self, pg_url: str) -> str:
        """``pg_url`` with its host and port replaced by this proxy's (user, database and query kept)."""
        parts = urlsplit(pg_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    @property
    def live_connections(self) -> int:
        return len(self._conns)

    # -- faults ----------------------------------------------------------------------------------------------

    def blackhole(self, on: bool) -> None:
        async def apply() -> None:
            assert self._open is not None
            if on:
                self._open.clear()
            else:
                self._open.set()

        self._call(apply())

    def reset_all(self) -> int:
        """Abort every live connection with RST; how many there were."""

        async def apply() -> int:
            conns = list(self._conns)
            for conn in conns:
                self._drop(conn)
            return len(conns)

        return self._call(apply())

    def set_delay(self, seconds: float) -> None:
        self._delay = max(seconds, 0.0)

    def reset_after(
        self, pattern: bytes | None, probability: float, rng: random.Random | None = None
    ) -> None:
        """Arm (or, with ``pattern=None`` or ``probability=0``, disarm) the indeterminate-commit fault."""
        with self._lock:
            self._pattern = pattern or None
            self._probability = probability
            self._rng = rng or random.Random()

    # -- forwarding ------------------------------------------------------------------------------------------

    def _drop(self, conn: _Conn) -> None:
        _rst(conn.client)
        _rst(conn.upstream)
        self._conns.discard(conn)
        current = asyncio.current_task()
        for task in conn.tasks:
            if task is not current:
                task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._open is not None
        self.connections_accepted += 1
        conn = _Conn(writer)
        self._conns.add(conn)
        me = asyncio.current_task()
        if me is not None:
            conn.tasks.append(me)
        try:
            await self._open.wait()  # a partition leaves new connections silent, not refused
            if conn not in self._conns:
                return  # reset while it waited
            try:
                up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
            except OSError:
                self._drop(conn)
                return
            conn.upstream = up_writer
            if conn not in self._conns:
                _rst(up_writer)
                return
            to_server = asyncio.create_task(self._pump(conn, reader, up_writer, upstream=True))
            to_client = asyncio.create_task(self._pump(conn, up_reader, writer, upstream=False))
            conn.tasks += [to_server, to_client]
            await asyncio.gather(to_server, to_client, return_exceptions=True)
        except asyncio.CancelledError:
            pass
        finally:
            if conn in self._conns:
                self._conns.discard(conn)
                for w in (conn.client, conn.upstream):
                    if w is not None:
                        w.close()

    async def _pump(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        assert self._open is not None
        try:
            while True:
                await self._open.wait()
                data = await reader.read(_CHUNK)
                if not data:
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                if self._delay:
                    await asyncio.sleep(self._delay)
                await self._open.wait()  # read just before a partition began: held until the heal
                if not upstream and conn.doomed:
                    # The server answered the matched statement: it ran. The client never hears so.
                    self.resets_injected += 1
                    self._drop(conn)
                    return
                writer.write(data)
                await writer.drain()
                if upstream and self._matches(conn, data):
                    conn.doomed = True
        except (ConnectionError, OSError):
            if conn in self._conns:
                self._drop(conn)

    def _matches(self, conn: _Conn, data: bytes) -> bool:
        with self._lock:
            pattern, probability, rng = self._pattern, self._probability, self._rng
            if pattern is None or probability <= 0:
                return False
            window = conn.tail + data
            conn.tail = window[-(len(pattern) - 1) :] if len(pattern) > 1 else b""
            return pattern in window and rng.random() < probability
