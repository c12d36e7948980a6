"""Admission under limits, shared by both stores' claims: given the counts read inside the claim
transaction (running runs per job partition and per queue, starts in each rate window), walk candidates in
claim order and admit those every limit still has room for. Pure bookkeeping: the store does the reading,
the locking and the writing."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from runlane.limits import JobLimits, QueueLimits, RateLimit

SEP = "\x1f"


def job_key(job: str, key: str) -> str:
    """A job's limit partition: the job and its run's concurrency key ('' when unkeyed)."""
    return f"{job}{SEP}{key}"


def job_rate_key(job: str, key: str) -> str:
    return f"job{SEP}{job}{SEP}{key}"


def queue_rate_key(queue: str) -> str:
    return f"queue{SEP}{queue}"


@dataclass
class Admission:
    jobs: dict[str, JobLimits]
    queues: dict[str, QueueLimits]
    job_running: dict[tuple[str, str], int] = field(default_factory=dict)
    queue_running: dict[str, int] = field(default_factory=dict)
    window_counts: dict[str, int] = field(default_factory=dict)  # rate key -> starts in its window
    full: set[str] = field(default_factory=set)  # saturated job partitions (job_key)
    closed: set[str] = field(default_factory=set)  # saturated queues
    starts: list[str] = field(default_factory=list)  # rate keys to record for the admitted runs

    def count_running(self, rows: Iterable[tuple[str, str, str | None, int]]) -> None:
        for job, queue, key, n in rows:
            k = (job, key or "")
            self.job_running[k] = self.job_running.get(k, 0) + n
            self.queue_running[queue] = self.queue_running.get(queue, 0) + n

    def unkeyed_shut(self, job: str) -> bool:
        """Whether the job's unkeyed partition can take no run now: at its concurrency limit, or found full
        (by either limit) earlier in this claim."""
        if job_key(job, "") in self.full:
            return True
        jl = self.jobs.get(job)
        return (
            jl is not None
            and jl.max_concurrency is not None
            and self.job_running.get((job, ""), 0) >= jl.max_concurrency
        )

    def rate_keys(self, job: str, queue: str, key: str) -> list[tuple[str, RateLimit]]:
        """The rate windows a run of (job, queue, key) counts in."""
        out: list[tuple[str, RateLimit]] = []
        ql, jl = self.queues.get(queue), self.jobs.get(job)
        if ql is not None and ql.rate_limit is not None:
            out.append((queue_rate_key(queue), ql.rate_limit))
        if jl is not None and jl.rate_limit is not None:
            out.append((job_rate_key(job, key), jl.rate_limit))
        return out

    def missing_windows(self, candidates: Iterable[tuple[str, str, str]]) -> dict[str, RateLimit]:
        """Rate windows the caller must count (into ``window_counts``) before ``admit`` sees these runs."""
        return {
            rk: limit
            for job, queue, key in candidates
            for rk, limit in self.rate_keys(job, queue, key)
            if rk not in self.window_counts
        }

    def admit(self, job: str, queue: str, key: str) -> bool:
        """Admit one run if every limit has room, counting it in; else mark what is saturated."""
        if queue in self.closed or job_key(job, key) in self.full:
            return False
        ql, jl = self.queues.get(queue), self.jobs.get(job)
        if ql is not None:
            if ql.max_concurrency is not None and self.queue_running.get(queue, 0) >= ql.max_concurrency:
                self.closed.add(queue)
                return False
            rate = ql.rate_limit
            if rate is not None and self.window_counts.get(queue_rate_key(queue), 0) >= rate.count:
                self.closed.add(queue)
                return False
        if jl is not None:
            running = self.job_running.get((job, key), 0)
            if jl.max_concurrency is not None and running >= jl.max_concurrency:
                self.full.add(job_key(job, key))
                return False
            rate = jl.rate_limit
            if rate is not None and self.window_counts.get(job_rate_key(job, key), 0) >= rate.count:
                self.full.add(job_key(job, key))
                return False
        for rk, _ in self.rate_keys(job, queue, key):
            self.window_counts[rk] = self.window_counts.get(rk, 0) + 1
            self.starts.append(rk)
        self.job_running[(job, key)] = self.job_running.get((job, key), 0) + 1
        self.queue_running[queue] = self.queue_running.get(queue, 0) + 1
        return True
