"""Schema migrations on SQLite: numbered scripts, each applied in its own ``BEGIN IMMEDIATE`` transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from runlane.store.migrations import Migration
from runlane.store.sqlite.sql import Q


def split_statements(script: str) -> list[str]:
    """Statements of a migration script. ``executescript`` would COMMIT our open transaction first."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    return statements


def applied_version(conn: sqlite3.Connection) -> int:
    if conn.execute(Q["migrations_table_exists"]).fetchone() is None:
        return 0
    return int(conn.execute(Q["applied_version"]).fetchone()[0])


def migrate(conn: sqlite3.Connection, now: float, migrations: Sequence[Migration]) -> list[int]:
    """Each migration in its own immediate transaction, re-checking the version under the lock, so two
    processes migrating at once apply each migration exactly once."""
    applied: list[int] = []
    for migration in migrations:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if applied_version(conn) >= migration.version:
                conn.execute("ROLLBACK")
                continue
            for statement in split_statements(migration.sql):
                conn.execute(statement)
            conn.execute(Q["record_migration"], (migration.version, migration.name, now))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        applied.append(migration.version)
    return applied
