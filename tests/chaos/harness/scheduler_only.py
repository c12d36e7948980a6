"""``python -m harness.scheduler_only``: a process that runs only the scheduler of the chaos app.

T13's SQLite variant skews this process's clock and not the workers': on SQLite the lease clock is each
worker's own (one host, one clock), so only the scheduler can meaningfully run on a different time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from harness.chaos_app import app
from runlane.scheduler.schedules import Scheduler

log = logging.getLogger("harness.scheduler_only")


async def main() -> None:
    store = await app.open_store()
    # The worker's start line, so that WorkerPool.wait_started knows this process too.
    log.info("scheduler-only %s-%d-0 started: clock %.3f", socket.gethostname(), os.getpid(), store.now())
    try:
        await Scheduler(store, poll_interval=app.settings.poll_interval).run()
    finally:
        await store.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(main())
