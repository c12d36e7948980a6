"""The nemesis log: every fault injected, with its target and when it started and ended."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

# Faults after which a re-execution of the target's runs is justified (it died, stalled or was cut off).
INTERRUPTING = frozenset({"kill", "pause", "partition", "term", "outage", "crash"})
# Faults that end their target process.
ENDING = frozenset({"kill", "term", "crash"})


@dataclass(slots=True)
class Fault:
    kind: str
    pid: int | None  # None: every process (a store outage)
    t_start: float
    t_end: float | None = None
    detail: str = ""

    @property
    def until(self) -> float:
        return self.t_end if self.t_end is not None else self.t_start


@dataclass
class FaultLog:
    faults: list[Fault] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def instant(self, kind: str, pid: int | None, detail: str = "") -> Fault:
        now = time.time()
        return self.add(Fault(kind, pid, now, now, detail))

    def begin(self, kind: str, pid: int | None, detail: str = "") -> Fault:
        return self.add(Fault(kind, pid, time.time(), None, detail))

    def end(self, fault: Fault) -> None:
        fault.t_end = time.time()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def snapshot(self) -> list[Fault]:
        with self._lock:
            return list(self.faults)

    def against(self, pid: int) -> list[Fault]:
        return [f for f in self.snapshot() if f.pid is None or f.pid == pid]

    @property
    def last_fault_end(self) -> float | None:
        faults = self.snapshot()
        return max((f.until for f in faults), default=None)

    def count(self, kind: str | None = None) -> int:
        return sum(1 for f in self.snapshot() if kind is None or f.kind == kind)
