"""The app: the job registry, the store URL and settings, and factories for clients and workers."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from runlane.jobs import Job, JobOptions
from runlane.limits import ConcurrencyKey, QueueLimits, RateLimit, parse_rate_limit
from runlane.retry import DEFAULT_RETRY, Retry
from runlane.settings import DEFAULT_URL, Settings
from runlane.store import Store, create_store

if TYPE_CHECKING:
    from runlane.client import AsyncClient, Client
    from runlane.worker import Worker

P = ParamSpec("P")
R = TypeVar("R")


class Runlane:
    """``Runlane(url)``; without a URL, ``RUNLANE_URL``, else ``sqlite:///runlane.db``.

    One app holds one store per process; clients and workers made by it share it, so that an in-memory
    SQLite store is one database for all of them.
    """

    def __init__(self, url: str | None = None, *, clock: Callable[[], float] | None = None, **settings: Any):
        self.url = url or os.environ.get("RUNLANE_URL") or DEFAULT_URL
        self.settings = Settings.load(settings)
        self.jobs: dict[str, Job[Any, Any]] = {}
        self.queue_limits: dict[str, QueueLimits] = {}
        self._clock = clock
        self._store: Store | None = None
        self._store_lock = threading.Lock()
        self._ready: bool = False
        self._async_client: AsyncClient | None = None
        self._client: Client | None = None

    def __repr__(self) -> str:
        return f"<Runlane {self.store.display_url} jobs={len(self.jobs)}>"

    # -- jobs ---------------------------------------------------------------------------------------------------

    @overload
    def job(self, func: Callable[P, R], /) -> Job[P, R]: ...

    @overload
    def job(
        self,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        retry: Retry | None = None,
        timeout: float | None = None,
        priority: int = 0,
        max_concurrency: int | None = None,
        rate_limit: str | RateLimit | None = None,
        concurrency_key: ConcurrencyKey | None = None,
        schedule: str | None = None,
        interval: timedelta | float | None = None,
        timezone: str = "UTC",
        overlap: str = "skip",
        misfire: str = "latest",
        max_catch_up: int = 100,
        executor: str = "thread",
    ) -> Callable[[Callable[P, R]], Job[P, R]]: ...

    def job(
        self,
        func: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        retry: Retry | None = None,
        timeout: float | None = None,
        priority: int = 0,
        max_concurrency: int | None = None,
        rate_limit: str | RateLimit | None = None,
        concurrency_key: ConcurrencyKey | None = None,
        schedule: str | None = None,
        interval: timedelta | float | None = None,
        timezone: str = "UTC",
        overlap: str = "skip",
        misfire: str = "latest",
        max_catch_up: int = 100,
        executor: str = "thread",
    ) -> Any:
        """Register a function as a job, with or without options."""

        def register(f: Callable[..., Any]) -> Job[Any, Any]:
            options = JobOptions(
                name=name or f.__name__,
                queue=queue,
                retry=retry or DEFAULT_RETRY,
                timeout=timeout,
                priority=priority,
                max_concurrency=max_concurrency,
                rate_limit=parse_rate_limit(rate_limit),
                concurrency_key=concurrency_key,
                schedule=schedule,
                interval=interval.total_seconds() if isinstance(interval, timedelta) else interval,
                timezone=timezone,
                overlap=overlap,
                misfire=misfire,
                max_catch_up=max_catch_up,
                executor=executor,
            )
            if options.name in self.jobs:
                raise ValueError(f"a job named {options.name!r} is already registered")
            job = Job(self, f, options)
            self.jobs[options.name] = job
            return job

        return register(func) if func is not None else register

    def get_job(self, name: str) -> Job[Any, Any] | None:
        return self.jobs.get(name)

    @property
    def queues(self) -> list[str]:
        """Every queue the app's jobs use, sorted (a worker's default)."""
        return sorted({job.queue for job in self.jobs.values()}) or ["default"]

    def queue(
        self, name: str, *, max_concurrency: int | None = None, rate_limit: str | RateLimit | None = None
    ) -> QueueLimits:
        """Declare a queue's limits, global across workers: at most ``max_concurrency`` running runs and
        ``rate_limit`` (``"N/s"``, ``"N/m"``, ``"N/h"``) starts. Recorded in the store when a worker starts."""
        limits = QueueLimits(name, max_concurrency, parse_rate_limit(rate_limit))
        self.queue_limits[name] = limits
        return limits

    # -- store --------------------------------------------------------------------------------------------------

    @property
    def store(self) -> Store:
        with self._store_lock:
            if self._store is None:
                self._store = create_store(self.url, clock=self._clock)
            return self._store

    @property
    def is_memory(self) -> bool:
        return self.url.startswith("sqlite://") and self.url.rstrip("/").endswith(":memory:")

    async def open_store(self) -> Store:
        """The opened store, its schema checked once. An in-memory store is migrated here: it starts empty
        every time, so there is nothing for an operator to migrate."""
        store = self.store
        await store.open()
        if not self._ready:
            if self.is_memory:
                await store.migrate()
            await store.check_schema()
            self._ready = True
        return store

    def ready_store(self) -> Store | None:
        """The store if ``open_store`` has already succeeded, without awaiting anything; else None."""
        return self._store if self._ready else None

    async def migrate(self) -> list[int]:
        """Apply schema migrations and record the job catalogue; returns the versions applied."""
        store = self.store
        await store.open()
        applied = await store.migrate()
        await store.register_jobs([job.info() for job in self.jobs.values()])
        self._ready = True
        return applied

    # -- clients and workers ----------------------------------------------------------------------------------

    @property
    def async_client(self) -> AsyncClient:
        if self._async_client is None:
            from runlane.client import AsyncClient

            self._async_client = AsyncClient(self)
        return self._async_client

    @property
    def client(self) -> Client:
        if self._client is None:
            from runlane.client import Client

            self._client = Client(self)
        return self._client

    def worker(
        self,
        *,
        queues: list[str] | str | None = None,
        concurrency: int = 16,
        burst: bool = False,
        worker_id: str | None = None,
    ) -> Worker:
        from runlane.worker import Worker

        if isinstance(queues, str):
            queues = [q.strip() for q in queues.split(",") if q.strip()]
        return Worker(self, queues=queues, concurrency=concurrency, burst=burst, worker_id=worker_id)

    def run_worker(self, **options: Any) -> None:
        """Run a worker until it stops (``burst=True``: until idle), blocking; for scripts and sync tests."""
        self.client.portal.call(self.worker(**options).run())

    # -- shutdown -------------------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._store is not None:
            await self._store.close()
        self._ready = False

    def close(self) -> None:
        """Close the blocking client's loop thread and the store (on the loop that used it)."""
        store, client = self._store, self._client
        self._client = None
        self._ready = False
        if client is not None:
            if store is not None and client.portal._loop is not None:
                client.portal.call(store.close())
            client.close()
        elif store is not None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                asyncio.run(store.close())
            else:
                raise RuntimeError("Runlane.close() called from a running event loop; use await app.aclose()")

    def __enter__(self) -> Runlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Runlane:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
