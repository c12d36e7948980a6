"""The execution ledger: what job bodies actually did, recorded outside the Runlane store.

Each execution appends a row before the job does anything and stamps its end when the body returns, so a
killed worker leaves an open row. The ledger is a directory with one SQLite file (WAL, ``synchronous=FULL``)
per process: a SIGSTOPped worker caught mid-write holds only its own file's lock, so it can never stall the
other workers' job bodies (with one shared file, it stalled them for the whole pause and their bodies looked
like zombies running on). Timestamps are wall-clock seconds (all processes run on one host), comparable with
the nemesis log and the client log.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from harness.skew import real_time  # true time even in a process whose clock the test skews

ENV = "CHAOS_LEDGER"  # the ledger directory
_SUFFIX = ".exec.db"
_ROWS_PER_PID = 10**9

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


_CREATING = threading.Lock()


def _create(file: Path) -> None:
    """Build a shard under a temporary name and move it into place: a reader listing the directory never
    opens a file without its table, and no two connections race to create the schema."""
    building = file.with_name(file.name + ".new")
    building.unlink(missing_ok=True)
    conn = sqlite3.connect(building, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
    finally:
        conn.close()
    building.rename(file)


class Ledger:
    """Thread-safe (one connection per thread and file) and multi-process safe (a file per writing process).

    An execution's ``id`` is unique across the directory: the writer's pid and its row id in that file."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        Path(self.path).mkdir(parents=True, exist_ok=True)
        self._local = threading.local()

    @classmethod
    def from_env(cls) -> Ledger:
        return cls(os.environ[ENV])

    def _conn(self, file: Path) -> sqlite3.Connection:
        conns: dict[Path, sqlite3.Connection] | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(file)
        if conn is None:
            conn = conns[file] = sqlite3.connect(
                file, timeout=60, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _own(self) -> tuple[int, sqlite3.Connection]:
        pid = os.getpid()
        file = Path(self.path) / f"{pid}{_SUFFIX}"
        with _CREATING:
            if not file.exists():
                _create(file)
        return pid, self._conn(file)

    def _shards(self) -> list[tuple[int, sqlite3.Connection]]:
        files = sorted(Path(self.path).glob(f"*{_SUFFIX}"))
        return [(int(f.name.removesuffix(_SUFFIX)), self._conn(f)) for f in files]

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
        pid, conn = self._own()
        cur = conn.execute(
            "INSERT INTO executions (run_id, attempt, job, key, worker_id, pid, t_start, scheduled_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, attempt, job, key, worker_id, pid, real_time(), scheduled_at),
        )
        assert cur.lastrowid is not None
        return pid * _ROWS_PER_PID + cur.lastrowid

    def end(self, execution_id: int, outcome: str) -> None:
        pid, conn = self._own()
        assert execution_id // _ROWS_PER_PID == pid, "an execution ends in the process that started it"
        conn.execute(
            "UPDATE executions SET t_end = ?, outcome = ? WHERE id = ?",
            (real_time(), outcome, execution_id % _ROWS_PER_PID),
        )

    def executions(self) -> list[Execution]:
        rows: list[Execution] = []
        for pid, conn in self._shards():
            for row in conn.execute(
                "SELECT id, run_id, attempt, job, key, worker_id, pid, t_start, t_end, outcome, scheduled_at"
                " FROM executions"
            ):
                rows.append(Execution(pid * _ROWS_PER_PID + row[0], *row[1:]))
        rows.sort(key=lambda e: (e.t_start, e.id))
        return rows

    def count(self) -> int:
        return sum(
            int(conn.execute("SELECT count(*) FROM executions").fetchone()[0]) for _, conn in self._shards()
        )

    def close(self) -> None:
        conns: dict[Path, sqlite3.Connection] | None = getattr(self._local, "conns", None)
        for conn in (conns or {}).values():
            conn.close()
        self._local.conns = {}
