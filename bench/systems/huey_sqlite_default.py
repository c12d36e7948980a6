"""Huey with SqliteHuey and the consumer's default polling (-d 0.1 -m 10 -b 1.15)."""

from __future__ import annotations

from bench.systems import huey_sqlite


class System(huey_sqlite.System):
    name = "huey_sqlite_default"
    polling = ()
