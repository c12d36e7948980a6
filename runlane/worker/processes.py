"""``runlane worker --processes N``: a supervisor that keeps N worker processes alive.

Each child is a fresh ``runlane worker`` process rather than a ``fork()`` of this one: the parent may
already hold threads (the client's loop, a store's writer) and fork would copy their locks mid-use. The
children run in their own process group so that a terminal's Ctrl-C reaches only the supervisor, which
forwards it once: otherwise every child would see the supervisor's forward as a *second* signal and stop
at once instead of draining. On Linux a child also gets SIGTERM if the supervisor dies (SIGKILL, OOM).

The first children start while the supervisor still loads the app and checks the store: most of a
worker's start-up is its imports, and the supervisor's check used to come before all of it. They wait at a
gate (one byte on a pipe, before they load the app) until the check passed, and leave quietly if it did
not, so a wrong APP, URL or schema is still reported once, by the supervisor.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

log = logging.getLogger("runlane.supervisor")

_FORWARDED = (signal.SIGTERM, signal.SIGINT)
_QUICK_CRASH = 10.0  # a child that dies sooner than this after starting counts towards giving up
_MAX_QUICK_CRASHES = 5
GATE_ENV = "RUNLANE_WORKER_GATE"
"""Set for children started by ``start_gated``: the pipe to read the go-ahead from (see ``wait_at_gate``)."""


def wait_at_gate() -> bool:
    """In a child: if started gated, block until the supervisor's go-ahead; False if it never comes."""
    gate = os.environ.pop(GATE_ENV, None)  # not for this child's own children (job processes)
    if gate is None:
        return True
    fd = int(gate)
    try:
        return os.read(fd, 1) == b"g"
    finally:
        os.close(fd)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    delay: float = 0.0
    quick_crashes: int = 0
    exit_code: int | None = None  # set once the slot is finished for good


class Supervisor:
    """Start ``processes`` copies of ``argv``; restart one that exits unexpectedly (with a growing delay);
    on SIGTERM/SIGINT forward the signal to every child and wait for them all. In ``burst`` mode a child
    that exits 0 is done, not restarted. ``run()`` returns 0 when every child ended with status 0."""

    def __init__(
        self,
        argv: Sequence[str],
        processes: int,
        *,
        burst: bool = False,
        env: dict[str, str] | None = None,
        restart_delay: float = 1.0,
        max_restart_delay: float = 30.0,
    ) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        self.argv = list(argv)
        self.burst = burst
        self.env = env
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.slots = [_Slot(i) for i in range(processes)]
        self._wake = threading.Event()
        self._signals: list[signal.Signals] = []
        self._stopping = False
        self._gate: int | None = None  # the write end of the gate's pipe, while children wait at it

    def start_gated(self) -> None:
        """Start every child now; each waits at the gate until ``release`` (or leaves at ``abort``)."""
        read_end, self._gate = os.pipe()
        try:
            for slot in self.slots:
                self._spawn(slot, gate=read_end)
        finally:
            os.close(read_end)

    def release(self) -> None:
        """Let the gated children go on (one byte each)."""
        if self._gate is not None:
            os.write(self._gate, b"g" * len(self.slots))
            os.close(self._gate)
            self._gate = None
            for slot in self.slots:
                if slot.process is not None:
                    log.info("started worker process %d (pid %d)", slot.index + 1, slot.process.pid)

    def abort(self, timeout: float = 10.0) -> None:
        """Send the gated children away (they read end of file and exit 0) and wait for them."""
        if self._gate is not None:
            os.close(self._gate)
            self._gate = None
        for slot in self.slots:
            if slot.process is not None:
                try:
                    slot.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    slot.process.kill()
                    slot.process.wait()
                slot.process = None

    def _spawn(self, slot: _Slot, gate: int | None = None) -> None:
        preexec: Callable[[], None] | None = _die_with_parent if sys.platform.startswith("linux") else None
        env = self.env
        fds: tuple[int, ...] = ()
        if gate is not None:
            env = {**(os.environ if env is None else env), GATE_ENV: str(gate)}
            fds = (gate,)
        slot.process = subprocess.Popen(self.argv, env=env, process_group=0, preexec_fn=preexec, pass_fds=fds)
        slot.started_at = time.monotonic()
        slot.restart_at = None
        if gate is None:  # a gated start is logged once released: it may still be called off
            log.info("started worker process %d (pid %d)", slot.index + 1, slot.process.pid)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signal.Signals(signum))
        self._wake.set()

    def _on_child(self, signum: int, frame: FrameType | None) -> None:
        self._wake.set()

    def run(self) -> int:
        previous: dict[signal.Signals, Any] = {}
        for sig in (*_FORWARDED, signal.SIGCHLD):
            previous[sig] = signal.signal(sig, self._on_child if sig is signal.SIGCHLD else self._on_signal)
        try:
            self.release()
            for slot in self.slots:
                if slot.process is None:
                    self._spawn(slot)
            while not all(slot.exit_code is not None for slot in self.slots):
                self._wake.wait(0.5)
                self._wake.clear()
                self._forward_signals()
                self._reap()
                self._restart_due()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        codes = [slot.exit_code for slot in self.slots]
        log.info("all worker processes ended (exit codes %s)", codes)
        return 0 if all(code == 0 for code in codes) else 1

    def _forward_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            first = not self._stopping
            self._stopping = True
            log.info("%s: %s", sig.name, "stopping worker processes" if first else "forwarding again")
            for slot in self.slots:
                if slot.process is not None and slot.process.poll() is None:
                    slot.process.send_signal(sig)

    def _reap(self) -> None:
        for slot in self.slots:
            process = slot.process
            if process is None or slot.exit_code is not None or process.poll() is None:
                continue
            code = process.returncode
            slot.process = None
            if self._stopping or (self.burst and code == 0):
                slot.exit_code = code
                continue
            lived = time.monotonic() - slot.started_at
            slot.quick_crashes = slot.quick_crashes + 1 if lived < _QUICK_CRASH else 0
            if slot.quick_crashes >= _MAX_QUICK_CRASHES:
                log.error("worker process %d keeps crashing (exit %s); giving up", slot.index + 1, code)
                slot.exit_code = code if code else 1
                self._stop_all()
                continue
            slot.delay = min(max(slot.delay * 2, self.restart_delay), self.max_restart_delay)
            if lived >= _QUICK_CRASH:
                slot.delay = self.restart_delay
            slot.restart_at = time.monotonic() + slot.delay
            log.warning(
                "worker process %d (pid %d) exited with %s; restarting in %.1f s",
                slot.index + 1,
                process.pid,
                code,
                slot.delay,
            )

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is None or slot.exit_code is not None:
                continue
            if self._stopping:
                slot.exit_code, slot.restart_at = 0, None
            elif now >= slot.restart_at:
                self._spawn(slot)

    def _stop_all(self) -> None:
        self._signals.append(signal.SIGTERM)
        self._wake.set()
