"""The systems under test: name -> module (each module defines `System`, and optionally `cleanup()`)."""

from __future__ import annotations

import importlib
from types import ModuleType

SYSTEMS: dict[str, str] = {
    "runlane_sqlite": "bench.systems.runlane_sqlite",
    "runlane_pg": "bench.systems.runlane_pg",
    "pgqueuer": "bench.systems.pgqueuer_pg",
    "procrastinate": "bench.systems.procrastinate_pg",
    "huey_sqlite": "bench.systems.huey_sqlite",
    "huey_sqlite_default": "bench.systems.huey_sqlite_default",
    "celery_redis": "bench.systems.celery_redis",
    "dramatiq_redis": "bench.systems.dramatiq_redis",
    "rq_redis": "bench.systems.rq_redis",
    "taskiq_redis": "bench.systems.taskiq_redis",
}

#: what `bench.run` runs when --systems is not given (huey_sqlite_default is opt-in)
DEFAULT_SYSTEMS = [
    "runlane_sqlite",
    "runlane_pg",
    "pgqueuer",
    "procrastinate",
    "huey_sqlite",
    "celery_redis",
    "dramatiq_redis",
    "rq_redis",
    "taskiq_redis",
]


def module(name: str) -> ModuleType:
    if name not in SYSTEMS:
        raise SystemExit(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")
    return importlib.import_module(SYSTEMS[name])
