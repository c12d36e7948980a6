"""Chaos tests (RELIABILITY.md): real worker processes, injected faults, one checker.

``RUNLANE_CHAOS_TIER=full`` (``make chaos``) runs the plan's full scale and records figures; the default is the
smoke scale that CI runs. ``CHAOS_SEED`` replays a randomised run.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.fastdb import backend_url  # noqa: F401  (a fixture, for T05, T14 and T17)
from harness.pgcluster import PgCluster, find_bindir
from harness.scenario import FULL, Scenario

pytestmark = pytest.mark.chaos


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/chaos" in str(item.fspath):
            item.add_marker(pytest.mark.chaos)
            # Real processes and fault timelines: minutes, not the unit tests' 60 s.
            item.add_marker(pytest.mark.timeout(3600 if FULL else 240))


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    value = int(os.environ.get("CHAOS_SEED", random.randrange(1 << 30)))
    print(f"chaos seed for {request.node.nodeid}: CHAOS_SEED={value}")
    return value


def make_scenario(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, seed: int
) -> Iterator[Scenario]:
    url = f"sqlite:///{tmp_path / 'runlane.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    name = request.node.originalname.removeprefix("test_")
    scenario = Scenario(name, backend, url, tmp_path, seed)
    scenario.migrate()
    try:
        yield scenario
    finally:
        scenario.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def scenario(request: pytest.FixtureRequest, tmp_path: Path, seed: int) -> Iterator[Scenario]:
    """A migrated store on each backend with an empty ledger, fault log and client log."""
    yield from make_scenario(request, request.param, tmp_path, seed)


@pytest.fixture
def pg_scenario(request: pytest.FixtureRequest, tmp_path: Path, seed: int) -> Iterator[Scenario]:
    yield from make_scenario(request, "postgres", tmp_path, seed)


@pytest.fixture
def sqlite_scenario(request: pytest.FixtureRequest, tmp_path: Path, seed: int) -> Iterator[Scenario]:
    yield from make_scenario(request, "sqlite", tmp_path, seed)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A throwaway PostgreSQL cluster (created on first use) for tests that stop and start the server."""
    if find_bindir() is None:
        reason = "PostgreSQL server binaries (initdb, pg_ctl) not found"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"PostgreSQL is required in CI: {reason}")
        pytest.skip(reason)
    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
