"""Settings: explicit arguments win over ``RUNLANE_<NAME>`` environment variables, which win over defaults."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

DEFAULT_URL = "sqlite:///runlane.db"


@dataclass(frozen=True, slots=True)
class Settings:
    lease_timeout: float = 30.0
    heartbeat_interval: float | None = None  # None: lease_timeout / 3
    poll_interval: float = 1.0
    shutdown_timeout: float = 30.0
    retention: timedelta | None = timedelta(days=7)
    progress_flush_interval: float = 0.5
    reaper_interval: float | None = None  # None: min(poll_interval * 2, lease_timeout / 3)
    job_thread_nice: int = 0  # sync jobs' threads run this much nicer than the worker's own (Linux)
    job_processes: int | None = None  # processes for executor="process" jobs; None: the worker's concurrency
    job_process_nice: int = 19  # job processes run this much nicer than the worker (POSIX); 0: as the worker
    prefetch: int | None = (
        None  # most runs a worker claims ahead of free slots; None: 8 x concurrency; 0: none
    )

    def __post_init__(self) -> None:
        for name in ("lease_timeout", "poll_interval", "progress_flush_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"setting {name} must be positive, got {getattr(self, name)!r}")
        if self.shutdown_timeout < 0:
            raise ValueError("setting shutdown_timeout must not be negative")
        for name in ("job_thread_nice", "job_process_nice"):
            if not 0 <= getattr(self, name) <= 19:
                raise ValueError(f"setting {name} must be between 0 and 19, got {getattr(self, name)!r}")
        if self.prefetch is not None and self.prefetch < 0:
            raise ValueError(f"setting prefetch must not be negative, got {self.prefetch!r}")
        if self.job_processes is not None and self.job_processes < 1:
            raise ValueError(f"setting job_processes must be at least 1, got {self.job_processes!r}")
        if self.heartbeat_interval is not None and not 0 < self.heartbeat_interval < self.lease_timeout:
            raise ValueError("setting heartbeat_interval must be positive and shorter than lease_timeout")

    @property
    def effective_heartbeat_interval(self) -> float:
        return self.heartbeat_interval if self.heartbeat_interval is not None else self.lease_timeout / 3

    @property
    def effective_reaper_interval(self) -> float:
        if self.reaper_interval is not None:
            return self.reaper_interval
        return min(self.poll_interval * 2, self.lease_timeout / 3)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def load(cls, overrides: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        known = set(cls.names())
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown Runlane setting(s): {', '.join(sorted(unknown))}")
        for name in known:
            if overrides.get(name) is not None or name in overrides:
                values[name] = _coerce(name, overrides[name])
            elif (raw := environ.get(f"RUNLANE_{name.upper()}")) is not None:
                values[name] = _coerce(name, raw)
        return cls(**values)


def _coerce(name: str, value: Any) -> Any:
    if name == "retention":
        if value is None or isinstance(value, timedelta):
            return value
        if isinstance(value, str) and value.strip().lower() in {"", "none", "off"}:
            return None
        return timedelta(seconds=float(value))
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    if name in {"job_thread_nice", "job_process_nice", "job_processes", "prefetch"}:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"setting {name} must be a whole number, got {value!r}") from None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"setting {name} must be a number of seconds, got {value!r}") from None
