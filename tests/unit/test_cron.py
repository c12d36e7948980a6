"""The cron module is pure: fire times from an explicit time, DST placement, misfire planning, bounds."""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from runlane.errors import InvalidSchedule
from runlane.scheduler.cron import Cron, Interval, check_policies, make_timing, plan_fires

NY = ZoneInfo("America/New_York")


def ts(*args: int, tz: ZoneInfo | None = NY, fold: int = 0) -> float:
    return datetime(*args, tzinfo=tz or UTC, fold=fold).timestamp()  # type: ignore[misc]


def local(t: float) -> str:
    return datetime.fromtimestamp(t, NY).isoformat()


def fires(cron: Cron, after: float, n: int) -> list[str]:
    out = []
    for _ in range(n):
        nxt = cron.next_after(after)
        assert nxt is not None
        out.append(local(nxt))
        after = nxt
    return out


def test_five_fields_in_utc() -> None:
    c = Cron("*/15 * * * *")
    start = ts(2030, 1, 1, 0, 0, tz=None)
    assert c.next_after(start) == start + 900
    assert c.fires_between(start, start + 3600) == [start + 900 * k for k in range(1, 5)]


def test_leading_seconds_field() -> None:
    c = Cron("*/10 * * * * *")
    start = ts(2030, 1, 1, 0, 0, tz=None)
    assert c.fires_between(start, start + 30) == [start + 10, start + 20, start + 30]


def test_spring_forward_fires_once_at_first_valid_instant() -> None:
    # 2024-03-10 in New York: 02:00 jumps to 03:00, so 02:30 does not exist that day.
    got = fires(Cron("30 2 * * *", "America/New_York"), ts(2024, 3, 9, 12, 0), 3)
    assert got == ["2024-03-10T03:00:00-04:00", "2024-03-11T02:30:00-04:00", "2024-03-12T02:30:00-04:00"]


def test_spring_forward_with_seconds_field_follows_the_same_rule() -> None:
    got = fires(Cron("0 30 2 * * *", "America/New_York"), ts(2024, 3, 9, 12, 0), 2)
    assert got == ["2024-03-10T03:00:00-04:00", "2024-03-11T02:30:00-04:00"]


def test_fall_back_fires_once_at_first_occurrence() -> None:
    # 2024-11-03 in New York: 02:00 goes back to 01:00, so 01:30 happens twice; it fires at the first (EDT).
    for expr in ("30 1 * * *", "0 30 1 * * *"):
        got = fires(Cron(expr, "America/New_York"), ts(2024, 11, 2, 12, 0), 3)
        assert got == ["2024-11-03T01:30:00-04:00", "2024-11-04T01:30:00-05:00", "2024-11-05T01:30:00-05:00"]


def test_fall_back_from_inside_the_repeated_hour_does_not_fire_again() -> None:
    second_pass = ts(2024, 11, 3, 1, 15, fold=1)  # 01:15 EST, after the EDT 01:30 already fired
    got = fires(Cron("30 1 * * *", "America/New_York"), second_pass, 1)
    assert got == ["2024-11-04T01:30:00-05:00"]


def test_rhythms_follow_absolute_time_across_dst() -> None:
    c = Cron("*/30 * * * *", "America/New_York")
    got = c.fires_between(ts(2024, 11, 3, 0, 50), ts(2024, 11, 3, 2, 0) + 3600)
    assert len(got) == 7  # 01:00, 01:30 (EDT), 01:00, 01:30 (EST), 02:00, 02:30, 03:00
    assert all(b - a == 1800 for a, b in itertools.pairwise(got))


@pytest.mark.parametrize(
    "expr",
    ["", "* * * *", "* * * * * * *", "61 * * * *", "* 24 * * *", "*/0 * * * *", "0 0 30 2 *", "hello"],
)
def test_invalid_expressions(expr: str) -> None:
    with pytest.raises(InvalidSchedule):
        Cron(expr)


def test_expression_that_never_fires_is_refused_quickly() -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidSchedule, match="never fires"):
        Cron("* * */20 * 1L")  # the 1st/21st of a month that is also its last Monday: never
    assert time.perf_counter() - started < 1.0  # generous: the budget itself is 50 ms of work


def test_rare_but_valid_expression() -> None:
    c = Cron("0 0 * 2 MON#5")  # a fifth Monday in February: leap years only
    nxt = c.next_after(ts(2030, 1, 1, 0, 0, tz=None))
    assert nxt is not None and datetime.fromtimestamp(nxt, UTC).year == 2044


@pytest.mark.parametrize("tz", ["Mars/Olympus", "", "utc+1"])
def test_invalid_timezone(tz: str) -> None:
    with pytest.raises(InvalidSchedule, match="timezone"):
        Cron("* * * * *", tz)


def test_timing_needs_exactly_one_of_cron_and_interval() -> None:
    with pytest.raises(InvalidSchedule):
        make_timing(None, None)
    with pytest.raises(InvalidSchedule):
        make_timing("* * * * *", 5)
    with pytest.raises(InvalidSchedule):
        make_timing(None, 0.5)
    assert make_timing(None, timedelta(seconds=30)) == Interval(30.0)


def test_policies_are_checked() -> None:
    check_policies("skip", "latest", 100)
    for bad in (("never", "latest", 1), ("skip", "sometimes", 1), ("skip", "all", -1)):
        with pytest.raises(InvalidSchedule):
            check_policies(*bad)


EVERY_SECOND = Cron("* * * * * *")


def test_on_time_fires_are_all_created() -> None:
    plan = plan_fires(EVERY_SECOND, next_fire_at=100.0, now=103.2, misfire="skip", max_catch_up=5, grace=5)
    assert plan.fires == (100.0, 101.0, 102.0, 103.0)
    assert plan.next_fire_at == 104.0


@pytest.mark.parametrize(
    ("misfire", "expected"),
    [
        ("latest", (995.0, 996.0, 997.0, 998.0, 999.0, 1000.0)),
        ("skip", (996.0, 997.0, 998.0, 999.0, 1000.0)),
        ("all", (993.0, 994.0, 995.0, 996.0, 997.0, 998.0, 999.0, 1000.0)),
    ],
)
def test_misfire_policies_after_an_outage(misfire: str, expected: tuple[float, ...]) -> None:
    # next fire 100, now 1000.5: fires up to 995.5 were missed (grace 5); 996..1000 are on time.
    plan = plan_fires(EVERY_SECOND, next_fire_at=100.0, now=1000.5, misfire=misfire, max_catch_up=3, grace=5)
    assert plan.fires == expected
    assert plan.next_fire_at == 1001.0


def test_catch_up_is_bounded_by_max_catch_up_not_by_the_outage() -> None:
    started = time.perf_counter()
    week = 7 * 86400
    plan = plan_fires(EVERY_SECOND, next_fire_at=0.0, now=week, misfire="all", max_catch_up=100, grace=5)
    assert len(plan.fires) == 100 + 5
    assert time.perf_counter() - started < 5


def test_interval_plans() -> None:
    every5 = Interval(5)
    plan = plan_fires(every5, next_fire_at=100.0, now=131.0, misfire="all", max_catch_up=2, grace=6)
    assert plan.fires == (120.0, 125.0, 130.0)
    assert plan.next_fire_at == 135.0
    plan = plan_fires(every5, next_fire_at=100.0, now=131.0, misfire="skip", max_catch_up=2, grace=6)
    assert plan.fires == (130.0,)
    assert (
        plan_fires(every5, next_fire_at=200.0, now=131.0, misfire="all", max_catch_up=2, grace=6).fires == ()
    )
