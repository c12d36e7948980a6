"""The execution ledger: what job bodies actually did, recorded outside the Runlane store.

Each execution appends a row before the job does anything and stamps its end when the body returns, so a
killed worker leaves an open row. The file is SQLite in WAL mode with ``synchronous=FULL`` and shared by every
worker process; timestamps are wall-clock seconds (all processes run on one host), comparable with the
nemesis log and the client log.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from harness.skew import real_time  # true time even in a process whose clock the test skews

ENV = "CHAOS_LEDGER"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    job TEXT NOT NULL,
    key TEXT,
    worker_id TEXT,
    pid INTEGER NOT NULL,
    t_start REAL NOT NULL,
    t_end REAL,
    outcome TEXT,
    scheduled_at REAL
);
CREATE INDEX IF NOT EXISTS executions_run ON executions (run_id, attempt);
"""


@dataclass(frozen=True, slots=True)
class Execution:
    id: int
    run_id: int
    attempt: int
    job: str
    key: str | None
    worker_id: str | None
    pid: int
    t_start: float
    t_end: float | None
    outcome: str | None
    scheduled_at: float | None


class Ledger:
    """Thread-safe (one connection per thread) and multi-process safe (SQLite locking, long busy timeout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._local = threading.local()
        with self._connect() as conn:
            conn.executescript(_SCHEMA)

    @classmethod
    def from_env(cls) -> Ledger:
        return cls(os.environ[ENV])

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def start(
        self,
        *,
        run_id: int,
        attempt: int,
        job: str,
        key: str | None,
        worker_id: str | None,
        scheduled_at: float | None = None,
    ) -> int:
        cur = self._conn().execute(
            "INSERT INTO executions (run_id, attempt, job, key, worker_id, pid, t_start, scheduled_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, attempt, job, key, worker_id, os.getpid(), real_time(), scheduled_at),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def end(self, execution_id: int, outcome: str) -> None:
        self._conn().execute(
            "UPDATE executions SET t_end = ?, outcome = ? WHERE id = ?", (real_time(), outcome, execution_id)
        )

    def executions(self) -> list[Execution]:
        rows = self._conn().execute(
            "SELECT id, run_id, attempt, job, key, worker_id, pid, t_start, t_end, outcome, scheduled_at"
            " FROM executions ORDER BY t_start, id"
        )
        return [Execution(*row) for row in rows]

    def count(self) -> int:
        row = self._conn().execute("SELECT count(*) FROM executions").fetchone()
        return int(row[0])

    def close(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
