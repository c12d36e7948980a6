"""A per-process wall-clock offset: the harness's stand-in for libfaketime (not on the machine, and CI cannot
rely on apt).

``CHAOS_CLOCK_OFFSET`` (seconds) shifts the process's wall clock from start; ``CHAOS_CLOCK_FILE`` names a
file holding an offset in seconds that the test may rewrite to jump the clock mid-run (re-read at most every
50 ms).
Like ``faketime`` with ``FAKETIME_DONT_FAKE_MONOTONIC=1``, only the wall clock moves: ``time.time`` and
``time.time_ns`` are patched, monotonic clocks are not (an NTP step or a wrong RTC moves the wall clock only;
a monotonic clock that jumps back would stall every asyncio timer, which no real host does).

``datetime.now()`` is not patched: CPython's C ``datetime`` reads the system clock directly, and replacing the
class would break ``isinstance`` checks in drivers. Runlane reads the wall clock only through ``time.time``
(``test_clock_skew.py`` checks the sources for that), so the emulation reaches every clock read it makes.
It cannot reach C libraries (SQLite's ``'now'``, the PostgreSQL server): the database keeps true time, which
is the scenario under test. Harness code that must record true time (the ledger) uses ``real_time``.
"""

from __future__ import annotations

import os
import time

OFFSET_ENV = "CHAOS_CLOCK_OFFSET"
FILE_ENV = "CHAOS_CLOCK_FILE"

real_time = time.time
real_time_ns = time.time_ns
_REFRESH = 0.05


class _Offset:
    def __init__(self, fixed: float, path: str | None) -> None:
        self.fixed = fixed
        self.path = path
        self.value = fixed
        self.read_at = -1.0

    def __call__(self) -> float:
        if self.path is None:
            return self.fixed
        now = time.monotonic()
        if now - self.read_at >= _REFRESH:
            self.read_at = now
            try:
                with open(self.path) as f:
                    self.value = self.fixed + float(f.read().strip() or 0)
            except (OSError, ValueError):
                pass  # being rewritten: keep the last offset
        return self.value


def install_from_env() -> bool:
    """Patch this process's wall clock if the environment asks for it; True when it did."""
    fixed = float(os.environ.get(OFFSET_ENV, "0") or 0)
    path = os.environ.get(FILE_ENV) or None
    if not fixed and path is None:
        return False
    offset = _Offset(fixed, path)

    def skewed_time() -> float:
        return real_time() + offset()

    def skewed_time_ns() -> int:
        return real_time_ns() + int(offset() * 1e9)

    time.time = skewed_time
    time.time_ns = skewed_time_ns
    return True


def set_offset(path: str | os.PathLike[str], seconds: float) -> None:
    """Jump the clock of every process reading ``path`` (atomically: a reader never sees half a number)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        f.write(repr(float(seconds)))
    os.replace(tmp, path)
