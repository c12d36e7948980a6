import asyncio
import threading
from collections.abc import Sequence

from runlane.store.notify import Notifier
from runlane.worker.batcher import Batcher


async def test_wait_returns_at_once_when_notified_since_snapshot() -> None:
    notifier = Notifier()
    since = notifier.generation("work")
    notifier.notify("work")
    assert await notifier.wait("work", since, timeout=30)


async def test_notify_from_another_thread_wakes_a_waiter() -> None:
    notifier = Notifier()
    since = notifier.generation("change")
    waiter = asyncio.create_task(notifier.wait("change", since, timeout=30))
    await asyncio.sleep(0)
    threading.Thread(target=notifier.notify, args=("change",)).start()
    assert await waiter


async def test_wait_times_out_and_topics_are_separate() -> None:
    notifier = Notifier()
    since = notifier.generation("cancel")
    notifier.notify("work")
    assert not await notifier.wait("cancel", since, timeout=0.01)


async def test_batcher_coalesces_concurrent_submissions() -> None:
    batches: list[list[int]] = []
    gate = asyncio.Event()

    async def flush(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        await gate.wait()
        return [i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher(flush)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    rest = [asyncio.create_task(batcher.submit(i)) for i in range(2, 6)]
    await asyncio.sleep(0)
    gate.set()
    assert await first == 10
    assert [await t for t in rest] == [20, 30, 40, 50]
    assert batches == [[1], [2, 3, 4, 5]]


async def test_batcher_delivers_errors_to_every_submitter() -> None:
    async def flush(items: Sequence[int]) -> list[int]:
        raise RuntimeError("store down")

    batcher: Batcher[int, int] = Batcher(flush)
    results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
