"""Stores for the in-process chaos tests (T05, T14, T17), which test the stores' logic and atomicity, not
durability (T09 does that): thousands of small transactions each, so they skip the per-commit flush that
would otherwise dominate their time on a slow CI disk.

SQLite files go to tmpfs (``/dev/shm``) when there is one: WAL, locks and several processes work there as on
disk, without fsync. PostgreSQL sessions get ``synchronous_commit=off``: a commit is visible and ordered as
before, only its WAL flush is deferred.

The ``backend_url`` fixture (imported by the chaos conftest) runs a test on both backends; ``lane_urls``
gives a test several independent stores in that one database or directory, for work that must not share a
store's global verbs (the reaper, expiry) but may run side by side.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

TMPFS = Path("/dev/shm")


def sqlite_url(tmp_path: Path) -> tuple[str, Path | None]:
    """A SQLite URL on tmpfs if available (and the directory to remove afterwards), else under ``tmp_path``."""
    if TMPFS.is_dir() and os.access(TMPFS, os.W_OK):
        directory = Path(tempfile.mkdtemp(prefix="runlane-chaos-", dir=TMPFS))
        return f"sqlite:///{directory / 'runlane.db'}", directory
    return f"sqlite:///{tmp_path / 'runlane.db'}", None


def pg_url_without_flush(url: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-c%20synchronous_commit%3Doff"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty store URL on each backend (see the module docstring)."""
    if request.param == "sqlite":
        url, directory = sqlite_url(tmp_path)
        try:
            yield url
        finally:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
    else:
        yield pg_url_without_flush(request.getfixturevalue("pg_url"))


def lane_urls(url: str, name: str, count: int) -> list[str]:
    """``count`` independent stores beside ``url``: SQLite files next to it, or PostgreSQL schemas in its
    database (created here, empty; ``drop_lanes`` removes them). The URLs are for Runlane, not libpq."""
    if not url.startswith("postgres"):
        base = url.removesuffix(".db")
        return [f"{base}-{name}{k}.db" for k in range(count)]
    import psycopg

    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    urls = []
    with psycopg.connect(urlunsplit(parts._replace(query="")), autocommit=True) as conn:
        for k in range(count):
            schema = f"{name}{k}"
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            conn.execute(f'CREATE SCHEMA "{schema}"')
            options = f"{query.get('options', '')} -c search_path={schema}".strip()
            urls.append(urlunsplit(parts._replace(query=urlencode({**query, "options": options}))))
    return urls


def drop_lanes(url: str, name: str, count: int) -> None:
    if not url.startswith("postgres"):
        return  # the files go with their directory
    import psycopg

    parts = urlsplit(url)
    with psycopg.connect(urlunsplit(parts._replace(query="")), autocommit=True) as conn:
        for k in range(count):
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}{k}" CASCADE')
