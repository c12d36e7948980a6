"""Claim latency under SKIP LOCKED contention: N claimers (in P processes) calling the PostgreSQL store's
``claim`` verb directly, batch 10, over a backlog with random priorities — the load of chaos test T21, whose
claimer processes this reuses (``tests/chaos/harness/claims.py``). Prints per-claimer p50/p99 latency.

    .venv/bin/python -m bench.claims --url postgresql://postgres@127.0.0.1/bench_claims --claimers 8 --runs 20000

The database is dropped and recreated first (like every bench script).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "chaos"))

from harness.claims import p99, run_claimers  # noqa: E402

from bench.runlane_bench import fresh_store  # noqa: E402
from runlane import Runlane  # noqa: E402
from runlane.store import NewRun  # noqa: E402
from runlane.store.postgres import PostgresStore  # noqa: E402

JOB = "claim_probe"


async def backlog(url: str, runs: int, seed: int) -> None:
    rng = random.Random(seed)
    store = PostgresStore(url)
    await store.open()
    try:
        for start in range(0, runs, 5000):
            count = min(runs, start + 5000) - start
            await store.insert_runs([NewRun(JOB, {}, priority=rng.randint(-5, 5)) for _ in range(count)])
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.claims")
    parser.add_argument("--url", required=True)
    parser.add_argument("--claimers", type=int, default=8)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    opts = parser.parse_args()

    fresh_store(opts.url, Runlane(opts.url))
    asyncio.run(backlog(opts.url, opts.runs, opts.seed))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "chaos"), str(ROOT), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as workdir:
        claims = run_claimers(
            opts.url,
            JOB,
            processes=opts.processes,
            per_process=opts.claimers // opts.processes,
            batch=opts.batch,
            workdir=Path(workdir),
            env=env,
        )
    elapsed = max(c.t_end for c in claims) - min(c.t_start for c in claims)
    per_claimer: dict[str, list[float]] = defaultdict(list)
    for claim in claims:
        per_claimer[claim.claimer].append(claim.latency)
    claimed = sum(len(c.runs) for c in claims)
    print(
        f"{opts.claimers} claimers in {opts.processes} processes, batch {opts.batch}: {claimed} runs in "
        f"{len(claims)} claims, {claimed / elapsed:,.0f} runs/s (load {os.getloadavg()[0]:.1f})"
    )
    print("| claimer | claims | p50 ms | p99 ms |\n|---|---|---|---|")
    for name, values in sorted(per_claimer.items()):
        print(
            f"| {name} | {len(values)} | {statistics.median(values) * 1000:.1f} | {p99(values) * 1000:.1f} |"
        )
    worst = max(p99(v) for v in per_claimer.values())
    print(f"worst per-claimer p99: {worst * 1000:.1f} ms")


if __name__ == "__main__":
    main()
