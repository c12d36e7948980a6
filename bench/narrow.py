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

import psycopg

from bench.drain_costs import backend_cpu, first_claim, make_app, replay_flights
from bench.runlane_bench import fresh_store

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


def candidates(table: str) -> str:
    """The claim's candidates (``{limit}`` is written in by ``replay_plain``)."""
    return f"""c AS MATERIALIZED (
    SELECT id FROM {table}
    WHERE status = 'pending' AND queue = %(queue)s AND job = ANY(%(jobs)s::text[]) AND due_at <= now()
      AND (not_after IS NULL OR not_after > now())
    ORDER BY priority DESC, due_at, id LIMIT {{limit}} FOR UPDATE SKIP LOCKED
)"""


def event_and_note(changed: str, old: str, new: str) -> str:
    """The status event of each row in CTE ``changed`` and the notification, as both variants write them."""
    return f"""ev AS (
    INSERT INTO runlane_events (run_id, id, kind, at, data)
    SELECT id, last_event_id, 'status', now(),
           jsonb_build_object('from', '{old}', 'to', '{new}', 'attempt', attempt, 'reason', NULL)
    FROM {changed}
), note AS (
    SELECT pg_notify('runlane_change', 'x') WHERE EXISTS (SELECT 1 FROM {changed})
)"""


FINISHES = "f AS (SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::int[]) AS f(id, attempt))"

# The rows to change are found by primary key, as in the store (queries.sql): joined to the candidates, a
# generic plan may hash a scan of the whole table; found by "status = 'running'", a finish scans the lease
# index, whose dead entries grow along the drain.
CLAIM_WIDE = f"""
WITH {candidates("runlane_runs")}, claimed AS (
    UPDATE runlane_runs r
    SET status = 'running', attempt = r.attempt + 1, worker_id = %(worker)s, lease_owner = %(worker)s,
        lease_expires_at = now() + interval '60 s', started_at = now(), last_event_id = r.last_event_id + 1,
        progress = NULL, progress_message = NULL
    WHERE r.id = ANY(ARRAY(SELECT id FROM c))
    RETURNING r.*
), att AS (
    INSERT INTO runlane_attempts (run_id, number, worker_id, started_at, status)
    SELECT id, attempt, %(worker)s, now(), 'running' FROM claimed
), {event_and_note("claimed", "pending", "running")}
SELECT r.* FROM claimed r LEFT JOIN note ON true ORDER BY r.priority DESC, r.due_at, r.id
"""

FINISH_WIDE = f"""
WITH {FINISHES}, upd AS (
    UPDATE runlane_runs r
    SET status = 'succeeded', result = 'null'::jsonb, error = NULL, finished_at = now(), lease_owner = NULL,
        lease_expires_at = NULL, last_event_id = r.last_event_id + 1
    FROM f
    WHERE r.id = ANY(%(ids)s::bigint[]) AND r.id = f.id AND coalesce(r.status, '') = 'running'
      AND r.attempt = f.attempt AND r.lease_owner = %(worker)s AND r.lease_expires_at > now()
    RETURNING r.id, r.attempt, r.last_event_id
), att AS (
    UPDATE runlane_attempts a SET status = 'succeeded', finished_at = now()
    FROM upd WHERE a.run_id = upd.id AND a.number = upd.attempt
), {event_and_note("upd", "running", "succeeded")}
SELECT count(*) FROM upd LEFT JOIN note ON true
"""

CLAIM_NARROW = f"""
WITH {candidates("n_state")}, claimed AS (
    UPDATE n_state s
    SET status = 'running', attempt = s.attempt + 1, lease_owner = %(worker)s,
        lease_expires_at = now() + interval '60 s', last_event_id = s.last_event_id + 1
    WHERE s.id = ANY(ARRAY(SELECT id FROM c))
    RETURNING s.*
), att AS (
    INSERT INTO n_attempts (run_id, number, worker_id, started_at, status)
    SELECT id, attempt, %(worker)s, now(), 'running' FROM claimed
), {event_and_note("claimed", "pending", "running")}
SELECT r.*, s.status, s.attempt, s.lease_owner, s.lease_expires_at, s.last_event_id, now() AS started_at
FROM claimed s JOIN n_runs r ON r.id = s.id LEFT JOIN note ON true
ORDER BY s.priority DESC, s.due_at, s.id
"""

FINISH_NARROW = f"""
WITH {FINISHES}, upd AS (
    UPDATE n_state s
    SET status = 'succeeded', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
        last_event_id = s.last_event_id + 1
    FROM f
    WHERE s.id = ANY(%(ids)s::bigint[]) AND s.id = f.id AND coalesce(s.status, '') = 'running'
      AND s.attempt = f.attempt AND s.lease_owner = %(worker)s AND s.lease_expires_at > now()
    RETURNING s.id, s.attempt, s.last_event_id
), att AS (
    UPDATE n_attempts a SET status = 'succeeded', finished_at = now(), result = 'null'::jsonb
    FROM upd WHERE a.run_id = upd.id AND a.number = upd.attempt
), {event_and_note("upd", "running", "succeeded")}
SELECT count(*) FROM upd LEFT JOIN note ON true
"""

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
    try:
        store = await app.open_store()
        claimed = await first_claim(store, batch)
        clock.start()
        flights = await replay_flights(store, claimed, batch)
        clock.stop()
    finally:
        await app.aclose()
    return sum(size for size, _ in flights)


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
            with conn.pipeline():
                conn.execute("BEGIN")
                ended = conn.execute(finish, {**params, "ids": ids, "attempts": attempts}, prepare=True)
                claimed = conn.execute(claim, params, prepare=True)
                conn.execute("COMMIT")
            assert ended.fetchone() == (len(ids),), "a finish was fenced off"
            done += len(ids)
            rows = claimed.fetchall()
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
