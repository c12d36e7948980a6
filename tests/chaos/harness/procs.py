"""Worker processes under test: started with the real ``runlane worker`` command, killed, paused, terminated
and restarted by the nemesis, every action logged in the fault log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.faults import Fault, FaultLog

HARNESS_ROOT = Path(__file__).resolve().parent.parent  # tests/chaos: makes ``harness`` importable
APP = "harness.chaos_app:app"


FULL = os.environ.get("RUNLANE_CHAOS_TIER", "smoke").lower() == "full"
"""The full tier (``make chaos``) rather than CI's smoke scale."""


@dataclass(frozen=True)
class Timing:
    """Lease settings for a chaos run: the plan's, lease 5 s and heartbeat 1 s, in the full tier; its CI tier's,
    lease 2 s and heartbeat 0.5 s, in smoke runs. A test may set its own (T07's lease outlives a restart)."""

    lease_timeout: float = 5.0 if FULL else 2.0
    heartbeat_interval: float = 1.0 if FULL else 0.5
    reaper_interval: float = 1.0
    poll_interval: float = 0.5
    shutdown_timeout: float = 3.0


def sqlite_write_lock_holder(url: str) -> int | None:
    """The pid holding the write lock of a Runlane SQLite file (the ``flock`` on ``<db>-wlock`` that its
    writers queue on before ``BEGIN IMMEDIATE``), from ``/proc/locks``; None if free or not SQLite/Linux."""
    if not url.startswith("sqlite:///"):
        return None
    try:
        inode = os.stat(url.removeprefix("sqlite:///") + "-wlock").st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()  # "1: FLOCK ADVISORY WRITE <pid> <maj>:<min>:<inode> 0 EOF"
        if len(fields) >= 6 and fields[1:4:2] == ["FLOCK", "WRITE"] and fields[5].endswith(f":{inode}"):
            return int(fields[4])
    return None


def chaos_env(url: str, ledger_path: Path, timing: Timing, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNLANE_")}
    pythonpath = [str(HARNESS_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(
        PYTHONPATH=os.pathsep.join(pythonpath),
        PYTHONUNBUFFERED="1",
        CHAOS_LEDGER=str(ledger_path),
        RUNLANE_URL=url,
        RUNLANE_LEASE_TIMEOUT=str(timing.lease_timeout),
        RUNLANE_HEARTBEAT_INTERVAL=str(timing.heartbeat_interval),
        RUNLANE_REAPER_INTERVAL=str(timing.reaper_interval),
        RUNLANE_POLL_INTERVAL=str(timing.poll_interval),
        RUNLANE_SHUTDOWN_TIMEOUT=str(timing.shutdown_timeout),
    )
    env.update(extra)
    return env


def migrate(env: dict[str, str], cwd: Path) -> None:
    """Create the schema and record the chaos app's job catalogue (so client-only triggers validate)."""
    subprocess.run(
        [sys.executable, "-m", "runlane", "migrate", APP],
        env=env,
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=60,
    )


@dataclass(eq=False)
class WorkerSlot:
    index: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    pids: list[int] = field(default_factory=list)
    held: bool = False  # stopped on purpose: the supervisor must not restart it
    paused: bool = False
    locked: Fault | None = None  # paused while holding the SQLite file's write lock (a store outage)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class WorkerPool:
    """``size`` worker processes; a supervisor thread restarts dead ones after ``restart_delay``."""

    def __init__(
        self,
        env: dict[str, str],
        workdir: Path,
        faults: FaultLog,
        *,
        size: int,
        concurrency: int = 8,
        queues: Sequence[str] | None = None,
        restart_delay: float | None = 0.5,
        command: Sequence[str] | None = None,
        env_for: dict[int, dict[str, str]] | None = None,
    ) -> None:
        self.env = env
        self.workdir = workdir
        self.faults = faults
        self.concurrency = concurrency
        self.queues = queues
        self.restart_delay = restart_delay
        self.command = list(command) if command is not None else None
        self.env_for = env_for or {}
        self.slots = [WorkerSlot(i, workdir / f"worker-{i}.log") for i in range(size)]
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="chaos-supervisor", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def argv(self) -> list[str]:
        if self.command is not None:
            return list(self.command)
        argv = [sys.executable, "-m", "runlane", "worker", APP, "--concurrency", str(self.concurrency)]
        if self.queues:
            argv += ["--queues", ",".join(self.queues)]
        return argv

    def spawn(self, slot: WorkerSlot) -> None:
        env = dict(self.env)
        env.update(self.env_for.get(slot.index, {}))
        with self._lock, open(slot.log_path, "ab") as log:
            slot.proc = subprocess.Popen(
                self.argv(), env=env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
            )
            slot.pids.append(slot.proc.pid)
            slot.paused = False

    def start(self) -> WorkerPool:
        for slot in self.slots:
            self.spawn(slot)
        if self.restart_delay is not None:
            self._supervisor.start()
        return self

    def _supervise(self) -> None:
        dead_since: dict[int, float] = {}
        while not self._stop.wait(0.05):
            with self._lock:
                for slot in self.slots:
                    if slot.held or slot.alive:
                        dead_since.pop(slot.index, None)
                        continue
                    first = dead_since.setdefault(slot.index, time.monotonic())
                    assert self.restart_delay is not None
                    if time.monotonic() - first >= self.restart_delay and not self._stop.is_set():
                        dead_since.pop(slot.index, None)
                        self.spawn(slot)

    def close(self) -> None:
        """Kill everything still running (a test's end; not a fault)."""
        self._stop.set()
        if self._supervisor.is_alive():
            self._supervisor.join(timeout=5)
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                if slot.paused:
                    os.kill(slot.proc.pid, signal.SIGCONT)
                slot.proc.kill()
                slot.proc.wait(timeout=10)

    def stop_all(self, timeout: float = 30.0) -> None:
        """Graceful stop (SIGTERM) of every worker, waiting for them to exit."""
        self._stop.set()
        for slot in self.slots:
            slot.held = True
            if slot.alive:
                assert slot.proc is not None
                if slot.paused:
                    os.kill(slot.proc.pid, signal.SIGCONT)
                slot.proc.terminate()
        for slot in self.slots:
            if slot.proc is not None:
                slot.proc.wait(timeout=timeout)

    # -- faults ------------------------------------------------------------------------------------------------

    def live(self) -> list[WorkerSlot]:
        with self._lock:
            return [s for s in self.slots if s.alive and not s.paused]

    def kill(self, slot: WorkerSlot, detail: str = "") -> Fault | None:
        with self._lock:
            if not slot.alive:
                return None
            assert slot.proc is not None
            if slot.paused:
                os.kill(slot.proc.pid, signal.SIGCONT)
            slot.proc.kill()
            # Stamped once the signal is sent: an execution whose ledger row the process wrote before dying
            # then starts before its kill. Stamped before (as it was), a row written between the stamp and the
            # signal looked like an execution the kill never ended, overlapping its own re-execution (T19).
            fault = self.faults.instant("kill", slot.proc.pid, detail)
            self._unlock(slot)  # the kernel lets go of a dead process's locks
        slot.proc.wait(timeout=10)
        return fault

    def kill_all(self, detail: str = "") -> list[Fault]:
        """SIGKILL every live worker at once (a power cut), then wait for them; no restarts afterwards."""
        faults: list[Fault] = []
        with self._lock:
            self._stop.set()
            for slot in self.slots:
                slot.held = True
                if slot.alive:
                    assert slot.proc is not None
                    slot.proc.kill()  # a stopped process dies of SIGKILL too
                    faults.append(self.faults.instant("kill", slot.proc.pid, detail))  # after: see kill()
        for slot in self.slots:
            if slot.proc is not None:
                slot.proc.wait(timeout=10)
        return faults

    def pause(self, slot: WorkerSlot, detail: str = "") -> Fault | None:
        with self._lock:
            if not slot.alive or slot.paused:
                return None
            assert slot.proc is not None
            os.kill(slot.proc.pid, signal.SIGSTOP)
            # After the signal, like a kill: an execution the process started before it stopped then starts
            # before the pause, and the checker counts it as a fenced zombie (up to the pause) once reclaimed.
            fault = self.faults.begin("pause", slot.proc.pid, detail)
            slot.paused = True
            if sqlite_write_lock_holder(self.env.get("RUNLANE_URL", "")) == slot.proc.pid:
                # Every writer of the file now waits for this process: for them, the store is down.
                slot.locked = self.faults.begin("sqlite_write_locked", slot.proc.pid, "paused holding it")
            return fault

    def resume(self, slot: WorkerSlot, fault: Fault) -> None:
        with self._lock:
            if slot.alive and slot.paused:
                assert slot.proc is not None
                os.kill(slot.proc.pid, signal.SIGCONT)
            slot.paused = False
            self.faults.end(fault)
            self._unlock(slot)

    def _unlock(self, slot: WorkerSlot) -> None:
        if slot.locked is not None:
            self.faults.end(slot.locked)
            slot.locked = None

    def terminate(
        self, slot: WorkerSlot, *, twice_after: float | None = None, detail: str = ""
    ) -> Fault | None:
        """SIGTERM (a deploy); optionally a second SIGTERM ``twice_after`` seconds later."""
        with self._lock:
            if not slot.alive:
                return None
            assert slot.proc is not None
            proc = slot.proc
            fault = self.faults.instant("term", proc.pid, detail)
            proc.terminate()
        if twice_after is not None:
            try:
                proc.wait(timeout=twice_after)
            except subprocess.TimeoutExpired:
                self.faults.instant("term", proc.pid, "second SIGTERM")
                proc.terminate()
        return fault

    def hold(self, slot: WorkerSlot) -> None:
        slot.held = True

    def release(self, slot: WorkerSlot) -> None:
        slot.held = False

    def wait_started(self, timeout: float = 30.0, marker: str = "started:") -> None:
        """Until every live worker's log says it started (its scheduler and claim loop are running), so a
        test's clock starts with the pool up rather than with processes still importing."""
        deadline = time.monotonic() + timeout
        while True:
            waiting = [
                s.index
                for s in self.live()
                if not any(
                    f"-{s.pid}-" in line and marker in line
                    for line in (
                        s.log_path.read_text(errors="replace") if s.log_path.exists() else ""
                    ).splitlines()
                )
            ]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {waiting} did not start within {timeout} s\n{self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        return "\n".join(
            f"--- worker {s.index} (pids {s.pids}) ---\n{s.log_path.read_text(errors='replace')[-4000:]}"
            for s in self.slots
            if s.log_path.exists()
        )
