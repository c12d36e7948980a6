"""T21 skip_locked_claim_integrity: concurrent claimers in several processes call the PostgreSQL store's claim
verb directly, batch size 10, over a backlog with random priorities.

Each ``(run_id, attempt)`` must be claimed exactly once, no claim may return more than its batch, and claims
must respect priority: within a claim, and across claims — a claim that started after another one ended never
gets a run of higher priority than the lowest that one got (every run was pending before the first claim, and
a row skipped as locked is claimed by the claim that locked it). The claim's plan on this loaded table must
use the partial index (the same check as the contract suite's plan test). Per-claimer p99 latency is printed
and recorded (``bench/claims.py`` measures it on its own), not asserted.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import Counter, defaultdict

import psycopg
import pytest
from claim_plan import assert_claim_plan
from harness.checker import Report
from harness.claims import Claim, p99, run_claimers
from harness.scenario import Scenario, scale

from runlane.store import NewRun
from runlane.store.postgres import PostgresStore

pytestmark = pytest.mark.serial  # CPU-heavy or measures latency: runs alone (scripts/test)

JOB, BATCH = "claim_probe", 10


async def _backlog(url: str, runs: int, priorities: list[int]) -> list[int]:
    store = PostgresStore(url)
    await store.open()
    try:
        ids: list[int] = []
        for start in range(0, runs, 5000):
            chunk = [
                NewRun(JOB, {"i": i}, priority=priorities[i]) for i in range(start, min(runs, start + 5000))
            ]
            ids.extend(r.id for r in await store.insert_runs(chunk))
        return ids
    finally:
        await store.close()


def _order_violations(claims: list[Claim]) -> list[str]:
    problems = []
    for c in claims:
        prios = [p for _, _, p in c.runs]
        if prios != sorted(prios, reverse=True):
            problems.append(
                f"claim by {c.claimer} at {c.t_start:.4f} returned priorities out of order: {prios}"
            )
    # For each claim D: min over claims C that ended before D started of C's lowest priority, vs D's highest.
    done = sorted((c for c in claims if c.runs), key=lambda c: c.t_end)
    ends = [c.t_end for c in done]
    prefix_min: list[int] = []
    for c in done:
        low = min(p for _, _, p in c.runs)
        prefix_min.append(low if not prefix_min else min(prefix_min[-1], low))
    for d in claims:
        if not d.runs:
            continue
        k = bisect.bisect_left(ends, d.t_start)
        if k and max(p for _, _, p in d.runs) > prefix_min[k - 1]:
            top = max(p for _, _, p in d.runs)
            problems.append(
                f"claim by {d.claimer} at {d.t_start:.4f} got priority {top} after a finished claim had "
                f"already settled for {prefix_min[k - 1]}"
            )
    return problems


@pytest.mark.postgres
def test_skip_locked_claim_integrity(pg_scenario: Scenario) -> None:
    scenario = pg_scenario
    runs, claimers = scale(20_000, 200_000), scale(8, 32)
    processes = scale(4, 8)
    priorities = [scenario.random.randint(-5, 5) for _ in range(runs)]
    ids = asyncio.run(_backlog(scenario.url, runs, priorities))

    with psycopg.connect(scenario.url, autocommit=True) as conn:
        conn.execute("ANALYZE runlane_runs")
        for mode in ("force_custom_plan", "force_generic_plan"):
            conn.execute(f"SET plan_cache_mode = {mode}")
            assert_claim_plan(conn, ["default"], [JOB])

    claims = run_claimers(
        scenario.url,
        JOB,
        processes=processes,
        per_process=claimers // processes,
        batch=BATCH,
        workdir=scenario.workdir,
        env=scenario.env(),
    )

    claimed = Counter((run_id, attempt) for c in claims for run_id, attempt, _ in c.runs)
    twice = [key for key, n in claimed.items() if n > 1]
    assert not twice, f"claimed more than once: {twice[:20]}"
    missing = set(ids) - {run_id for run_id, _ in claimed}
    assert not missing, f"{len(missing)} runs never claimed, e.g. {sorted(missing)[:20]}"
    assert {attempt for _, attempt in claimed} == {1}
    assert len(claimed) == runs
    oversized = [len(c.runs) for c in claims if len(c.runs) > BATCH]
    assert not oversized, oversized
    problems = _order_violations(claims)
    assert not problems, problems[:10]
    with psycopg.connect(scenario.url) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'running' AND attempt = 1), count(*) FROM runlane_runs"
        ).fetchone()
        attempts = conn.execute(
            "SELECT count(*), count(DISTINCT (run_id, number)) FROM runlane_attempts"
        ).fetchone()
    assert row == (runs, runs) and attempts == (runs, runs), (row, attempts)

    latencies: dict[str, list[float]] = defaultdict(list)
    for c in claims:
        latencies[c.claimer].append(c.latency)
    per_claimer = {name: round(p99(values) * 1000, 2) for name, values in sorted(latencies.items())}
    sizes = Counter(len(c.runs) for c in claims)
    print(f"claims={len(claims)} sizes={dict(sizes)} per-claimer p99 ms={per_claimer}")
    scenario.record(
        Report(runs=runs),
        claims=len(claims),
        claimers=claimers,
        claim_p99_ms_worst=max(per_claimer.values()),
        claim_p99_ms_best=min(per_claimer.values()),
    )
