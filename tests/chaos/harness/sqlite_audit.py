"""Audit of the SQLite store's transactions (T22): every writing transaction must start ``BEGIN IMMEDIATE``.

A deferred transaction that reads and then writes must upgrade its read lock, and in WAL mode that upgrade
fails at once with SQLITE_BUSY when another process committed meanwhile — the busy timeout cannot help. So the
rule is checked on every statement the store runs, through ``sqlite3``'s trace callback installed on each
connection the store opens (``runlane.store.sqlite.connection.CONNECT_HOOKS``). A process audits itself when
``CHAOS_SQLITE_AUDIT`` names a directory: it writes ``<pid>.jsonl`` there, one line per audited connection and
one per violation (a write outside an IMMEDIATE/EXCLUSIVE transaction, autocommit included). PRAGMAs are not
data writes and are not audited.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from pathlib import Path

ENV = "CHAOS_SQLITE_AUDIT"

_COMMENT = re.compile(r"^(\s+|--[^\n]*\n?|/\*.*?\*/)+", re.DOTALL)
_WRITES = frozenset({"INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER", "VACUUM", "ANALYZE"})
_WRITE_IN_CTE = re.compile(r"\b(INSERT|UPDATE|DELETE|REPLACE)\b", re.IGNORECASE)
_lock = threading.Lock()
_installed = False


def _first_word(sql: str) -> tuple[str, str]:
    text = _COMMENT.sub("", sql, count=1)
    word = text.split(None, 1)[0].upper() if text.strip() else ""
    return word, text


def is_write(sql: str) -> bool:
    word, text = _first_word(sql)
    if word in _WRITES:
        return True
    return word == "WITH" and _WRITE_IN_CTE.search(text) is not None


class _Audit:
    """The trace callback of one connection: tracks how the open transaction began."""

    def __init__(self, conn: sqlite3.Connection, writer: bool, out: Path) -> None:
        self._conn = conn  # a cycle through the callback; connections live as long as their store
        self.writer = writer
        self.out = out
        self.mode: str | None = None  # "immediate" | "deferred" | None (no transaction)
        self.immediate = 0

    def __call__(self, sql: str) -> None:
        conn = self._conn
        word, text = _first_word(sql)
        if not conn.in_transaction and word not in {"COMMIT", "END", "ROLLBACK", "RELEASE"}:
            self.mode = None  # whatever ended the last transaction, none is open now
        if word == "BEGIN":
            upper = text.upper()
            self.mode = "immediate" if ("IMMEDIATE" in upper or "EXCLUSIVE" in upper) else "deferred"
            if self.mode == "immediate":
                self.immediate += 1
                if self.immediate == 1:
                    _write(self.out, {"kind": "first_immediate", "writer": self.writer})
            return
        if word == "SAVEPOINT" and self.mode is None:
            self.mode = "deferred"  # a savepoint outside a transaction opens a deferred one
            return
        if is_write(sql) and self.mode != "immediate":
            _write(
                self.out,
                {
                    "kind": "violation",
                    "mode": self.mode or "autocommit",
                    "writer": self.writer,
                    "sql": sql[:300],
                },
            )


def _write(path: Path, record: dict[str, object]) -> None:
    record["pid"] = os.getpid()
    with _lock, open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def install(directory: str | os.PathLike[str]) -> None:
    """Audit every SQLite connection the store opens from now on in this process. Idempotent."""
    global _installed
    from runlane.store.sqlite.connection import CONNECT_HOOKS

    with _lock:
        if _installed:
            return
        _installed = True
    out = Path(directory) / f"{os.getpid()}.jsonl"

    CONNECT_HOOKS.append(lambda conn, writer: audit(conn, writer, out))


def audit(conn: sqlite3.Connection, writer: bool, out: Path) -> None:
    """Audit one connection into the file ``out``."""
    conn.set_trace_callback(_Audit(conn, writer, out))
    _write(out, {"kind": "connection", "writer": writer})


def install_from_env() -> None:
    directory = os.environ.get(ENV)
    if directory:
        install(directory)


def read(directory: str | os.PathLike[str]) -> list[dict[str, object]]:
    records: list[dict[str, object]] = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
    return records
