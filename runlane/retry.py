"""Retry policy: a pure decision from (attempt, error) to "retry at t" or "give up"."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from runlane.errors import JobTimeout, NonRetryable


@dataclass(frozen=True, slots=True)
class Retry:
    """How many attempts a run gets and how long to wait between them.

    The delay before attempt ``n + 1`` is ``backoff * 2**(n-1)`` seconds capped at ``max_delay``; with
    ``jitter`` it is drawn uniformly from ``[delay/2, delay]`` so that a burst of failures does not come back
    as a burst of retries. Exceptions outside ``on`` (and :class:`NonRetryable`) fail the run at once.
    """

    attempts: int = 3
    backoff: float = 1.0
    max_delay: float = 300.0
    jitter: bool = True
    on: tuple[type[BaseException], ...] = field(default=(Exception,))

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("Retry.attempts must be at least 1")
        if self.backoff < 0 or self.max_delay < 0:
            raise ValueError("Retry.backoff and Retry.max_delay must not be negative")
        if isinstance(self.on, type):
            object.__setattr__(self, "on", (self.on,))

    def base_delay(self, attempt: int) -> float:
        """Delay after failed attempt number ``attempt`` (1-based), before jitter."""
        exponent = min(max(attempt - 1, 0), 60)  # 2**60 s already dwarfs any sane max_delay
        return float(min(self.backoff * (2**exponent), self.max_delay))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        base = self.base_delay(attempt)
        if not self.jitter or base == 0:
            return base
        return (rng or random).uniform(base / 2, base)

    def is_retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, NonRetryable):
            return False
        if isinstance(exc, JobTimeout):
            return True
        return isinstance(exc, self.on)

    def next_delay(
        self, exc: BaseException, attempt: int, max_attempts: int, rng: random.Random | None = None
    ) -> float | None:
        """Seconds to wait before the next attempt after ``attempt`` failed with ``exc``; None: give up.

        ``max_attempts`` comes from the run (a trigger may override the job's ``attempts``)."""
        if attempt >= max_attempts or not self.is_retryable(exc):
            return None
        return self.delay(attempt, rng)

    def to_dict(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "backoff": self.backoff,
            "max_delay": self.max_delay,
            "jitter": self.jitter,
            "on": [f"{t.__module__}.{t.__qualname__}" for t in self.on],
        }


DEFAULT_RETRY = Retry(attempts=3, backoff=1.0, max_delay=300.0)
