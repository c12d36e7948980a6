"""When a schedule fires: cron expressions and intervals as pure functions of an explicit time.

Parsing and matching are cronsim's (a maintained cron evaluator, used by Healthchecks); this module adds the
timezone policy and bounds the work. Nothing here reads a clock: callers pass ``after``/``now`` as epoch
seconds, so the scheduler, the client and the tests decide what "now" is.

**DST rule.** An expression whose minute and hour fields are both fixed (``30 2 * * *``, ``0 0 30 2 * * *``)
names a wall-clock time and is matched in local wall-clock time:

* a wall time that does not exist (spring forward: 02:30 on the day clocks jump from 02:00 to 03:00) fires
  once, at the first valid instant after the gap (03:00);
* a wall time that happens twice (fall back: 01:30 on the day clocks return from 02:00 to 01:00) fires once,
  at its first occurrence (the daylight-time 01:30).

This is Debian/Vixie cron's behaviour. Any other expression (``*/15 * * * *``, ``0 * * * *``) describes a
rhythm and is matched on absolute time: it fires at every matching instant that exists, so ``*/30 * * * *``
fires four times during the repeated hour and skips the missing one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from runlane.errors import InvalidSchedule

VALIDATION_BUDGET = 0.05
"""Seconds a validation may spend finding the first fire; an expression that needs longer is refused."""
MAX_STEPS = 100_000
"""Fire times one call may enumerate, so that a huge range never runs away."""


def parse_timezone(name: str) -> tzinfo:
    """An IANA timezone (``"Europe/Paris"``) or ``"UTC"``; InvalidSchedule for anything else."""
    if not isinstance(name, str) or not name:
        raise InvalidSchedule(f"timezone must be an IANA name such as 'Europe/Paris', not {name!r}")
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidSchedule(f"unknown timezone {name!r}: use an IANA name such as 'Europe/Paris'") from exc


def _to_local(ts: float, tz: tzinfo) -> datetime:
    return datetime.fromtimestamp(ts, UTC).astimezone(tz)


def _exists(naive: datetime, tz: tzinfo) -> bool:
    aware = naive.replace(tzinfo=tz)
    return aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == naive


@dataclass(frozen=True, slots=True)
class Cron:
    """A validated cron expression in a timezone. Standard 5 fields, or 6 with a leading seconds field."""

    expression: str
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if not isinstance(self.expression, str) or not self.expression.strip():
            raise InvalidSchedule(f"a cron expression must be a non-empty string, not {self.expression!r}")
        fields = self.expression.split()
        if len(fields) not in (5, 6):
            raise InvalidSchedule(
                f"invalid cron expression {self.expression!r}: expected 5 fields (minute hour day month "
                f"weekday) or 6 with a leading seconds field, got {len(fields)}"
            )
        object.__setattr__(self, "expression", " ".join(fields))
        tz = parse_timezone(self.timezone)
        started = time.perf_counter()
        try:
            first = next(self._iterate(0.0 if tz is UTC else 86_400.0, tz), None)
        except CronSimError as exc:
            raise InvalidSchedule(f"invalid cron expression {self.expression!r}: {exc}") from None
        if first is None:
            raise InvalidSchedule(f"cron expression {self.expression!r} never fires")
        if time.perf_counter() - started > VALIDATION_BUDGET:
            raise InvalidSchedule(
                f"cron expression {self.expression!r} fires too rarely to evaluate quickly; simplify it"
            )

    @property
    def tz(self) -> tzinfo:
        return parse_timezone(self.timezone)

    @property
    def wall_clock(self) -> bool:
        """Fixed minute and hour: a time of day, matched in wall-clock time (see the module's DST rule)."""
        fields = self.expression.split()
        minute, hour = (fields[0], fields[1]) if len(fields) == 5 else (fields[1], fields[2])
        return not minute.startswith("*") and not hour.startswith("*")

    def _iterate(self, after: float, tz: tzinfo) -> Iterator[float]:
        """Fire times strictly after ``after`` (epoch seconds), ascending. StopIteration after 50 years."""
        start = _to_local(after, tz)
        if not self.wall_clock or tz is UTC:
            # cronsim ticks aware datetimes through UTC: every matching instant that exists, once.
            it = CronSim(self.expression, start.replace(microsecond=0))
            for dt in it:
                ts = dt.timestamp()
                if ts > after:
                    yield ts
            return
        # Wall-clock iteration on naive local times, then our DST rule to place each on the timeline.
        naive = start.replace(tzinfo=None, microsecond=0)
        if start.fold:  # in the repeated hour's second pass: wall times up to here already fired
            naive = naive.replace(fold=0)
        previous = after
        for wall in CronSim(self.expression, naive):
            while not _exists(wall, tz):  # spring forward: the first valid instant after the gap
                wall += timedelta(minutes=1)
                wall = wall.replace(second=0)
            ts = wall.replace(tzinfo=tz, fold=0).timestamp()  # fall back: the first occurrence
            if ts > previous:
                previous = ts
                yield ts

    def next_after(self, after: float) -> float | None:
        """The first fire strictly after ``after``; None if there is none in the next 50 years."""
        return next(self._iterate(after, self.tz), None)

    def fires_between(self, start: float, end: float, *, limit: int = MAX_STEPS) -> list[float]:
        """Fire times in ``(start, end]``, ascending, at most ``limit`` of them (the earliest)."""
        out: list[float] = []
        for ts in self._iterate(start, self.tz):
            if ts > end or len(out) >= min(limit, MAX_STEPS):
                break
            out.append(ts)
        return out

    def previous_before(self, before: float, *, count: int, not_before: float) -> list[float]:
        """Up to ``count`` fire times in ``[not_before, before]``, the latest ones, ascending."""
        # Forward iteration from a window that doubles until it holds ``count`` fires: cronsim's reverse
        # mode does not share our DST placement, and a window keeps the work proportional to ``count``.
        span = 60.0
        while True:
            lo = max(not_before - 1e-6, before - span)
            fires = self.fires_between(lo, before, limit=MAX_STEPS)
            if len(fires) >= count or lo <= not_before - 1e-6 or len(fires) >= MAX_STEPS:
                return [t for t in fires if t >= not_before][-count:] if count > 0 else []
            span *= 4


@dataclass(frozen=True, slots=True)
class Interval:
    """Every ``seconds``, measured from the previous fire (the first one ``seconds`` after creation)."""

    seconds: float

    def __post_init__(self) -> None:
        if not isinstance(self.seconds, int | float) or not self.seconds >= 1:
            raise InvalidSchedule(f"a schedule interval must be at least 1 second, got {self.seconds!r}")

    def next_after(self, after: float) -> float:
        return after + self.seconds

    def fires_between(self, anchor: float, end: float, *, limit: int = MAX_STEPS) -> list[float]:
        """Fires ``anchor + k*seconds`` (k >= 1) in ``(anchor, end]``, the earliest ``limit``."""
        out: list[float] = []
        t = anchor + self.seconds
        while t <= end and len(out) < min(limit, MAX_STEPS):
            out.append(t)
            t += self.seconds
        return out


Timing = Cron | Interval


def make_timing(cron: str | None, interval: float | timedelta | None, timezone: str = "UTC") -> Timing:
    """Exactly one of ``cron`` and ``interval``; InvalidSchedule otherwise."""
    if (cron is None) == (interval is None):
        raise InvalidSchedule("a schedule needs exactly one of a cron expression and an interval")
    if cron is not None:
        return Cron(cron, timezone)
    assert interval is not None
    seconds = interval.total_seconds() if isinstance(interval, timedelta) else interval
    parse_timezone(timezone)
    return Interval(float(seconds))


@dataclass(frozen=True, slots=True)
class FirePlan:
    """What one scheduler pass does for a due schedule: the fire times to create (ascending) and where the
    schedule's next fire then is."""

    fires: tuple[float, ...]
    next_fire_at: float | None
    missed: int  # due fires that were late and left out by the misfire policy


def plan_fires(
    timing: Timing,
    *,
    next_fire_at: float,
    now: float,
    misfire: str,
    max_catch_up: int,
    grace: float,
) -> FirePlan:
    """Fires due at ``now`` for a schedule whose next fire is ``next_fire_at``.

    A fire at most ``grace`` seconds old is on time and always created. Older ones were missed (no scheduler
    was running): ``latest`` creates the latest missed one, ``all`` the latest ``max_catch_up``, ``skip``
    none. The work is bounded by the grace window and ``max_catch_up``, never by the length of an outage.
    """
    if next_fire_at > now:
        return FirePlan((), next_fire_at, 0)
    cutoff = now - grace  # a fire at or before the cutoff was missed
    keep = {"latest": 1, "all": max(max_catch_up, 0)}.get(misfire, 0)
    if isinstance(timing, Interval):
        step = timing.seconds
        last_k = int((now - next_fire_at) // step)  # fires next_fire_at + k*step, k = 0..last_k, are due
        first_on_time_k = 0 if next_fire_at > cutoff else int((cutoff - next_fire_at) // step) + 1
        on_time = [next_fire_at + k * step for k in range(first_on_time_k, last_k + 1)]
        missed_count = min(first_on_time_k, last_k + 1)
        kept = [next_fire_at + k * step for k in range(max(0, missed_count - keep), missed_count)]
        next_at: float | None = next_fire_at + (last_k + 1) * step
    else:
        if next_fire_at > cutoff:
            on_time = [next_fire_at, *timing.fires_between(next_fire_at, now)]
            kept, missed_count = [], 0
        else:
            on_time = timing.fires_between(cutoff, now)
            kept = timing.previous_before(cutoff, count=keep, not_before=next_fire_at) if keep else []
            missed_count = max(len(kept), 1)  # at least the one at next_fire_at; an outage is not counted
        next_at = timing.next_after(now)
    fires = tuple(sorted({*kept, *on_time}))
    return FirePlan(fires, next_at, max(missed_count - len(kept), 0))


def check_policies(overlap: str, misfire: str, max_catch_up: int) -> None:
    """InvalidSchedule unless the overlap and misfire policies are known and ``max_catch_up`` >= 0."""
    from runlane.models import MISFIRE_POLICIES, OVERLAP_POLICIES

    if overlap not in OVERLAP_POLICIES:
        raise InvalidSchedule(f"overlap must be one of {', '.join(OVERLAP_POLICIES)}, not {overlap!r}")
    if misfire not in MISFIRE_POLICIES:
        raise InvalidSchedule(f"misfire must be one of {', '.join(MISFIRE_POLICIES)}, not {misfire!r}")
    if isinstance(max_catch_up, bool) or not isinstance(max_catch_up, int) or max_catch_up < 0:
        raise InvalidSchedule(f"max_catch_up must be a non-negative integer, not {max_catch_up!r}")
