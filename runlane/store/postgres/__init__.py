"""The PostgreSQL store: ``postgresql://user@host/db`` (psycopg 3, pooled, SKIP LOCKED claims, LISTEN/NOTIFY)."""

from runlane.store.postgres.store import PostgresStore

__all__ = ["PostgresStore"]
