"""Foreign processes on a Runlane SQLite file (T22), with plain ``sqlite3`` and no Runlane code.

``python -m harness.sqlite_nemesis reader DB SECONDS``: a dashboard polling every 100 ms, each poll a read
transaction that stays open for 250 ms, so two or three snapshots are always open and the WAL always has a
reader (the case that starves checkpoints).
``python -m harness.sqlite_nemesis writer DB SECONDS``: another application sharing the file: every 200 ms a
``BEGIN IMMEDIATE`` transaction that writes its own table and holds the write lock for 50 ms.
Each prints one JSON line of counts at the end (errors included: a foreign process may see SQLITE_BUSY too,
but only the store's are under test).
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections import deque

BUSY_MS = 10_000


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_MS / 1000, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
    return conn


def reader(path: str, seconds: float, *, every: float = 0.1, hold: float = 0.25) -> dict[str, int]:
    counts = {"reads": 0, "errors": 0}
    open_txs: deque[tuple[float, sqlite3.Connection]] = deque()
    idle: list[sqlite3.Connection] = []
    end = time.monotonic() + seconds
    next_poll = time.monotonic()
    while time.monotonic() < end:
        now = time.monotonic()
        while open_txs and now - open_txs[0][0] >= hold:
            _, conn = open_txs.popleft()
            conn.execute("COMMIT")
            idle.append(conn)
        if now >= next_poll:
            conn = idle.pop() if idle else _connect(path)
            try:
                conn.execute("BEGIN")
                conn.execute(
                    "SELECT status, count(*) FROM runlane_runs GROUP BY status"
                ).fetchall()  # the snapshot starts here and stays until COMMIT
                conn.execute("SELECT id, job, status FROM runlane_runs ORDER BY id DESC LIMIT 50").fetchall()
                open_txs.append((now, conn))
                counts["reads"] += 1
            except sqlite3.Error:
                counts["errors"] += 1
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                idle.append(conn)
            next_poll += every
        time.sleep(0.005)
    for _, conn in open_txs:
        conn.execute("COMMIT")
    return counts


def writer(path: str, seconds: float, *, every: float = 0.2, hold: float = 0.05) -> dict[str, int]:
    counts = {"writes": 0, "errors": 0}
    conn = _connect(path)
    conn.execute("CREATE TABLE IF NOT EXISTS chaos_foreign (id INTEGER PRIMARY KEY, at REAL, pad TEXT)")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO chaos_foreign (at, pad) VALUES (?, ?)", (time.time(), "x" * 2000))
            time.sleep(hold)  # the lock is held: every store writer waits behind it
            conn.execute("COMMIT")
            counts["writes"] += 1
        except sqlite3.Error:
            counts["errors"] += 1
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        time.sleep(every)
    return counts


if __name__ == "__main__":
    mode, db, duration = sys.argv[1], sys.argv[2], float(sys.argv[3])
    result = (reader if mode == "reader" else writer)(db, duration)
    print(json.dumps(result), flush=True)
