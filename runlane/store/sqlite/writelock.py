"""The queue in front of SQLite's write lock, shared by every Runlane process on one database file.

SQLite's busy handler polls for the write lock with ever longer sleeps (up to 100 ms). With many processes
writing one file, a writer that has waited a while checks rarely and keeps losing the lock to newer ones: it
can starve for seconds — long enough to miss heartbeats and lose its leases while its process is healthy.
So each writer thread first takes an exclusive ``flock`` on ``<db>-wlock`` and only then ``BEGIN
IMMEDIATE``: waiters sleep in the kernel, which wakes them the moment the lock is released (no polling, no
CPU while waiting), and drops the lock of a process that dies. SQLite's lock stays the authority: a foreign
process writing the file is still waited for by the busy timeout.

A blocking ``flock`` cannot time out, so a contended acquisition waits on a helper thread with a descriptor
of its own (flock locks belong to open file descriptions: sharing one would let the helper's lock merge with
the caller's): if it takes longer than the timeout, the caller gives up (as on SQLITE_BUSY) and the helper
releases the lock as soon as it gets it, unless a new acquisition is waiting by then.

The file's content is one shared note (``checkpoint_note``): when a forced WAL checkpoint may next be tried
and the current back-off, so that the processes of one file back off together rather than each one stalling
the writers in turn while a reader holds on (connection.py).
"""

from __future__ import annotations

import logging
import os
import struct
import sys
import threading
import time

if sys.platform != "win32":
    import fcntl

log = logging.getLogger("runlane.store.sqlite")

_NOTE = struct.Struct("<dd")  # (not_before: wall-clock seconds, backoff: seconds)


class WriteLock:
    """An exclusive lock on a file, acquired with a timeout. One holder at a time: the writer thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._helper_fd: int | None = os.open(path, os.O_RDONLY)
        except OSError:
            os.close(self._fd)
            raise
        self._held: int | None = None  # the descriptor that holds the lock
        self._cond = threading.Condition()
        self._wanted = False  # a caller waits for the helper to get the lock
        self._handed = False  # the helper got it for that caller
        self._helper: threading.Thread | None = None
        self._broken = False  # the helper's flock failed: callers poll instead
        self._closed = False

    @classmethod
    def open(cls, db_path: str) -> WriteLock | None:
        """The lock next to ``db_path``; None (writers then rely on the busy timeout alone) if it cannot be
        created, e.g. in a read-only directory, or where there is no ``flock`` (Windows)."""
        if sys.platform == "win32":
            return None
        try:
            return cls(db_path + "-wlock")
        except OSError as exc:
            log.debug("no write lock file for %s: %s", db_path, exc)
            return None

    def acquire(self, timeout: float) -> bool:
        """Take the lock within ``timeout`` seconds; False if it could not be had in time."""
        fd = self._fd
        if fd is None:
            return False
        deadline = time.monotonic() + timeout
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._held = fd
            return True
        except BlockingIOError:
            pass
        if self._broken:
            return self._poll(fd, timeout)
        with self._cond:
            self._wanted = True
            if self._helper is None:
                self._helper = threading.Thread(
                    target=self._wait_in_kernel, name="runlane-sqlite-wlock", daemon=True
                )
                self._helper.start()
            self._cond.notify_all()
            try:
                got = self._cond.wait_for(lambda: self._handed or self._broken, timeout) and self._handed
            except BaseException:  # an interrupt (a caller on the main thread): let go of what was handed
                if self._handed:
                    self._held = self._helper_fd
                    self.release()
                raise
            finally:
                self._wanted = self._handed = False
                self._cond.notify_all()
            if got:
                self._held = self._helper_fd
                return True
        return self._poll(fd, max(0.0, deadline - time.monotonic())) if self._broken else False

    def _poll(self, fd: int, timeout: float) -> bool:
        """The fallback if the helper failed: try every millisecond (fair enough, rarely needed)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._held = fd
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.001)

    def release(self) -> None:
        fd, self._held = self._held, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def checkpoint_note(self) -> tuple[float, float]:
        """The shared ``(not_before, backoff)`` of forced checkpoints; ``(0, 0)`` if none was written."""
        fd = self._fd
        try:
            data = os.pread(fd, _NOTE.size, 0) if fd is not None else b""
        except OSError:
            data = b""
        return _NOTE.unpack(data) if len(data) == _NOTE.size else (0.0, 0.0)

    def write_checkpoint_note(self, not_before: float, backoff: float) -> None:
        """Record it (while holding the lock, so that writes do not interleave)."""
        if self._fd is not None:
            try:
                os.pwrite(self._fd, _NOTE.pack(not_before, backoff), 0)
            except OSError as exc:
                log.debug("could not write the checkpoint note: %s", exc)

    def _wait_in_kernel(self) -> None:
        """The helper: takes the lock with its own descriptor for a waiting caller. It owns that descriptor
        once started, so that a close cannot pull it from under a ``flock`` in progress."""
        fd = self._helper_fd
        assert fd is not None
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._wanted or self._closed)
                    if self._closed:
                        return
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)  # sleeps until the holder lets go (the GIL is released)
                except OSError as exc:  # e.g. ENOLCK: never expected, but a waiter must not wait for nothing
                    log.warning("waiting for the SQLite write lock failed (%s); polling instead", exc)
                    with self._cond:
                        self._broken = True
                        self._cond.notify_all()
                    return
                with self._cond:
                    if self._closed:
                        return
                    if self._wanted:
                        self._handed = True
                        self._cond.notify_all()
                        self._cond.wait_for(lambda: not self._handed or self._closed)  # the caller has it
                    else:  # the caller gave up meanwhile
                        fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the descriptors, which releases the lock (the helper closes its own when it wakes)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            helper = self._helper
            fds = [self._fd] if helper is not None else [self._fd, self._helper_fd]
            self._fd = self._helper_fd = self._held = None
            self._cond.notify_all()
        for fd in fds:
            if fd is not None:
                os.close(fd)
        if helper is not None:
            helper.join(timeout=0.5)  # at once unless it sleeps in flock for an abandoned acquisition
