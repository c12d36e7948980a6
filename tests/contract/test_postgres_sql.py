"""PostgreSQL-only properties of the store's SQL: the claim plan, claim integrity under contention, dedup races
with rolled-back holders, bulk inserts, concurrent migrators, idle claims that leave the limit locks alone."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from claim_plan import assert_claim_plan, plan_nodes
from psycopg import sql

from runlane.errors import RunConflict
from runlane.limits import JobLimits, QueueLimits
from runlane.models import ACTIVE_STATUSES
from runlane.store import Finish, NewRun
from runlane.store.postgres import PostgresStore
from runlane.store.postgres.flow import F, lock_key
from runlane.store.postgres.queries import Q
from runlane.store.postgres.rows import finish_params
from runlane.store.postgres.trip import FLIGHT_SETTINGS

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(pg_url)
    await store.open()
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


@pytest.mark.parametrize("queues", [["q0"], ["q0", "q1"]])
@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
async def test_claim_plan_scans_the_partial_index_in_order_and_materialises_candidates(
    pg: PostgresStore, pg_url: str, queues: list[str], plan_mode: str
) -> None:
    await pg.insert_runs([NewRun("a", {}, queue=f"q{i % 3}", priority=i % 3) for i in range(6000)])
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE runlane_runs SET status = 'succeeded' WHERE id % 4 <> 0")
        conn.execute("ANALYZE runlane_runs")
        conn.execute(f"SET plan_cache_mode = {plan_mode}")
        assert_claim_plan(conn, queues, ["a"])


@contextmanager
def prepared(
    conn: psycopg.Connection[Any], name: str
) -> Iterator[Callable[[dict[str, Any]], list[dict[str, Any]]]]:
    """Query ``name`` as a prepared statement under generic plans, and a function that EXPLAINs an execution
    of it: the first one builds the generic plan and later ones show it as cached."""
    names: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    conn.execute("PREPARE hot AS " + re.sub(r"%\((\w+)\)s", placeholder, Q[name]))  # type: ignore[arg-type]
    conn.execute("SET plan_cache_mode = force_generic_plan")

    def explain(params: dict[str, Any]) -> list[dict[str, Any]]:
        values = sql.SQL(", ").join(sql.Literal(params[n]) for n in names)
        row = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) EXECUTE hot ({})").format(values)).fetchone()
        assert row is not None
        plan = row[0] if not isinstance(row[0], str) else json.loads(row[0])
        return plan_nodes(plan[0]["Plan"])

    try:
        yield explain
    finally:
        conn.execute("DEALLOCATE hot")


def assert_keyed_or_scanned(nodes: list[dict[str, Any]], relation: str, *, keyed: bool) -> None:
    """A cached plan reads ``relation`` by its primary key alone (``keyed``), or scans it: the way round that
    shows a test's setup still provokes the scan its settings prevent."""
    scans = [
        (n["Node Type"], n.get("Index Name"))
        for n in nodes
        if n.get("Relation Name") == relation and n["Node Type"] != "ModifyTable"
    ]
    if keyed:
        assert scans == [("Index Scan", f"{relation}_pkey")], scans
    else:
        assert ("Seq Scan", None) in scans, scans


def generic_plan(conn: psycopg.Connection[Any], name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan nodes of query ``name`` as a prepared statement's generic plan, the one a worker's cached
    statement ends up with (EXPLAIN with bound values would show a custom plan instead)."""
    with prepared(conn, name) as explain:
        return explain(params)


@pytest.mark.parametrize("analyzed", [False, True])
async def test_finish_statements_look_runs_up_by_key_however_long_the_history(
    pg: PostgresStore, pg_url: str, analyzed: bool
) -> None:
    """Regression (issue 6): the finish's generic plan joined the finishes to a sequential scan of every run
    (the planner guesses 100 rows for jsonb_array_elements), and the continuation decision that follows every
    finish scanned the index of finished runs: both cost O(history), 1.5 ms and 0.4 ms per 16 finishes after
    8,000 runs. Autovacuum may not have analysed the table yet, or may be off: both cases are checked."""
    runs = await pg.insert_runs([NewRun("a", {}) for _ in range(6000)])
    with psycopg.connect(pg_url, autocommit=True) as conn:
        # History (finished runs), child runs and runs scheduled for later: none may be scanned to finish 16
        # runs (with none of a kind, scanning its empty index is the cheapest plan, rightly).
        conn.execute("UPDATE runlane_runs SET parent_run_id = id - 1, root_run_id = id - 1 WHERE id % 3 = 1")
        conn.execute(
            "UPDATE runlane_runs SET status = CASE WHEN id % 3 = 0 THEN 'scheduled' ELSE 'succeeded' END,"
            " finished_at = CASE WHEN id % 3 = 0 THEN NULL ELSE now() END,"
            " due_at = CASE WHEN id % 3 = 0 THEN now() + interval '1 hour' ELSE due_at END"
            " WHERE id % 50 <> 0"
        )
        if analyzed:
            conn.execute("ANALYZE runlane_runs")
        ids = [r.id for r in runs[:16]]
        finishes = [Finish(run_id, 1, "succeeded") for run_id in ids]
        common = {"now": None, "worker": "w", "token": "t", "channels": ["runlane_change"]}
        for name, params in [
            ("finish_attempts", {**finish_params(finishes), **common}),
            ("resolve_continuations", pg._resolve_params(ids)),
        ]:
            nodes = generic_plan(conn, name, params)
            seq_scans = [
                n for n in nodes if n["Node Type"] == "Seq Scan" and n["Relation Name"] == "runlane_runs"
            ]
            assert not seq_scans, name
            indexes = {n["Index Name"] for n in nodes if "Index Name" in n}
            assert "runlane_runs_pkey" in indexes, (name, indexes)
            # Not runlane_runs_root either, as a rule; but with stale statistics that say there are no child
            # runs (this shared database's tables were analysed by earlier tests) the planner may scan it
            # whole, and it weighs that scan by the index's actual size, so it stops doing so as children grow.
            assert not indexes & {"runlane_runs_finished", "runlane_runs_job", "runlane_runs_waiting"}, (
                name,
                indexes,
            )


@pytest.mark.parametrize("name", ["claim", "promote_and_claim", "promote_due"])
async def test_claim_statements_update_runs_by_key_when_statistics_saw_a_backlog(
    pg: PostgresStore, pg_url: str, name: str
) -> None:
    """Regression (issue 6): analysed while most of the table was a backlog (a burst enqueued before
    autovacuum came by, or a manual VACUUM ANALYZE as here), the claim's generic plan guessed hundreds of
    candidates for its LIMIT and joined them to a sequential scan of every run to update them: 7.0 against
    0.7 ms per claim of 32 runs among 20,000. The claimed and promoted runs are now looked up by primary key
    (the promotion's too: it failed the same way)."""
    await pg.insert_runs([NewRun("a", {}) for _ in range(20000)])
    with psycopg.connect(pg_url, autocommit=True) as conn:
        if name != "claim":  # runs due for promotion
            conn.execute("UPDATE runlane_runs SET status = 'scheduled' WHERE id % 2 = 0")
        conn.execute("VACUUM ANALYZE")
        params = pg._claim_params("w", ["default"], ["a"], 32, 30.0, None)
        nodes = generic_plan(conn, name, params)
    seq_scans = [n for n in nodes if n["Node Type"] == "Seq Scan" and n["Relation Name"] == "runlane_runs"]
    assert not seq_scans, [n["Node Type"] for n in nodes]
    updates = [n for n in nodes if n["Node Type"] == "ModifyTable" and n["Relation Name"] == "runlane_runs"]
    assert updates
    for update in updates:
        below = plan_nodes(update)[1:]
        scans = [
            (n["Node Type"], n.get("Index Name")) for n in below if n.get("Relation Name") == "runlane_runs"
        ]
        assert scans == [("Index Scan", "runlane_runs_pkey")], scans


@pytest.mark.parametrize("settings", [True, False])
async def test_flight_finishes_find_attempts_by_key_when_statistics_saw_none(
    pg: PostgresStore, pg_url: str, settings: bool
) -> None:
    """Regression (issue 6): a VACUUM ANALYZE on a fresh database records no attempts; until autovacuum
    analyses them again (a minute or more), the finish's cached generic plan scanned every attempt in each
    flight. Flights turn sequential scans off (FLIGHT_SETTINGS); without them the plan is that scan, which
    shows the setup still provokes it (on the PostgreSQL this suite runs on)."""
    await pg.insert_runs([NewRun("a", {}) for _ in range(3000)])
    finishes = [Finish(run_id, 1, "succeeded") for run_id in range(1, 33)]
    params = {**finish_params(finishes), "now": None, "worker": "w", "token": "t", "channels": []}
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        with conn.transaction():
            if settings:
                conn.execute(FLIGHT_SETTINGS)
            with prepared(conn, "finish_attempts") as explain:
                explain(params)  # the generic plan, made while there are no attempts and cached
                conn.execute(
                    "INSERT INTO runlane_attempts (run_id, number, worker_id, started_at, status)"
                    " SELECT id, 1, 'w', now(), 'running' FROM runlane_runs"
                )
                nodes = explain(params)
    assert_keyed_or_scanned(nodes, "runlane_attempts", keyed=settings)


@pytest.mark.parametrize("settings", [True, False])
async def test_flights_never_compile_a_table_scan_with_jit(
    pg: PostgresStore, pg_url: str, settings: bool
) -> None:
    """Regression (issue 6): under FLIGHT_SETTINGS a table read whole (the limit-aware claim reads the limits
    tables) is still scanned, at the 10^10 cost that disabling scans adds; that passed ``jit_above_cost``
    and every execution spent 10-70 ms compiling. Flights turn JIT off; without that the same plan is JIT
    compiled (which shows the setup still provokes it on a server built with JIT)."""
    await pg.register_limits([JobLimits("a", max_concurrency=1)], [])
    with psycopg.connect(pg_url, autocommit=True) as conn:
        jit_available = conn.execute("SELECT pg_jit_available()").fetchone() == (True,)
        with conn.transaction():
            conn.execute(FLIGHT_SETTINGS)
            if not settings:
                conn.execute("SET LOCAL jit = on")
            row = conn.execute(
                "EXPLAIN (FORMAT JSON) SELECT job, max_concurrency FROM runlane_job_limits"
            ).fetchone()
    assert row is not None
    plan = row[0][0]
    assert plan["Plan"]["Node Type"] == "Seq Scan"
    if settings:
        assert "JIT" not in plan, plan
    else:
        assert ("JIT" in plan) == jit_available, plan


async def test_concurrent_claimers_claim_each_run_exactly_once(pg_url: str) -> None:
    stores = [PostgresStore(pg_url) for _ in range(2)]
    for s in stores:
        await s.open()
    await stores[0].migrate()
    try:
        total = 2000
        await stores[0].insert_runs([NewRun("a", {}, priority=i % 5) for i in range(total)])
        claimed: Counter[tuple[int, int]] = Counter()
        sizes: list[int] = []

        async def claimer(n: int) -> None:
            store = stores[n % 2]
            while True:
                runs = await store.claim(f"w{n}", queues=["default"], jobs=["a"], limit=10, lease_timeout=30)
                if not runs:
                    return
                sizes.append(len(runs))
                claimed.update((r.id, r.attempt) for r in runs)
                await store.finish_attempts(
                    [Finish(r.id, r.attempt, "succeeded") for r in runs], worker_id=f"w{n}"
                )

        await asyncio.gather(*(claimer(n) for n in range(8)))
        assert len(claimed) == total
        assert set(claimed.values()) == {1}
        assert max(sizes) <= 10
    finally:
        for s in stores:
            await s.close()


async def test_bulk_insert_returns_runs_in_input_order_with_increasing_ids(pg: PostgresStore) -> None:
    runs = await pg.insert_runs([NewRun("a", {"i": i}, tags=("x", 'q"uote')) for i in range(12_000)])
    assert [r.args["i"] for r in runs] == list(range(12_000))
    ids = [r.id for r in runs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    stored = await pg.get_run(runs[-1].id)
    assert stored == runs[-1]


async def test_dedup_race_with_rolled_back_holders_keeps_exactly_one_active_run(pg_url: str) -> None:
    """Many triggers of one dedup id at once, half in caller transactions that roll back (cf. oban#1087)."""
    store = PostgresStore(pg_url, pool_max_size=8)
    await store.open()
    await store.migrate()
    try:
        for round_ in range(5):
            dedup = f"race-{round_}"
            outcomes: list[tuple[str, int]] = []

            async def direct(
                policy: str, dedup: str = dedup, outcomes: list[tuple[str, int]] = outcomes
            ) -> None:
                try:
                    (run,) = await store.insert_runs(
                        [NewRun("a", {}, dedup_id=dedup)],
                        on_conflict=policy,  # type: ignore[arg-type]
                    )
                    outcomes.append(("ok", run.id))
                except RunConflict as exc:
                    outcomes.append(("conflict", exc.existing_run_id))

            async def rolled_back(dedup: str = dedup) -> None:
                async with await psycopg.AsyncConnection.connect(pg_url) as conn:
                    try:
                        await store.insert_runs_in_transaction(conn, [NewRun("a", {}, dedup_id=dedup)])
                        await asyncio.sleep(0.01)  # hold the index entry while the others queue behind it
                    except RunConflict:
                        pass
                    await conn.rollback()

            tasks = [rolled_back() for _ in range(8)]
            tasks += [direct("raise") for _ in range(4)] + [direct("return_existing") for _ in range(4)]
            await asyncio.gather(*tasks)

            with psycopg.connect(pg_url) as conn:
                rows = conn.execute(
                    "SELECT id FROM runlane_runs WHERE dedup_id = %s AND status = ANY(%s)",
                    (dedup, [s.value for s in ACTIVE_STATUSES]),
                ).fetchall()
            assert len(rows) == 1, rows  # a committed trigger happened, so exactly one run exists
            winner = rows[0][0]
            assert all(run_id == winner for _, run_id in outcomes), outcomes
            assert sum(1 for kind, _ in outcomes if kind == "ok") >= 1
    finally:
        await store.close()


async def test_concurrent_migrators_apply_each_migration_once(pg_url: str) -> None:
    # A fresh schema stands in for a fresh database; it also proves libpq `options` in the URL are kept.
    schema = "runlane_migrate_race"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.execute(f"CREATE SCHEMA {schema}")
    url = f"{pg_url}?options=-c%20search_path%3D{schema}"
    stores = [PostgresStore(url) for _ in range(4)]
    try:
        assert (await stores[0].schema_version())[0] == 0
        results = await asyncio.gather(*(s.migrate() for s in stores))
        current, latest = await stores[0].schema_version()
        assert current == latest >= 1
        assert sorted(v for r in results for v in r) == list(range(1, latest + 1))
    finally:
        for s in stores:
            await s.close()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_idle_limit_aware_claims_take_no_limit_locks(pg: PostgresStore, pg_url: str) -> None:
    """Regression (chaos T15): with nothing limited due, a claim must not queue for the limit locks. Idle
    workers polling at 0.1 s serialised on them on every poll, and a worker woken for new work waited its
    turn: wake-up p99 went from tens to hundreds of milliseconds."""
    await pg.register_limits([JobLimits("limited", max_concurrency=1)], [])
    await pg.insert_runs([NewRun("plain", {})])
    with psycopg.connect(pg_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (lock_key("job", "limited"),))  # a slow limited claimer
        runs = await asyncio.wait_for(
            pg.claim("w", queues=["default"], jobs=["plain", "limited"], limit=5, lease_timeout=30),
            timeout=10,
        )
        assert [r.job for r in runs] == ["plain"]
        assert (
            await asyncio.wait_for(
                pg.claim("w", queues=["default"], jobs=["plain", "limited"], limit=5, lease_timeout=30),
                timeout=10,
            )
            == []
        )
        (limited,) = await pg.insert_runs([NewRun("limited", {})])
        blocked = asyncio.ensure_future(
            pg.claim("w2", queues=["default"], jobs=["limited"], limit=5, lease_timeout=30)
        )
        await asyncio.sleep(0.2)  # not a timing assertion: a due limited run does need the lock
        assert not blocked.done()
        holder.execute("SELECT pg_advisory_unlock_all()")
    assert [r.id for r in await asyncio.wait_for(blocked, timeout=30)] == [limited.id]


async def test_a_limit_registered_elsewhere_is_claimed_under_its_own_lock(
    pg: PostgresStore, pg_url: str
) -> None:
    """The limit-aware claim plans its locks from a cached view of what is limited (up to a second old) and
    reads the limits again inside its transaction. A job limit another process registered since is not among
    the locks taken, so its runs are not admitted by that transaction; the claim goes again at once with the
    view it just read, under that limit's lock, and the limit holds."""
    await pg.register_limits([], [QueueLimits("default", max_concurrency=100)])
    assert await pg.claim("w", queues=["default"], jobs=["j"], limit=5, lease_timeout=30) == []  # view cached
    other = PostgresStore(pg_url)
    await other.open()
    try:
        await other.register_limits([JobLimits("j", max_concurrency=2)], [])
    finally:
        await other.close()
    await pg.insert_runs([NewRun("j", {}) for _ in range(5)])
    with psycopg.connect(pg_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (lock_key("job", "j"),))  # a claimer of j's limit
        claim = asyncio.ensure_future(
            pg.claim("w", queues=["default"], jobs=["j"], limit=5, lease_timeout=30)
        )
        await asyncio.sleep(0.2)  # not a timing assertion: admitting j's runs needs j's lock
        assert not claim.done()
        holder.execute("SELECT pg_advisory_unlock_all()")
    assert len(await asyncio.wait_for(claim, timeout=30)) == 2
    assert await pg.claim("w", queues=["default"], jobs=["j"], limit=5, lease_timeout=30) == []


@pytest.mark.parametrize("keyed_pending", [False, True])
async def test_a_saturated_limit_is_not_searched_for_runs(
    pg: PostgresStore, pg_url: str, keyed_pending: bool
) -> None:
    """Regression (issue 6): with its unkeyed partition at the limit, the limit-aware claim searched the
    queue's pending runs in claim order for any other partition, walking every one of them under the limit
    lock (17 ms a claim with 50,000 pending, on every claim of a saturated limit). A job with no keyed run
    pending is now left out and the queue is not read; with one pending the search must still run."""
    await pg.register_limits([JobLimits("capped", max_concurrency=1)], [])
    await pg.insert_runs([NewRun("capped", {}) for _ in range(300)])
    assert len(await pg.claim("w", queues=["default"], jobs=["capped"], limit=5, lease_timeout=30)) == 1
    if keyed_pending:
        await pg.insert_runs([NewRun("capped", {}, concurrency_key="k")])
    params = {"queue": "default", "jobs": "{capped}", "full": "{}", "limit": 5, "now": None}
    with psycopg.connect(pg_url, autocommit=True) as conn, conn.transaction():
        conn.execute(FLIGHT_SETTINGS)
        row = conn.execute(
            sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) {}").format(sql.SQL(F["limited_candidates"])), params
        ).fetchone()
    assert row is not None
    scans = [n for n in plan_nodes(row[0][0]["Plan"]) if n.get("Index Name") == "runlane_runs_claim"]
    assert len(scans) == 1
    assert scans[0]["Actual Loops"] == (1 if keyed_pending else 0), scans


async def test_a_claim_for_limited_jobs_only_leaves_the_plain_claim_reading_nothing(
    pg: PostgresStore, pg_url: str
) -> None:
    """Regression (issue 6): the plain claim leaves limited jobs to the limit-aware claim; with none of the
    worker's jobs left it still scanned the queue's pending runs (all of the limited job's backlog) to find
    none: 12 ms a claim with 50,000 pending."""
    await pg.register_limits([JobLimits("capped", max_concurrency=1)], [])
    await pg.insert_runs([NewRun("capped", {}) for _ in range(300)])
    params = pg._claim_params("w", ["default"], ["capped"], 5, 30.0, None)
    with psycopg.connect(pg_url) as conn:
        conn.execute(FLIGHT_SETTINGS)
        row = conn.execute(
            sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) {}").format(sql.SQL(Q["claim"])), params
        ).fetchone()
        conn.rollback()
    assert row is not None
    scans = [n for n in plan_nodes(row[0][0]["Plan"]) if n.get("Index Name") == "runlane_runs_claim"]
    assert scans and all(n["Actual Loops"] == 0 for n in scans), scans


@pytest.mark.parametrize("role", ["heartbeat", ""])
async def test_the_heartbeat_finds_leases_by_key_when_statistics_saw_few_runs(
    pg: PostgresStore, role: str
) -> None:
    """Regression (issue 6): the heartbeat's cached plan, made while runlane_runs was small (a fresh install,
    or a VACUUM ANALYZE then), scanned every run on each renewal until the next ANALYZE. The heartbeat's
    connection plans without sequential scans (and without JIT, which their disabled cost would set off);
    a connection without those settings gets the scan, which shows the setup still provokes it."""
    await pg.insert_runs([NewRun("a", {}) for _ in range(10)])
    params = {"run": "{1,2}", "attempt": "{1,1}", "worker": "w", "lease_timeout": 30.0, "now": None}
    with psycopg.connect(pg._conninfo_for(role), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE runlane_runs")
        with prepared(conn, "heartbeat") as explain:
            explain(params)  # the generic plan, made while there are few runs, and cached
            await pg.insert_runs([NewRun("a", {}) for _ in range(20000)])
            nodes = explain(params)
    assert_keyed_or_scanned(nodes, "runlane_runs", keyed=bool(role))
