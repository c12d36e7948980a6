"""Stores, chosen by URL: ``sqlite:///path.db``, ``sqlite:///:memory:``, ``postgresql://user@host/db``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from runlane.errors import StoreUnavailable
from runlane.store.base import (
    ConflictPolicy,
    EventDraft,
    Finish,
    Lease,
    NewRun,
    Store,
    split_url,
)

__all__ = ["ConflictPolicy", "EventDraft", "Finish", "Lease", "NewRun", "Store", "create_store"]


def create_store(url: str, *, clock: Callable[[], float] | None = None, **options: Any) -> Store:
    """Build (not open) the store for ``url``. ``clock`` replaces the store's clock in tests."""
    try:
        scheme, _ = split_url(url)
    except ValueError as exc:
        raise StoreUnavailable(str(exc)) from None
    if scheme == "sqlite":
        from runlane.store.sqlite import SQLiteStore

        return SQLiteStore(url, clock=clock, **options)
    if scheme in {"postgresql", "postgres"}:
        try:
            from runlane.store.postgres import PostgresStore
        except ImportError as exc:
            raise StoreUnavailable(
                "PostgreSQL support needs psycopg 3: pip install 'runlane[postgres]'"
            ) from exc
        return PostgresStore(url, clock=clock, **options)
    raise StoreUnavailable(
        f"unsupported store URL scheme {scheme!r} in {url!r}: use sqlite:// or postgresql://"
    )
