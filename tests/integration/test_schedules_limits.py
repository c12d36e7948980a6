"""Schedules, limits and paused queues through the public API, on every store."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest

from runlane import (
    InvalidArguments,
    InvalidSchedule,
    JobContext,
    JobNotFound,
    Runlane,
    RunStatus,
    ScheduleNotFound,
)
from runlane.models import RunFilter
from runlane.scheduler.schedules import Scheduler, sync_app
from runlane.testing import FakeClock, drain

T0 = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC


async def test_manage_schedules_at_runtime(app: Runlane) -> None:
    @app.job
    def report(kind: str) -> str:
        return kind

    await app.migrate()
    schedules = app.async_client.schedules
    s = await schedules.add("daily-report", "report", "30 2 * * *", {"kind": "full"}, timezone="Europe/Paris")
    assert (s.job, s.args, s.timezone, s.overlap, s.misfire, s.source) == (
        "report",
        {"kind": "full"},
        "Europe/Paris",
        "skip",
        "latest",
        "runtime",
    )
    assert len(s.next_fire_times) == 5
    assert all(t.astimezone().hour is not None for t in s.next_fire_times)
    assert (await schedules.get("daily-report")).next_fire_times == s.next_fire_times
    assert [x.id for x in await schedules.list()] == ["daily-report"]
    assert await schedules.toggle("daily-report") is False
    assert (await schedules.get("daily-report")).next_fire_times == ()
    assert await schedules.toggle("daily-report") is True
    assert not (await schedules.pause("daily-report")).enabled
    assert (await schedules.resume("daily-report")).enabled
    every = await schedules.add("tick", report, args={"kind": "t"}, interval=timedelta(seconds=30))
    assert every.interval == 30.0 and every.cron is None
    assert await schedules.remove("daily-report")
    assert not await schedules.remove("daily-report")
    with pytest.raises(ScheduleNotFound):
        await schedules.get("daily-report")
    with pytest.raises(ScheduleNotFound):
        await schedules.pause("nope")


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (dict(cron="61 * * * *"), InvalidSchedule),
        (dict(cron="* * * *"), InvalidSchedule),
        (dict(cron="* * * * *", timezone="Mars/Base"), InvalidSchedule),
        (dict(cron="* * * * *", overlap="sometimes"), InvalidSchedule),
        (dict(cron="* * * * *", misfire="maybe"), InvalidSchedule),
        (dict(cron="* * * * *", max_catch_up=-1), InvalidSchedule),
        (dict(cron=None), InvalidSchedule),
        (dict(cron="* * * * *", args={"kind": 3}), InvalidArguments),
        (dict(cron="* * * * *", job="missing"), JobNotFound),
        (dict(cron="* * * * *", id=""), InvalidSchedule),
    ],
)
async def test_bad_schedules_store_nothing(
    app: Runlane, call: dict[str, object], error: type[Exception]
) -> None:
    @app.job
    def report(kind: str = "x") -> str:
        return kind

    options = dict(call)
    id, job, cron = options.pop("id", "s"), options.pop("job", "report"), options.pop("cron")
    with pytest.raises(error):
        await app.async_client.schedules.add(id, job, cron, **options)  # type: ignore[arg-type]
    assert await app.async_client.schedules.list() == []


def test_sync_client_schedules_and_queues(make_app: Callable[..., Runlane]) -> None:
    app = make_app()

    @app.job(queue="mail")
    def send(to: str) -> None: ...

    app.client.portal.call(app.migrate())
    try:
        s = app.client.schedules.add("hourly", "send", "0 * * * *", {"to": "ops"})
        assert app.client.schedules.get("hourly").id == s.id
        assert app.client.schedules.toggle("hourly") is False
        assert [x.id for x in app.client.schedules.list()] == ["hourly"]
        assert app.client.schedules.remove("hourly")
        app.client.trigger(send, {"to": "x"})
        app.client.pause_queue("mail")
        (mail,) = [q for q in app.client.queues() if q.name == "mail"]
        assert mail.paused and mail.pending == 1
        app.client.resume_queue("mail")
        assert not next(q for q in app.client.queues() if q.name == "mail").paused
    finally:
        app.close()


async def test_declared_schedule_fires_with_scheduled_at(make_app: Callable[..., Runlane]) -> None:
    clock = FakeClock(T0)
    app = make_app(clock=clock)
    seen: list[str] = []

    @app.job(schedule="*/10 * * * * *")
    def beat(ctx: JobContext) -> str:
        assert ctx.scheduled_at is not None
        seen.append(ctx.scheduled_at.isoformat())
        return ctx.scheduled_at.isoformat()

    await app.migrate()
    store = await app.open_store()
    await sync_app(app, store, "test")
    scheduler = Scheduler(store)
    clock.advance(10)
    (run,) = await scheduler.tick()
    assert run.schedule_id == "beat" and run.not_before is not None
    assert await scheduler.tick() == []  # the same pass again creates nothing
    await drain(app)
    final = await app.async_client.wait(run.id, timeout=30)
    assert final.status is RunStatus.SUCCEEDED
    assert final.result == "2027-01-15T08:00:10+00:00" == seen[0]
    await app.aclose()


async def test_code_changes_update_and_removals_disable(make_app: Callable[..., Runlane]) -> None:
    clock = FakeClock(T0)
    first = make_app(clock=clock)

    @first.job(schedule="0 * * * *")
    def hourly() -> None: ...

    @first.job(schedule="0 0 * * *")
    def nightly() -> None: ...

    await first.migrate()
    await sync_app(first, await first.open_store(), "w1")
    await first.aclose()

    second = make_app(clock=clock)

    @second.job(schedule="*/30 * * * *", timezone="Europe/Paris")
    def hourly() -> None: ...  # noqa: F811 - the same job, new code

    await second.migrate()
    await sync_app(second, await second.open_store(), "w2")
    got = {s.id: s for s in await second.async_client.schedules.list()}
    assert got["hourly"].cron == "*/30 * * * *" and got["hourly"].timezone == "Europe/Paris"
    assert got["hourly"].active
    assert not got["nightly"].active and got["nightly"].source == "code"
    assert (
        got["nightly"].disabled_reason is not None and "removed from code" in got["nightly"].disabled_reason
    )
    await second.aclose()


@pytest.mark.parametrize(("misfire", "expected"), [("latest", 1), ("skip", 0), ("all", 3)])
async def test_misfire_policies_after_an_outage(
    make_app: Callable[..., Runlane], misfire: str, expected: int
) -> None:
    clock = FakeClock(T0)
    app = make_app(clock=clock)

    @app.job(schedule="* * * * *", misfire=misfire, max_catch_up=3, overlap="allow")
    def minutely() -> None: ...

    await app.migrate()
    store = await app.open_store()
    await sync_app(app, store, "w")
    clock.advance(30 * 60 + 30)  # every worker was down for 30 minutes
    runs = await Scheduler(store).tick()
    assert len(runs) == expected
    if runs:
        assert runs[-1].not_before is not None
        assert runs[-1].not_before.timestamp() == T0 + 30 * 60  # the latest missed fire
    await app.aclose()


async def test_overlap_queue_runs_the_next_fire_after_the_previous(make_app: Callable[..., Runlane]) -> None:
    clock = FakeClock(T0)
    app = make_app(clock=clock)

    @app.job(schedule="* * * * * *", overlap="queue", misfire="all")
    def step() -> None: ...

    await app.migrate()
    store = await app.open_store()
    await sync_app(app, store, "w")
    clock.advance(3)
    runs = await Scheduler(store).tick()
    assert [r.status for r in runs] == [RunStatus.PENDING, RunStatus.SCHEDULED, RunStatus.SCHEDULED]
    scheduler = Scheduler(store)
    for _ in range(3):
        await drain(app)
        await scheduler.tick(clock())  # releases the next held fire once the previous ended
    statuses = [r.status async for r in app.async_client.list_runs(RunFilter(schedule_id="step"))]
    assert statuses.count(RunStatus.SUCCEEDED) == 3
    await app.aclose()


async def test_concurrency_key_limits_runs_per_key(make_app: Callable[..., Runlane]) -> None:
    app = make_app()
    lock = threading.Lock()
    active: dict[str, int] = {}
    peak: dict[str, int] = {}

    @app.job(max_concurrency=1, concurrency_key="customer")
    async def sync(customer: str, n: int) -> None:
        with lock:
            active[customer] = active.get(customer, 0) + 1
            peak[customer] = max(peak.get(customer, 0), active[customer])
        await asyncio.sleep(0.02)
        with lock:
            active[customer] -= 1

    await app.migrate()
    runs = await app.async_client.trigger_many(
        sync, [{"customer": c, "n": n} for n in range(5) for c in "abc"]
    )
    assert {r.status for r in runs} == {RunStatus.PENDING}
    await drain(app, concurrency=8)
    assert peak == {"a": 1, "b": 1, "c": 1}
    assert all(
        r.status is RunStatus.SUCCEEDED for r in await (await app.open_store()).get_runs([r.id for r in runs])
    )
    await app.aclose()


async def test_paused_queue_holds_runs_until_resumed(app: Runlane) -> None:
    @app.job(queue="slow")
    def work() -> int:
        return 1

    await app.migrate()
    await app.async_client.pause_queue("slow")
    run = await app.async_client.trigger(work)
    await drain(app)
    assert (await app.async_client.get_run(run.id)).status is RunStatus.PENDING  # type: ignore[union-attr]
    await app.async_client.resume_queue("slow")
    await drain(app)
    assert await app.async_client.result(run.id, timeout=30) == 1


async def test_rate_limited_worker_waits_instead_of_spinning(make_app: Callable[..., Runlane]) -> None:
    app = make_app()
    starts: list[float] = []

    @app.job(rate_limit="5/s")
    def ping() -> None:
        starts.append(time.monotonic())

    await app.migrate()
    await app.async_client.trigger_many(ping, [{} for _ in range(12)])
    await drain(app, concurrency=16)
    assert len(starts) == 12
    starts.sort()
    for i in range(len(starts) - 5):
        assert starts[i + 5] - starts[i] >= 0.9  # never 6 starts within a second (small clock slack)
    await app.aclose()


def test_job_options_are_validated_at_declaration() -> None:
    app = Runlane("sqlite:///:memory:")
    with pytest.raises(InvalidSchedule):
        app.job(schedule="99 * * * *")(lambda: None)
    with pytest.raises(InvalidArguments):
        app.job(rate_limit="fast")(lambda: None)
    with pytest.raises(InvalidArguments):
        app.job(max_concurrency=0)(lambda: None)
    with pytest.raises(InvalidSchedule):
        app.job(interval=timedelta(seconds=30), overlap="bogus")(lambda: None)
    with pytest.raises(InvalidArguments):
        app.queue("q", rate_limit="1/d")
