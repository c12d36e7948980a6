"""What a narrow run-state table would buy a PostgreSQL drain: the worker's flights replayed in plain SQL on
today's table and on a split one, with the same writes per run.

    .venv-bench/bin/python -m bench.narrow --url postgresql://postgres@127.0.0.1/bench_narrow --repeats 3

Today every claim and every finish rewrites the 25-column ``runlane_runs`` row; its status is indexed, so the
update is never HOT and each new version also enters the primary key, ``runlane_runs_job`` and a partial index.
The split keeps what a claim reads and a finish changes (status, attempt, lease, due time, event counter) in a
small ``state`` row with the claim, lease and retention indexes, the run's description in an insert-only
``runs`` row, and the result on the attempt row that a finish updates anyway.

Variants, each in a fresh database, alternating, ``--runs`` pre-enqueued no-op runs drained in flights of
``--batch`` (finish the last claim, claim as many; one transaction, one pipeline):

- ``store``: the PostgreSQL store's own ``finish_and_claim`` (continuations, promotion and batch counters
  included): the reference the two plain-SQL variants are checked against.
- ``wide``: today's table, with the statements below.
- ``narrow``: the split tables, with the same writes: the run's status change, an attempt row written at the
  claim and finished with the result, a status event each way, a notification each way.

Prints runs/s and the database backends' CPU per run (``/proc``, as ``bench.drain_costs``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import psycopg

from bench.drain_costs import backend_cpu, make_app
from bench.runlane_bench import fresh_store
from runlane.store import Finish

NARROW_DDL = """
CREATE TABLE n_runs AS SELECT id, job, args, queue, priority, max_attempts, not_before, not_after, dedup_id,
    tags, parent_run_id, root_run_id, batch_id, schedule_id, created_at, continue_when, concurrency_key
FROM runlane_runs;
ALTER TABLE n_runs ADD PRIMARY KEY (id);
CREATE INDEX ON n_runs (job, id);
CREATE TABLE n_state AS SELECT id, status, queue, job, priority, due_at, not_after, attempt,
    lease_owner, lease_expires_at, finished_at, last_event_id
FROM runlane_runs;
ALTER TABLE n_state ADD PRIMARY KEY (id);
CREATE INDEX ON n_state (queue, priority DESC, due_at, id) WHERE status = 'pending';
CREATE INDEX ON n_state (lease_expires_at) WHERE status = 'running';
CREATE INDEX ON n_state (finished_at) WHERE status IN ('succeeded', 'failed', 'cancelled', 'skipped');
CREATE TABLE n_attempts (LIKE runlane_attempts INCLUDING ALL);
ALTER TABLE n_attempts ADD COLUMN result jsonb;
TRUNCATE runlane_runs
"""
# No ANALYZE: the wide variant's tables have none either, and an attempts table analyzed while empty gets a
# generic plan that scans it sequentially at every finish.

# Both finishes find their rows by primary key, as the store's does (queries.sql, finish_attempts): with a
# plain "status = 'running'" the planner scans the lease index, whose dead entries grow along the drain.
CLAIM_WIDE = """
WITH c AS MATERIALIZED (
    SELECT id FROM runlane_runs
    WHERE status = 'pending' AND queue = %(queue)s AND job = ANY(%(jobs)s::text[]) AND due_at <= now()
      AND (not_after IS NULL OR not_after > now())
    ORDER BY priority DESC, due_at, id LIMIT {limit} FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE runlane_runs r
    SET status = 'running', attempt = r.attempt + 1, worker_id = %(worker)s, lease_owner = %(worker)s,
        lease_expires_at = now() + interval '60 s', started_at = now(), last_event_id = r.last_event_id + 1,
        progress = NULL, progress_message = NULL
    FROM c WHERE r.id = c.id
    RETURNING r.*
), att AS (
    INSERT INTO runlane_attempts (run_id, number, worker_id, started_at, status)
    SELECT id, attempt, %(worker)s, now(), 'running' FROM claimed
), ev AS (
    INSERT INTO runlane_events (run_id, id, kind, at, data)
    SELECT id, last_event_id, 'status', now(),
           jsonb_build_object('from', 'pending', 'to', 'running', 'attempt', attempt, 'reason', NULL)
    FROM claimed
), note AS (
    SELECT pg_notify('runlane_change', 'x') WHERE EXISTS (SELECT 1 FROM claimed)
)
SELECT r.* FROM claimed r LEFT JOIN note ON true ORDER BY r.priority DESC, r.due_at, r.id
"""

FINISH_WIDE = """
WITH f AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::int[]) AS f(id, attempt)
), upd AS (
    UPDATE runlane_runs r
    SET status = 'succeeded', result = 'null'::jsonb, error = NULL, finished_at = now(), lease_owner = NULL,
        lease_expires_at = NULL, last_event_id = r.last_event_id + 1
    FROM f
    WHERE r.id = ANY(%(ids)s::bigint[]) AND r.id = f.id AND coalesce(r.status, '') = 'running'
      AND r.attempt = f.attempt AND r.lease_owner = %(worker)s
      AND r.lease_expires_at > now()
    RETURNING r.id, r.attempt, r.last_event_id
), att AS (
    UPDATE runlane_attempts a SET status = 'succeeded', finished_at = now()
    FROM upd WHERE a.run_id = upd.id AND a.number = upd.attempt
), ev AS (
    INSERT INTO runlane_events (run_id, id, kind, at, data)
    SELECT id, last_event_id, 'status', now(),
           jsonb_build_object('from', 'running', 'to', 'succeeded', 'attempt', attempt, 'reason', NULL)
    FROM upd
), note AS (
    SELECT pg_notify('runlane_change', 'x') WHERE EXISTS (SELECT 1 FROM upd)
)
SELECT count(*) FROM upd LEFT JOIN note ON true
"""

CLAIM_NARROW = """
WITH c AS MATERIALIZED (
    SELECT id FROM n_state
    WHERE status = 'pending' AND queue = %(queue)s AND job = ANY(%(jobs)s::text[]) AND due_at <= now()
      AND (not_after IS NULL OR not_after > now())
    ORDER BY priority DESC, due_at, id LIMIT {limit} FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE n_state s
    SET status = 'running', attempt = s.attempt + 1, lease_owner = %(worker)s,
        lease_expires_at = now() + interval '60 s', last_event_id = s.last_event_id + 1
    FROM c WHERE s.id = c.id
    RETURNING s.*
), att AS (
    INSERT INTO n_attempts (run_id, number, worker_id, started_at, status)
    SELECT id, attempt, %(worker)s, now(), 'running' FROM claimed
), ev AS (
    INSERT INTO runlane_events (run_id, id, kind, at, data)
    SELECT id, last_event_id, 'status', now(),
           jsonb_build_object('from', 'pending', 'to', 'running', 'attempt', attempt, 'reason', NULL)
    FROM claimed
), note AS (
    SELECT pg_notify('runlane_change', 'x') WHERE EXISTS (SELECT 1 FROM claimed)
)
SELECT r.*, s.status, s.attempt, s.lease_owner, s.lease_expires_at, s.last_event_id, now() AS started_at
FROM claimed s JOIN n_runs r ON r.id = s.id LEFT JOIN note ON true
ORDER BY s.priority DESC, s.due_at, s.id
"""

FINISH_NARROW = """
WITH f AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::int[]) AS f(id, attempt)
), upd AS (
    UPDATE n_state s
    SET status = 'succeeded', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
        last_event_id = s.last_event_id + 1
    FROM f
    WHERE s.id = ANY(%(ids)s::bigint[]) AND s.id = f.id AND coalesce(s.status, '') = 'running'
      AND s.attempt = f.attempt AND s.lease_owner = %(worker)s
      AND s.lease_expires_at > now()
    RETURNING s.id, s.attempt, s.last_event_id
), att AS (
    UPDATE n_attempts a SET status = 'succeeded', finished_at = now(), result = 'null'::jsonb
    FROM upd WHERE a.run_id = upd.id AND a.number = upd.attempt
), ev AS (
    INSERT INTO runlane_events (run_id, id, kind, at, data)
    SELECT id, last_event_id, 'status', now(),
           jsonb_build_object('from', 'running', 'to', 'succeeded', 'attempt', attempt, 'reason', NULL)
    FROM upd
), note AS (
    SELECT pg_notify('runlane_change', 'x') WHERE EXISTS (SELECT 1 FROM upd)
)
SELECT count(*) FROM upd LEFT JOIN note ON true
"""

FLIGHTS: list[float] = []
PLAIN: dict[str, tuple[str, str, str]] = {
    "wide": (CLAIM_WIDE, FINISH_WIDE, ""),
    "wide_nojob": (CLAIM_WIDE, FINISH_WIDE, "DROP INDEX runlane_runs_job"),
    "narrow": (CLAIM_NARROW, FINISH_NARROW, NARROW_DDL),
}


async def backlog(url: str, runs: int) -> None:
    app = make_app(url, None)
    try:
        await app.async_client.trigger_many("noop", [{} for _ in range(runs)])
    finally:
        await app.aclose()


class Clock:
    """Wall time and the backends' CPU between start() and stop(), both called while connected (a backend's
    CPU can only be read while it lives)."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.elapsed = self.server = 0.0

    def start(self) -> None:
        self.server = -backend_cpu(self.database)
        self.elapsed = -time.perf_counter()

    def stop(self) -> None:
        self.elapsed += time.perf_counter()
        self.server += backend_cpu(self.database)


async def replay_store(url: str, batch: int, clock: Clock) -> int:
    app = make_app(url, None)
    store = await app.open_store()
    options: dict[str, Any] = {
        "worker_id": "replay",
        "queues": ["default"],
        "jobs": ["noop"],
        "lease_timeout": 60.0,
    }
    await store.register_worker("replay", {})
    done = 0
    clock.start()
    claimed = await store.claim(limit=batch, **options)
    while claimed:
        finishes = [Finish(r.id, r.attempt, "succeeded") for r in claimed]
        _, claimed = await store.finish_and_claim(finishes, limit=batch, **options)
        done += len(finishes)
    clock.stop()
    await app.aclose()
    return done


def replay_plain(url: str, variant: str, batch: int, clock: Clock) -> int:
    claim, finish, _ = PLAIN[variant]
    # The limit is written into the statement: with a parameter, PostgreSQL's generic plan (taken after five
    # executions) guesses the claimed rows' count and joins them by hashing whole tables (9.5 against 1.0 ms).
    claim = claim.replace("{limit}", str(batch))
    params = {"queue": "default", "jobs": ["noop"], "worker": "replay"}
    done = 0
    with psycopg.connect(url, autocommit=True) as conn:
        clock.start()
        rows = conn.execute(claim, params, prepare=True).fetchall()
        while rows:
            ids = [row[0] for row in rows]
            attempts = [1] * len(rows)  # every run is on its first attempt
            t = time.perf_counter()
            with conn.pipeline():
                conn.execute("BEGIN")
                ended = conn.execute(finish, {**params, "ids": ids, "attempts": attempts}, prepare=True)
                claimed = conn.execute(claim, params, prepare=True)
                conn.execute("COMMIT")
            assert ended.fetchone() == (len(ids),), "a finish was fenced off"
            done += len(ids)
            rows = claimed.fetchall()
            FLIGHTS.append(time.perf_counter() - t)
        clock.stop()
    return done


def measure(url: str, variant: str, runs: int, batch: int) -> tuple[float, float]:
    database = url.rpartition("/")[2]
    fresh_store(url, make_app(url, None))
    asyncio.run(backlog(url, runs))
    if variant != "store":
        with psycopg.connect(url, autocommit=True) as conn:
            for statement in PLAIN[variant][2].split(";"):
                if statement.strip():
                    conn.execute(statement)
    clock = Clock(database)
    if variant == "store":
        done = asyncio.run(replay_store(url, batch, clock))
    else:
        done = replay_plain(url, variant, batch, clock)
    if done != runs:
        raise SystemExit(f"{variant}: drained {done} of {runs} runs")
    return runs / clock.elapsed, 1e6 * clock.server / runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="store,wide,narrow")
    args = parser.parse_args()
    variants = args.variants.split(",")
    figures: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            figures[variant].append(measure(args.url, variant, args.runs, args.batch))
    print(
        f"| variant ({args.runs:,} runs, flights of {args.batch}) | runs/s | backends' CPU, \u00b5s per run |"
    )
    print("|---|---|---|")
    for variant, cells in figures.items():
        rates = [rate for rate, _ in cells]
        cpus = [cpu for _, cpu in cells]
        print(
            f"| {variant} | {statistics.median(rates):,.0f} ({min(rates):,.0f}\u2013{max(rates):,.0f}) "
            f"| {statistics.median(cpus):.1f} ({min(cpus):.1f}\u2013{max(cpus):.1f}) |"
        )


if __name__ == "__main__":
    main()
