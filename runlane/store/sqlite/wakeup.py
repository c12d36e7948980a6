"""Cross-process wake-ups for SQLite: Unix datagram sockets in a directory next to the database.

SQLite has no LISTEN/NOTIFY, yet an idle worker in another process must start a new run within milliseconds
rather than a poll interval. Each open store binds ``<db>.wake/<pid>-<random>.sock`` and a receiver thread
turns incoming datagrams into local notifications. After each commit group the writer sends one tiny
datagram (topic letters, never run data) to every other socket there. Everything here is best effort: a
lost or failed wake-up only delays a waiter until its poll interval, so no error ever reaches a write.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable

from runlane.store.notify import Topic

log = logging.getLogger("runlane.store.sqlite")

_LETTERS: dict[Topic, str] = {"work": "w", "change": "c", "cancel": "x"}
_TOPICS: dict[int, Topic] = {ord(letter): topic for topic, letter in _LETTERS.items()}
_MAX_PATH = 103  # sockaddr_un.sun_path holds 107 bytes and a NUL on Linux, 103 on macOS
_NAME_LEN = 22  # "/" + "<pid up to 7 digits>-<8 hex>.sock"
_RELIST_AFTER = 1.0
"""Seconds after which the peer list is re-read even if the directory mtime looks unchanged (coarse mtimes)."""


def wake_dir(db_path: str) -> str:
    """``<db>.wake``, or a per-database directory in the temp dir when that path is too long for a socket."""
    path = os.path.abspath(db_path) + ".wake"
    if len(os.fsencode(path)) + _NAME_LEN <= _MAX_PATH:
        return path
    digest = hashlib.sha256(os.path.realpath(db_path).encode()).hexdigest()[:20]
    return os.path.join(tempfile.gettempdir(), f"runlane-wake-{digest}")


def encode(topics: Iterable[Topic]) -> bytes:
    return "".join(sorted(_LETTERS[t] for t in topics)).encode()


def decode(data: bytes) -> set[Topic]:
    return {_TOPICS[b] for b in data if b in _TOPICS}


class WakeChannel:
    """This process's socket, its receiver thread, and the sender to every peer on the same database."""

    def __init__(self, db_path: str, on_topics: Callable[[set[Topic]], None]) -> None:
        self.directory = wake_dir(db_path)
        self._on_topics = on_topics
        self._path = os.path.join(self.directory, f"{os.getpid()}-{secrets.token_hex(4)}.sock")
        self._recv: socket.socket | None = None
        self._send: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._peers: list[str] = []
        self._listed_mtime = -1
        self._listed_at = 0.0

    @property
    def path(self) -> str:
        return self._path

    def start(self) -> bool:
        """Bind and start receiving; False (and no wake-ups) where Unix datagram sockets are unavailable."""
        if not hasattr(socket, "AF_UNIX"):
            return False
        try:
            os.makedirs(self.directory, exist_ok=True)
            recv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                recv.bind(self._path)
            except OSError:
                recv.close()
                raise
            send = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            send.setblocking(False)  # a peer with a full buffer is already awake: never wait for it
        except OSError as exc:
            log.debug("cross-process wake-ups disabled for %s: %s", self.directory, exc)
            return False
        self._recv, self._send = recv, send
        self._thread = threading.Thread(target=self._receive, name="runlane-sqlite-wakeup", daemon=True)
        self._thread.start()
        return True

    def _receive(self) -> None:
        recv = self._recv
        assert recv is not None
        while True:
            try:
                data = recv.recv(64)
            except OSError:
                return
            if self._stopping:
                return
            topics = decode(data)
            if topics:
                try:
                    self._on_topics(topics)
                except Exception:  # pragma: no cover - notify is simple; never let the receiver die
                    log.exception("wake-up handler failed")

    def _refresh_peers(self) -> None:
        try:
            mtime = os.stat(self.directory).st_mtime_ns
        except OSError:
            self._peers = []
            return
        now = time.monotonic()
        if mtime == self._listed_mtime and now - self._listed_at < _RELIST_AFTER:
            return
        try:
            names = os.listdir(self.directory)
        except OSError:
            names = []
        own = os.path.basename(self._path)
        self._peers = [os.path.join(self.directory, n) for n in names if n.endswith(".sock") and n != own]
        self._listed_mtime = mtime
        self._listed_at = now

    def send(self, topics: Iterable[Topic]) -> None:
        """One datagram to each peer. Sockets that refuse belong to dead processes and are removed."""
        sender = self._send
        if sender is None or self._stopping:
            return
        self._refresh_peers()
        if not self._peers:
            return
        payload = encode(topics)
        dead: list[str] = []
        for peer in self._peers:
            try:
                sender.sendto(payload, peer)
            except (ConnectionRefusedError, FileNotFoundError):
                dead.append(peer)
            except OSError:  # full buffer (already woken), permissions, …: skip this time
                pass
        for peer in dead:
            with contextlib.suppress(OSError):
                os.unlink(peer)
        if dead:
            self._peers = [p for p in self._peers if p not in dead]

    def close(self) -> None:
        """Stop the receiver and remove our socket. Idempotent. The directory stays for the other processes."""
        if self._stopping:
            return
        self._stopping = True
        if self._recv is not None:
            # Wake the blocked recv(): shutdown does on Linux; a datagram to ourselves covers the rest.
            with contextlib.suppress(OSError):
                self._recv.shutdown(socket.SHUT_RDWR)
            if self._thread is not None and self._thread.is_alive():
                with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                    s.settimeout(1.0)
                    s.sendto(b"", self._path)
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            os.unlink(self._path)
        for sock in (self._recv, self._send):
            if sock is not None:
                sock.close()
        self._recv = self._send = None
