"""Shared fixtures: one parametrized store over every backend, throwaway PostgreSQL databases.

A missing PostgreSQL server skips its tests locally and fails them in CI (``CI=true``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from runlane.store import Store, create_store

PG_ADMIN_URL = os.environ.get("RUNLANE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgres"]
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(autouse=True)
def _clean_runlane_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RUNLANE_") and name != "RUNLANE_TEST_PG_ADMIN":
            monkeypatch.delenv(name)


def _pg_unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(f"PostgreSQL unavailable: {reason}")


def _pg_with_db(dbname: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{dbname}"


def create_pg_database() -> str:
    """A fresh, empty database on the test server; returns its URL."""
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - dev extra missing
        _pg_unavailable(f"psycopg not installed ({exc})")
        raise
    name = f"runlane_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        _pg_unavailable(str(exc).strip())
    return _pg_with_db(name)


def drop_pg_database(url: str) -> None:
    import psycopg

    name = url.rpartition("/")[2]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def reset_pg_database(url: str) -> None:
    """Empty every Runlane table except the migration record, so one migrated database serves many tests."""
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT quote_ident(tablename) FROM pg_tables WHERE schemaname = current_schema() "
            "AND tablename <> 'runlane_migrations'"
        ).fetchall()
        if rows:
            conn.execute(f"TRUNCATE {', '.join(r[0] for r in rows)} RESTART IDENTITY CASCADE")


@pytest.fixture(scope="session")
def pg_session_url() -> Iterator[str]:
    url = create_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture
def pg_url(pg_session_url: str) -> str:
    """A migrated-or-empty PostgreSQL database with no rows in it."""
    reset_pg_database(pg_session_url)
    return pg_session_url


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty store on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runlane.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """An opened, migrated store on each backend."""
    s = create_store(store_url)
    await s.open()
    await s.migrate()
    try:
        yield s
    finally:
        await s.close()
