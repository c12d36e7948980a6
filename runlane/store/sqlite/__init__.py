"""The SQLite store: one writer thread with group commit, WAL readers, cross-process wake-ups."""

from runlane.store.sqlite.store import SQLiteStore

__all__ = ["SQLiteStore"]
