"""Flow-control settings as values: ``"100/m"`` → :class:`RateLimit`, and how a run's concurrency key is found.

Pure: no store, no clock. The store enforces these when claiming (see ``runlane.store.base``); this module only
parses and describes them.

Rate limits use a **sliding window**: a run may start while fewer than ``count`` runs of the same limit key
started in the last ``period`` seconds (starts are recorded in the store when runs are claimed), so no window
of that length anywhere in time ever holds more than ``count`` starts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from runlane.errors import InvalidArguments

PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|m|h)\s*$")

ConcurrencyKey = str | Callable[..., Any]
"""The name of an argument, or a callable taking the run's arguments (as keyword arguments) to a string."""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``count`` starts in any ``period`` seconds."""

    count: int
    period: float

    def __str__(self) -> str:
        unit = {v: k for k, v in PERIODS.items()}.get(self.period)
        return f"{self.count}/{unit}" if unit else f"{self.count}/{self.period:g}s"

    @classmethod
    def parse(cls, text: str | RateLimit) -> RateLimit:
        """``"N/s"``, ``"N/m"`` or ``"N/h"`` with N >= 1; InvalidArguments (a ValueError) naming the text."""
        if isinstance(text, RateLimit):
            return text
        match = _RATE.match(text) if isinstance(text, str) else None
        if match is None or int(match.group(1)) < 1:
            raise InvalidArguments(
                f"invalid rate limit {text!r}: expected 'N/s', 'N/m' or 'N/h' with N at least 1, e.g. '100/m'"
            )
        return cls(int(match.group(1)), PERIODS[match.group(2)])


def parse_rate_limit(text: str | RateLimit | None) -> RateLimit | None:
    return None if text is None else RateLimit.parse(text)


def check_max_concurrency(value: int | None, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArguments(f"{what}: max_concurrency must be a positive integer, got {value!r}")
    return value


def concurrency_key_value(key: ConcurrencyKey | None, args: Mapping[str, Any], job: str) -> str | None:
    """The partition a run's limits count in, from its (validated, JSON) arguments; None when the job is not
    partitioned. A missing argument or a callable that fails raises InvalidArguments at trigger time."""
    if key is None:
        return None
    if isinstance(key, str):
        if key not in args:
            raise InvalidArguments(f"job {job!r}: concurrency_key argument {key!r} is missing")
        value = args[key]
    else:
        try:
            value = key(**args)
        except Exception as exc:
            raise InvalidArguments(f"job {job!r}: its concurrency_key callable failed: {exc!r}") from exc
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


@dataclass(frozen=True, slots=True)
class JobLimits:
    """A job's limits as the store needs them at claim time."""

    job: str
    max_concurrency: int | None = None
    rate_limit: RateLimit | None = None

    @property
    def limited(self) -> bool:
        return self.max_concurrency is not None or self.rate_limit is not None


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """A queue's limits (``app.queue(name, max_concurrency=…, rate_limit=…)``)."""

    name: str
    max_concurrency: int | None = None
    rate_limit: RateLimit | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidArguments(f"a queue name must be a non-empty string, not {self.name!r}")
        check_max_concurrency(self.max_concurrency, f"queue {self.name!r}")
