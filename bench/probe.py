"""What the job bodies record, the same way for every system, at (almost) no cost.

Each worker process maps two small files under ``BENCH_PROBE_DIR`` (a tmpfs directory made by the harness):

* ``c.<pid>``: this process's completion counter plus the wall-clock times of its first and last completion
  (``done()``, called at the end of every no-op body);
* ``slots``: one (start, end) pair of wall-clock times per sequence number (``start(seq)`` / ``end(seq)``, used by
  the latency and concurrency workloads, whose jobs carry their sequence number as their only argument).

Writes are plain stores into shared memory: no system call, no network round trip, no lock shared between
processes. The harness sums the counters and reads the slots; it never talks to the system under test for that.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time

COUNTER = struct.Struct("<qdd")  # completions, first completion, last completion (time.time())
SLOT = struct.Struct("<dd")  # start, end (time.time())

_lock = threading.Lock()
_pid = 0
_count = 0
_first = 0.0
_counter: mmap.mmap | None = None
_slots: mmap.mmap | None = None


def _map(path: str, size: int | None) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if size is not None:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)


def _open() -> None:
    """(Re)open this process's files; called again after a fork, since the pid changed."""
    global _pid, _count, _first, _counter, _slots
    directory = os.environ["BENCH_PROBE_DIR"]
    _counter = _map(os.path.join(directory, f"c.{os.getpid()}"), COUNTER.size)
    slots = os.path.join(directory, "slots")
    _slots = _map(slots, None) if os.path.exists(slots) else None
    _count, _first, _pid = 0, 0.0, os.getpid()


def done() -> None:
    """One more completion in this process."""
    global _count, _first
    with _lock:
        if _pid != os.getpid():
            _open()
        assert _counter is not None
        now = time.time()
        _count += 1
        if not _first:
            _first = now
        COUNTER.pack_into(_counter, 0, _count, _first, now)


def start(seq: int) -> None:
    """The job with sequence number ``seq`` has started."""
    if _pid != os.getpid():
        with _lock:
            if _pid != os.getpid():
                _open()
    assert _slots is not None, "the harness did not create the slots file"
    struct.pack_into("<d", _slots, seq * SLOT.size, time.time())


def end(seq: int) -> None:
    """The job with sequence number ``seq`` has ended."""
    assert _slots is not None
    struct.pack_into("<d", _slots, seq * SLOT.size + 8, time.time())
