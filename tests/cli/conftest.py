"""Fixtures for the CLI tests: a project directory with a small app module and a throwaway SQLite store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import APP_MODULE, Cli


def make_cli(tmp_path: Path, url: str) -> Cli:
    (tmp_path / "demo_app.py").write_text(APP_MODULE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNLANE_")}
    env.update(RUNLANE_URL=url, PYTHONUNBUFFERED="1", RUNLANE_POLL_INTERVAL="0.2")
    return Cli(tmp_path, url, env)


@pytest.fixture
def cli_any(tmp_path: Path, store_url: str) -> Iterator[Cli]:
    """Like ``cli``, on every backend (the store is empty; PostgreSQL may already be migrated)."""
    runner = make_cli(tmp_path, store_url)
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    """A project directory with ``demo_app.py`` and an (unmigrated) SQLite store in ``RUNLANE_URL``."""
    (tmp_path / "demo_app.py").write_text(APP_MODULE)
    url = f"sqlite:///{tmp_path / 'runlane.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNLANE_")}
    env.update(RUNLANE_URL=url, PYTHONUNBUFFERED="1", RUNLANE_POLL_INTERVAL="0.2")
    runner = Cli(tmp_path, url, env)
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture
def migrated(cli: Cli) -> Cli:
    """The store migrated with the app, so the job catalogue lets client-only commands trigger its jobs."""
    cli.ok("migrate", "demo_app:app")
    return cli
