"""Numbered SQL migrations shipped inside the package: ``migrations/0001_initial.sql``, ``0002_….sql``.

Each backend applies them in order, each in its own transaction, recording the version in its
``runlane_migrations`` table; a test proves a migrated schema equals a fresh one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(package: str) -> list[Migration]:
    """The migrations in ``package`` (e.g. ``runlane.store.sqlite.migrations``), ordered by version."""
    found: list[Migration] = []
    for entry in resources.files(package).iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations in {package} are not numbered 1..n without gaps: {versions}")
    return found


def latest_version(package: str) -> int:
    return len(load_migrations(package))
