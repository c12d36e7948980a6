"""Claimers that call the PostgreSQL store's ``claim`` verb directly, many at once (T21, ``bench/claims.py``).

``python -m harness.claims URL JOB CLAIMERS BATCH OUT START_AT``: ``CLAIMERS`` coroutines on one store (one
pooled connection each) in this process, released together at wall time ``START_AT``, each claiming ``BATCH``
runs at a time until a claim finds nothing. Every claim is written to ``OUT`` (JSON): claimer, wall-clock
start and end, latency, and the ``(run_id, attempt, priority)`` it returned. Nothing is finished: each claim
must stand on its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from runlane.store.postgres import PostgresStore

LEASE = 3600.0  # nothing reaps these runs while the test looks at them


@dataclass(frozen=True, slots=True)
class Claim:
    claimer: str
    t_start: float
    t_end: float
    latency: float
    runs: tuple[tuple[int, int, int], ...]  # (run_id, attempt, priority) in returned order


async def _claim_all(url: str, job: str, claimers: int, batch: int, start_at: float) -> list[Claim]:
    store = PostgresStore(url, pool_min_size=claimers, pool_max_size=claimers)
    await store.open()
    claims: list[Claim] = []

    async def claimer(name: str) -> None:
        while True:
            t0, p0 = time.time(), time.perf_counter()
            runs = await store.claim(name, queues=["default"], jobs=[job], limit=batch, lease_timeout=LEASE)
            latency, t1 = time.perf_counter() - p0, time.time()
            claims.append(Claim(name, t0, t1, latency, tuple((r.id, r.attempt, r.priority) for r in runs)))
            if not runs:
                return  # nothing unlocked is pending: whatever remains is being claimed by the others

    try:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        await asyncio.gather(*(claimer(f"{os.getpid()}-{i}") for i in range(claimers)))
    finally:
        await store.close()
    return claims


def run_claimers(
    url: str, job: str, *, processes: int, per_process: int, batch: int, workdir: Path, env: dict[str, str]
) -> list[Claim]:
    """Start ``processes`` claimer processes together and return every claim they made."""
    start_at = time.time() + 1.0  # roughly together; a late process only claims less
    procs, outs = [], []
    for i in range(processes):
        out = workdir / f"claims-{i}.json"
        outs.append(out)
        argv = [sys.executable, "-m", "harness.claims", url, job, str(per_process), str(batch), str(out)]
        procs.append(subprocess.Popen([*argv, str(start_at)], env=env, cwd=workdir))
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0] * processes, f"claimer processes failed: {codes}"
    claims: list[Claim] = []
    for out in outs:
        for rec in json.loads(out.read_text()):
            claims.append(Claim(rec[0], rec[1], rec[2], rec[3], tuple(tuple(r) for r in rec[4])))  # type: ignore[misc]
    return claims


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def main() -> None:
    url, job, claimers, batch, out, start_at = sys.argv[1:7]
    claims = asyncio.run(_claim_all(url, job, int(claimers), int(batch), float(start_at)))
    Path(out).write_text(json.dumps([[c.claimer, c.t_start, c.t_end, c.latency, c.runs] for c in claims]))


if __name__ == "__main__":
    main()
