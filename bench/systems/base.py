"""The one small interface every system implements, and what the adapters share.

An adapter owns one system: its store (reset to empty by ``setup``), a client in the harness process, and its
workers, which always run as separate OS processes started through the system's own CLI. Job bodies are no-ops
that only tell ``bench.probe`` they ran, so every system is timed the same way.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

ROOT = Path(os.environ.get("BENCH_ROOT") or Path(__file__).absolute().parents[2])
OUT = ROOT / "bench" / "out"
PG_BASE = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/11")
DATA_DIR = Path(os.environ.get("BENCH_DATA", str(OUT / "data")))
PROBE_ROOT = Path(os.environ.get("BENCH_PROBE_ROOT", "/dev/shm/runlane-bench"))

T = TypeVar("T")


@runtime_checkable
class System(Protocol):
    """One queue system under test.

    ``enqueue_*`` methods enqueue no-op jobs; the harness times them. ``start_workers`` returns at once (the
    processes boot in the background); the harness learns that jobs ran through ``bench.probe``.
    """

    name: str
    #: workload -> why it is not applicable (e.g. RQ has no in-process concurrency for w5)
    unsupported: dict[str, str]

    def setup(self) -> None:
        """Empty the store (drop/recreate the database, flush the Redis db, delete files), open a client."""

    def enqueue_one(self, n: int) -> None:
        """Enqueue ``n`` no-op jobs, one call (one round trip) at a time."""

    def enqueue_bulk(self, n: int) -> None:
        """Enqueue ``n`` no-op jobs through the system's bulk API (or its fastest documented equivalent)."""

    def enqueue_probe(self, seq: int) -> None:
        """Enqueue one latency-probe job (its body calls ``probe.start(seq)``)."""

    def enqueue_sleepers(self, seqs: Sequence[int]) -> None:
        """Bulk-enqueue jobs that sleep 50 ms (``probe.start`` / sleep / ``probe.end``)."""

    def start_workers(self, processes: int, concurrency: int) -> None:
        """Start ``processes`` worker processes, each running ``concurrency`` jobs at once."""

    def stop_workers(self) -> None:
        """Stop the workers (SIGTERM, then SIGKILL after a grace period)."""

    def teardown(self) -> None:
        """Close clients; stop workers if still running."""

    def describe(self) -> str:
        """One line: versions and the configuration used."""


class Workers:
    """Worker processes started through a system's CLI, each in its own process group (so forked children are
    stopped with their parent)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_path: Path | None = None

    def start(self, commands: Sequence[Sequence[str]], env: dict[str, str], log_name: str) -> None:
        logs = OUT / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"{log_name}.log"
        log = self.log_path.open("ab")
        full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        for command in commands:
            self.procs.append(
                subprocess.Popen(
                    list(command),
                    env=full_env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        log.close()

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"worker {proc.args!r} exited with {proc.returncode}; see {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            try:  # the group too: forked children may outlive a parent that already exited
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(timeout=10)
        self.procs.clear()


def bin_path(name: str) -> str:
    """A console script of the interpreter running the harness (the bench venv)."""
    return str(Path(sys.executable).parent / name)


def reset_pg_database(name: str) -> str:
    """Drop and recreate a PostgreSQL database; returns its URL."""
    import psycopg

    with psycopg.connect(f"{PG_BASE}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_BASE}/{name}"


def drop_pg_database(name: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG_BASE}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def reset_redis() -> None:
    """Flush the one Redis database the benchmark uses (never the others)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    client.close()


def reset_sqlite(path: Path) -> None:
    """Delete an SQLite database and its side files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(f"{path}.wake", ignore_errors=True)


def version(dist: str) -> str:
    from importlib.metadata import version as _version

    return _version(dist)


class Base:
    """Shared plumbing: the worker group, an event loop for async clients, defaults for the interface."""

    name: ClassVar[str] = "?"
    unsupported: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        self.workers = Workers()
        self._runner: asyncio.Runner | None = None
        self.log_name = self.name

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on this adapter's own long-lived event loop (async clients keep their pools)."""
        if self._runner is None:
            self._runner = asyncio.Runner()
        return self._runner.run(coro)

    def env(self) -> dict[str, str]:
        return {}

    def worker_commands(self, processes: int, concurrency: int) -> list[list[str]]:
        raise NotImplementedError

    def start_workers(self, processes: int, concurrency: int) -> None:
        self.workers.start(self.worker_commands(processes, concurrency), self.env(), self.log_name)

    def stop_workers(self) -> None:
        self.workers.stop()

    def close_client(self) -> None:
        """Close what ``setup`` opened (the event loop is closed by ``teardown``)."""

    def teardown(self) -> None:
        self.workers.stop()
        try:
            self.close_client()
        finally:
            if self._runner is not None:
                self._runner.close()
                self._runner = None
