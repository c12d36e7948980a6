from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from runlane import Runlane, RunStatus
from runlane.client import AsyncClient


@pytest.fixture
def make_app(store_url: str) -> Callable[..., Runlane]:
    """Apps on the parametrized store; fast timings so reaping and polling stay quick in tests."""
    created: list[Runlane] = []

    def make(**settings: object) -> Runlane:
        settings.setdefault("poll_interval", 0.2)
        settings.setdefault("lease_timeout", 5.0)
        settings.setdefault("progress_flush_interval", 0.05)
        app = Runlane(store_url, **settings)  # type: ignore[arg-type]
        created.append(app)
        return app

    return make


@pytest.fixture
async def app(make_app: Callable[..., Runlane]) -> AsyncIterator[Runlane]:
    app = make_app()
    await app.migrate()
    yield app
    await app.async_client.aclose()
    await app.aclose()


@pytest.fixture
def client(app: Runlane) -> AsyncClient:
    return app.async_client


async def wait_status(client: AsyncClient, run_id: int, status: RunStatus, timeout: float = 30.0) -> None:
    """Poll until a run reaches ``status`` (for states that have no terminal wait)."""
    async with asyncio.timeout(timeout):
        while True:
            run = await client.get_run(run_id)
            if run is not None and run.status is status:
                return
            await asyncio.sleep(0.02)
