"""PostgresStore as a process sees it: connections, the LISTEN thread, transactional enqueue, several loops."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from runlane.errors import InvalidConnection, RunConflict, StoreUnavailable
from runlane.models import RunFilter
from runlane.store import Finish, Lease, NewRun, create_store
from runlane.store.postgres import PostgresStore, trip
from runlane.store.postgres import store as store_module
from runlane.store.postgres.config import PostgresOptions, hide_password

pytestmark = pytest.mark.postgres

WAIT = 20.0  # generous: these waits end on an event, the timeout only catches a hang


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(pg_url)
    await store.open()
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


def _terminate(url: str, pid: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def _wait_gone(url: str, pid: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(int(WAIT / 0.01)):
            if conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() is None:
                return
            time.sleep(0.01)
    raise AssertionError(f"backend {pid} still there after {WAIT} s")


# -- connection errors and options ------------------------------------------------------------------------------


async def test_missing_database_is_store_unavailable_naming_it(pg_url: str) -> None:
    url = pg_url.rpartition("/")[0] + "/runlane_no_such_database"
    store = create_store(url)
    with pytest.raises(StoreUnavailable, match="runlane_no_such_database") as info:
        await store.open()
    assert isinstance(info.value.__cause__, psycopg.OperationalError)
    await store.close()


async def test_wrong_port_is_store_unavailable() -> None:
    store = create_store("postgresql://postgres:secret@127.0.0.1:1/test?connect_timeout=2")
    with pytest.raises(StoreUnavailable) as info:
        await store.open()
    assert isinstance(info.value.__cause__, psycopg.OperationalError)
    assert "secret" not in str(info.value)
    await store.close()


def test_display_url_hides_the_password() -> None:
    assert hide_password("postgresql://bob:s3cret@db:5432/app") == "postgresql://bob:***@db:5432/app"
    assert "s3cret" not in hide_password("postgresql://db/app?password=s3cret&sslmode=require")
    assert PostgresStore("postgresql://bob:pw@h/db").display_url == "postgresql://bob:***@h/db"


def test_options_come_from_the_url_and_explicit_ones_win() -> None:
    conninfo, opts = PostgresOptions.parse(
        "postgres://u@h/db?pool_size=7&statement_timeout=off&application_name=app&sslmode=disable",
        {"pool_min_size": 2},
    )
    assert (opts.pool_max_size, opts.pool_min_size, opts.statement_timeout) == (7, 2, None)
    assert opts.application_name == "app"
    assert conninfo == "postgresql://u@h/db?sslmode=disable"
    _, opts = PostgresOptions.parse("postgresql://u@h/db?pool_size=7", {"pool_size": 3})
    assert opts.pool_max_size == 3
    _, opts = PostgresOptions.parse("postgresql://u@h/db?idle_in_transaction_timeout=off", {})
    assert opts.idle_in_transaction_timeout is None
    assert "idle_in_transaction" not in opts.connect_kwargs()["options"]
    _, opts = PostgresOptions.parse("postgresql://u@h/db?idle_in_transaction_timeout=0.25", {})
    assert "-c idle_in_transaction_session_timeout=250" in opts.connect_kwargs()["options"]
    with pytest.raises(TypeError, match="bogus"):
        PostgresOptions.parse("postgresql://u@h/db", {"bogus": 1})


async def test_connections_carry_the_application_name_and_timeout(pg: PostgresStore, pg_url: str) -> None:
    await pg.get_run(1)
    await pg.listen()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        names = {r[0] for r in conn.execute("SELECT application_name FROM pg_stat_activity").fetchall()}
    assert {"runlane", "runlane-listener"} <= names


# -- the listener --------------------------------------------------------------------------------------------


async def test_another_store_wakes_this_one_without_run_payloads(pg: PostgresStore, pg_url: str) -> None:
    await pg.listen()
    other = PostgresStore(pg_url)
    await other.open()
    with psycopg.connect(pg_url, autocommit=True) as spy:
        spy.execute("LISTEN runlane_work")
        try:
            since = pg.notifier.generation("work")
            waiting = asyncio.create_task(pg.notifier.wait("work", since, WAIT))
            await other.insert_runs([NewRun("a", {"secret": "payload"})])
            assert await waiting
            notes = list(spy.notifies(timeout=WAIT, stop_after=1))
        finally:
            await other.close()
    assert notes and notes[0].payload in {"", other._token}
    assert "payload" not in notes[0].payload


async def test_listener_reconnects_after_its_backend_is_terminated(pg: PostgresStore, pg_url: str) -> None:
    await pg.listen()
    listener = pg.listener
    assert listener is not None and listener.backend_pid is not None
    connections = listener.connections
    generations = {t: pg.notifier.generation(t) for t in ("work", "change", "cancel")}

    _terminate(pg_url, listener.backend_pid)
    assert await asyncio.to_thread(listener.wait_listening, WAIT, after=connections)
    # Wake-ups may have been lost while it was down: every topic was signalled once.
    assert all(pg.notifier.generation(t) > g for t, g in generations.items())  # type: ignore[arg-type]

    since = pg.notifier.generation("work")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("NOTIFY runlane_work")
    assert await pg.notifier.wait("work", since, WAIT)


async def test_a_store_listens_to_what_it_waits_for_and_wakes_that_waiter(pg_url: str) -> None:
    """A process that only triggers never pays for LISTEN (its own NOTIFYs would wake the thread); the
    first wait for a topic listens to its channel and, since a wake-up may have been missed meanwhile, ends
    once that LISTEN is live. Other channels stay unheard until something waits for them."""
    store = PostgresStore(pg_url)
    await store.open()
    try:
        await store.migrate()  # pg_url may be empty: it is migrated only by whichever test came first
        await store.insert_runs([NewRun("a", {})])
        assert store.listener is None
        assert not any(t.name == "runlane-pg-listener" for t in threading.enumerate())
        since = store.notifier.generation("work")
        assert await store.notifier.wait("work", since, WAIT)
        listener = store.listener
        assert listener is not None and listener.backend_pid is not None
        assert listener.topics == {"work"}
        with psycopg.connect(pg_url, autocommit=True) as conn:
            since = store.notifier.generation("work")
            changed = store.notifier.generation("change")
            # One session receives notifications in commit order: had `change` been listened to, its
            # wake-up would have been handled before the `work` one that ends this wait.
            conn.execute("NOTIFY runlane_change")
            conn.execute("NOTIFY runlane_work")
            assert await store.notifier.wait("work", since, WAIT)
            assert store.notifier.generation("change") == changed  # not listened to

            # The first wait for another topic adds its channel to the same session.
            assert await store.notifier.wait("change", changed, WAIT)
            assert listener.topics == {"work", "change"} and listener.connections == 1
            since = store.notifier.generation("change")
            conn.execute("NOTIFY runlane_change")
            assert await store.notifier.wait("change", since, WAIT)
    finally:
        await store.close()
    assert not any(t.name == "runlane-pg-listener" for t in threading.enumerate())


async def test_close_stops_the_listener_thread(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    await store.open()
    await store.listen()
    assert any(t.name == "runlane-pg-listener" for t in threading.enumerate())
    await store.close()
    await store.close()  # idempotent
    assert not any(t.name == "runlane-pg-listener" for t in threading.enumerate())


# -- transactional enqueue ------------------------------------------------------------------------------------


async def test_transactional_insert_exists_iff_the_caller_commits_sync(
    pg: PostgresStore, pg_url: str
) -> None:
    with psycopg.connect(pg_url) as conn:
        (run,) = await pg.insert_runs_in_transaction(conn, [NewRun("a", {})])
        assert await pg.get_run(run.id) is None  # not visible before commit
        conn.rollback()
    assert await pg.get_run(run.id) is None

    await pg.listen()
    since = pg.notifier.generation("work")
    with psycopg.connect(pg_url) as conn:
        with conn.transaction():
            (run,) = pg.insert_runs_in_transaction_blocking(conn, [NewRun("a", {})])
        # The NOTIFY queued in the transaction fired at commit and reached this store's listener.
        assert await pg.notifier.wait("work", since, WAIT)
    stored = await pg.get_run(run.id)
    assert stored is not None and stored.status == "pending"


async def test_transactional_insert_exists_iff_the_caller_commits_async(
    pg: PostgresStore, pg_url: str
) -> None:
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        async with conn.transaction():
            (kept,) = await pg.insert_runs_in_transaction(conn, [NewRun("a", {})])
        await conn.execute("SELECT 1")
        (dropped,) = await pg.insert_runs_in_transaction(conn, [NewRun("a", {})])
        await conn.rollback()
    assert await pg.get_run(kept.id) is not None
    assert await pg.get_run(dropped.id) is None


async def test_transactional_conflict_leaves_the_caller_transaction_usable(
    pg: PostgresStore, pg_url: str
) -> None:
    (holder,) = await pg.insert_runs([NewRun("a", {}, dedup_id="d")])
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TEMP TABLE app_rows (x int)")
        with pytest.raises(RunConflict) as info:
            pg.insert_runs_in_transaction_blocking(conn, [NewRun("a", {}), NewRun("a", {}, dedup_id="d")])
        assert info.value.existing_run_id == holder.id
        conn.execute("INSERT INTO app_rows VALUES (1)")  # still usable: only the trigger was undone
        (same,) = pg.insert_runs_in_transaction_blocking(
            conn, [NewRun("a", {}, dedup_id="d")], on_conflict="return_existing"
        )
        conn.commit()
    assert same.id == holder.id
    assert len(await pg.list_runs(RunFilter())) == 1


async def test_transactional_insert_refuses_connections_outside_a_transaction(
    pg: PostgresStore, pg_url: str
) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        with pytest.raises(InvalidConnection, match="autocommit"):
            pg.insert_runs_in_transaction_blocking(conn, [NewRun("a", {})])
        with conn.transaction():
            (run,) = pg.insert_runs_in_transaction_blocking(conn, [NewRun("a", {})])
    assert await pg.get_run(run.id) is not None
    conn = psycopg.connect(pg_url)
    conn.close()
    with pytest.raises(StoreUnavailable):
        pg.insert_runs_in_transaction_blocking(conn, [NewRun("a", {})])
    with psycopg.connect(pg_url) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        with pytest.raises(InvalidConnection, match="failed"):
            pg.insert_runs_in_transaction_blocking(conn, [NewRun("a", {})])


# -- threads and loops ----------------------------------------------------------------------------------------


async def test_one_store_serves_two_event_loops_in_two_threads(pg: PostgresStore) -> None:
    errors: list[BaseException] = []
    ids: list[int] = []
    start = threading.Barrier(2)

    def thread_main(n: int) -> None:
        async def work() -> None:
            start.wait(WAIT)
            for i in range(20):
                (run,) = await pg.insert_runs([NewRun("a", {"thread": n, "i": i})])
                fetched = await pg.get_run(run.id)
                assert fetched is not None and fetched.args == {"thread": n, "i": i}
                ids.append(run.id)

        try:
            asyncio.run(work())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=thread_main, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        await asyncio.to_thread(t.join, WAIT)
    assert not errors, errors
    assert len(set(ids)) == 40
    assert len(await pg.get_runs(ids)) == 40


async def test_close_closes_the_pool_of_a_loop_still_running_in_another_thread(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    await store.open()
    await store.migrate()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(store.get_run(1), loop).result(WAIT)
        assert len(store._pools) == 2
        held = [lp.held for lp in store._pools.values()]
        assert all(conn is not None for conn in held)
        await store.close()
        assert store._pools == {}
        assert all(conn is not None and conn.closed for conn in held)  # back in its pool, then closed
    finally:
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, WAIT)
        loop.close()


async def test_heartbeat_reconnects_after_its_connection_is_killed(pg: PostgresStore, pg_url: str) -> None:
    await pg.register_worker("w1", {})
    (run,) = await pg.insert_runs([NewRun("a", {})])
    (claimed,) = await pg.claim("w1", queues=["default"], jobs=["a"], limit=1, lease_timeout=30)
    leases = [Lease(claimed.id, claimed.attempt)]
    assert await asyncio.to_thread(pg.heartbeat_blocking, "w1", leases, 30) == {run.id}
    assert pg._hb_conn is not None
    _terminate(pg_url, pg._hb_conn.info.backend_pid)
    assert await asyncio.to_thread(pg.heartbeat_blocking, "w1", leases, 30) == {run.id}


# -- the held connection ---------------------------------------------------------------------------------------


async def _backend_pid(
    store: PostgresStore, pause: float = 0.0, together: asyncio.Barrier | None = None
) -> int:
    async def body(conn: psycopg.AsyncConnection[object]) -> int:
        if together is not None:  # every call holds its connection until all of them hold one
            await asyncio.wait_for(together.wait(), WAIT)
        if pause:
            await asyncio.sleep(pause)
        return conn.info.backend_pid

    return await store._run(body)


async def test_sequential_calls_share_one_backend_and_concurrent_ones_spread(pg: PostgresStore) -> None:
    """psycopg's pool hands out its connections in turn: without the held one, a client calling in sequence
    would alternate between backends once the pool had grown."""
    together = asyncio.Barrier(4)
    concurrent = await asyncio.gather(*(_backend_pid(pg, together=together) for _ in range(4)))
    assert len(set(concurrent)) == 4  # the held one serves one call, the pool the others
    sequential = [await _backend_pid(pg) for _ in range(10)]
    assert len(set(sequential)) == 1
    await pg.insert_runs([NewRun("a", {})])
    await pg.get_runs([1])
    assert await _backend_pid(pg) == sequential[0]


async def test_a_held_connection_left_in_a_transaction_goes_back_to_the_pool(pg: PostgresStore) -> None:
    await _backend_pid(pg)

    async def leave_open(conn: psycopg.AsyncConnection[object]) -> None:
        await conn.execute("BEGIN")
        await conn.execute("SELECT 1")

    await pg._run(leave_open)
    (lp,) = pg._pools.values()
    assert lp.held is None  # returned: the pool rolls it back

    async def status(conn: psycopg.AsyncConnection[object]) -> str:
        return conn.info.transaction_status.name

    assert await pg._run(status) == "IDLE"
    assert lp.held is not None  # held again


async def test_a_one_trip_transaction_commits_all_or_nothing_and_leaves_the_connection_usable(
    pg: PostgresStore,
) -> None:
    """Flights queue BEGIN, their statements and COMMIT in one pipeline. A failing statement makes the server
    skip the rest, COMMIT included; an error raised while queueing leaves the queued statements sent without
    their COMMIT. Either way nothing may stay, and the connection (and its prepared statements, psycopg
    prepares a statement from its fifth run) must be fit for the next flight."""
    insert = (
        "INSERT INTO runlane_workers (id, info, started_at, last_seen_at) VALUES (%s, '{}', now(), now())"
    )

    async def flight(conn: psycopg.AsyncConnection[Any], ids: list[str], fail: str = "") -> str:
        async with trip.one_trip(conn):
            cursors = [await conn.execute(insert, (worker,)) for worker in ids]
            if fail == "statement":
                await conn.execute("SELECT 1 / (SELECT count(*) - count(*) FROM runlane_workers)")
            if fail == "python":
                raise LookupError("raised while queueing")
        assert all(cur.rowcount == 1 for cur in cursors)
        return conn.info.transaction_status.name

    async def workers(conn: psycopg.AsyncConnection[Any]) -> set[str]:
        return {row[0] for row in await (await conn.execute("SELECT id FROM runlane_workers")).fetchall()}

    for n in range(6):  # past the prepare threshold
        assert await pg._run(lambda conn, n=n: flight(conn, [f"ok-{n}a", f"ok-{n}b"])) == "IDLE"
    (lp,) = pg._pools.values()
    for fail, error in (("statement", psycopg.errors.DivisionByZero), ("python", LookupError)):
        with pytest.raises(error):
            await pg._run(lambda conn, fail=fail: flight(conn, [f"lost-{fail}-a", f"lost-{fail}-b"], fail))
        assert lp.held is not None  # rolled back in place, not handed back to the pool mid-transaction
        assert await pg._run(lambda conn, fail=fail: flight(conn, [f"after-{fail}"])) == "IDLE"
    found = await pg._run(workers)
    assert not {w for w in found if w.startswith("lost-")}
    assert {"after-statement", "after-python", "ok-0a", "ok-5b"} <= found


async def test_small_flights_use_generic_plans_over_a_large_backlog(pg: PostgresStore) -> None:
    """With thousands of runs waiting elsewhere, PostgreSQL judged a custom plan cheaper for a flight of one
    run and planned the finish and the continuations' decision again every time (~0.7 ms of server CPU per
    flight): flights force the generic plans."""
    await pg.insert_runs([NewRun("backlog", {}, queue="elsewhere") for _ in range(20_000)])
    for _ in range(8):  # psycopg prepares a statement at its fifth run
        await pg.insert_runs([NewRun("a", {})])
        (run,) = await pg.claim("w", queues=["default"], jobs=["a"], limit=1, lease_timeout=30)
        done, _ = await pg.finish_and_claim(
            [Finish(run.id, run.attempt, "succeeded")],
            worker_id="w",
            queues=["default"],
            jobs=["a"],
            limit=1,
            lease_timeout=30,
        )
        assert done == [True]

    async def plans(conn: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
        query = "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements"
        return await (await conn.execute(query)).fetchall()

    rows = await pg._run(plans)
    flight = [r for r in rows if "finishes and their events" in r[0] or "Decide the continuations" in r[0]]
    assert len(flight) == 2
    assert all(generic >= 3 and custom == 0 for _, generic, custom in flight), flight


async def test_a_held_connection_killed_while_idle_is_replaced(pg: PostgresStore, pg_url: str) -> None:
    first = await _backend_pid(pg)
    _terminate(pg_url, first)
    await asyncio.to_thread(_wait_gone, pg_url, first)  # not used before it has gone
    # Reads are retried on a fresh connection; an insert is not (its commit may have happened), so the
    # first call after the kill is a read.
    assert await pg.get_run(123456) is None
    assert await _backend_pid(pg) != first
    (run,) = await pg.insert_runs([NewRun("a", {})])
    assert await pg.get_run(run.id) == run


async def test_a_pool_of_one_connection_is_never_held(pg_url: str) -> None:
    store = PostgresStore(pg_url, pool_max_size=1, pool_timeout=WAIT)
    await store.open()
    try:
        pids = await asyncio.gather(*(_backend_pid(store, pause=0.02) for _ in range(3)))
        assert len(set(pids)) == 1
        assert all(lp.held is None for lp in store._pools.values())
    finally:
        await store.close()


async def test_overlapped_chunks_resume_after_a_deadlock_without_inserting_twice(
    pg: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deadlock is retried on a fresh transaction; the chunks already committed are not sent again."""
    real = store_module._fetch_all
    calls = 0

    async def third_fails_once(conn: psycopg.AsyncConnection[Any], step: Any) -> list[tuple[Any, ...]]:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise psycopg.errors.DeadlockDetected("deadlock detected")
        return await real(conn, step)

    monkeypatch.setattr(store_module, "_fetch_all", third_fails_once)
    chunks = [[NewRun("a", {"i": 3 * c + i}) for i in range(3)] for c in range(4)]
    runs = await pg.insert_chunks(chunks)
    assert calls == 5  # four chunks and the retried third
    assert [r.args["i"] for r in runs] == list(range(12))
    stored = await pg.list_runs(RunFilter(job="a"), limit=100)
    assert sorted(r.id for r in stored) == sorted(r.id for r in runs)


# -- how runs travel ------------------------------------------------------------------------------------------


async def test_single_and_bulk_inserts_store_the_same_times_and_values(pg: PostgresStore) -> None:
    """One run goes as scalar parameters, many as one JSON document: both must store the same microsecond (a
    schedule's fire is unique by its not_before) and the same arguments, tags and optional fields."""
    fire = 1_900_000_000.123457  # a time whose microseconds a text round trip could round differently
    args = {
        "text": 'quote " backslash \\ unicode é ✓',
        "n": 2**53 + 1,
        "x": 0.1,
        "none": None,
        "list": [1, {}],
    }
    template = NewRun(
        "job",
        args,
        not_before=fire,
        not_after=fire + 60,
        tags=("a", 'b"c', "d\\e", "{x,y}"),
        concurrency_key="k1",
    )
    (one,) = await pg.insert_runs([template])
    many = await pg.insert_runs([template, NewRun("job", {}, priority=-3, max_attempts=1)])
    stored = {run.id: run for run in await pg.get_runs([one.id, many[0].id, many[1].id])}
    a, b, plain = stored[one.id], stored[many[0].id], stored[many[1].id]
    for run in (a, b):
        assert run.not_before is not None and run.not_before.timestamp() == pytest.approx(fire, abs=1e-6)
        assert run.args == args and run.tags == template.tags and run.status.value == "scheduled"
    assert (a.not_before, a.not_after) == (b.not_before, b.not_after)
    assert a.not_before == one.not_before == many[0].not_before  # what trigger returned is what is stored
    assert (plain.args, plain.tags, plain.priority, plain.max_attempts) == ({}, (), -3, 1)
    assert (plain.not_before, plain.not_after, plain.dedup_id) == (None, None, None)


# -- blocking inserts (the blocking client's trigger) -------------------------------------------------------------


def _blocking_backend(store: PostgresStore) -> int:
    assert store._blocking_pool is not None
    with store._blocking_pool.connection() as conn:
        return int(conn.info.backend_pid)


async def test_blocking_inserts_use_a_thread_side_pool_and_wake_this_process(pg: PostgresStore) -> None:
    before = pg.notifier.generation("work")
    plain, window = await asyncio.to_thread(
        lambda: [
            pg.insert_runs_blocking([NewRun("a", {"n": 1}, tags=("t",))]),
            pg.insert_runs_blocking([NewRun("b", {}, not_before=pg.now() + 3600, dedup_id="d")]),
        ]
    )
    assert plain is not None and window is not None
    assert pg.notifier.generation("work") == before + 2  # this process's waiters, without the LISTEN thread
    assert [r.status for r in plain + window] == ["pending", "scheduled"]
    assert await pg.get_runs([plain[0].id]) == plain
    assert (await pg.get_run(window[0].id)) == window[0]
    with pytest.raises(RunConflict):
        await asyncio.to_thread(pg.insert_runs_blocking, [NewRun("b", {}, dedup_id="d")])
    same = await asyncio.to_thread(
        pg.insert_runs_blocking, [NewRun("b", {}, dedup_id="d")], on_conflict="return_existing"
    )
    assert same == window
    assert len(await pg.list_runs(RunFilter())) == 2
    assert await asyncio.to_thread(pg.insert_runs_blocking, []) == []


async def test_a_blocking_insert_on_a_killed_connection_is_not_repeated(
    pg: PostgresStore, pg_url: str
) -> None:
    """Its commit may have happened: like the loop's inserts, it fails instead of inserting twice; the next
    call gets a fresh connection."""
    await asyncio.to_thread(pg.insert_runs_blocking, [NewRun("a", {})])
    pid = await asyncio.to_thread(_blocking_backend, pg)
    _terminate(pg_url, pid)
    await asyncio.to_thread(_wait_gone, pg_url, pid)
    with pytest.raises(StoreUnavailable):
        await asyncio.to_thread(pg.insert_runs_blocking, [NewRun("a", {})])
    (run,) = await asyncio.to_thread(pg.insert_runs_blocking, [NewRun("a", {})]) or []
    assert await asyncio.to_thread(_blocking_backend, pg) != pid
    assert [r.id for r in await pg.list_runs(RunFilter())] == [run.id, run.id - 1]


async def test_blocking_inserts_leave_to_the_loop_what_needs_it(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not opened: the loop path opens. The database clock due for a reading: the loop path reads it.
    Closed: the thread-side pool is closed with the store."""
    store = PostgresStore(pg_url)
    assert store.insert_runs_blocking([NewRun("a", {})]) is None
    await store.open()
    await store.migrate()
    try:
        monkeypatch.setattr(store, "_clock_stale", lambda: True)
        assert await asyncio.to_thread(store.insert_runs_blocking, [NewRun("a", {})]) is None
        monkeypatch.undo()
        assert await asyncio.to_thread(store.insert_runs_blocking, [NewRun("a", {})])
        assert store._blocking_pool is not None
        pool = store._blocking_pool.pool
        assert not pool.closed
    finally:
        await store.close()
    assert pool.closed and store._blocking_pool is None
    assert store.insert_runs_blocking([NewRun("a", {})]) is None


async def test_opening_the_blocking_pool_neither_stalls_the_loops_nor_leaks_its_error(
    pg: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first blocking insert waits for the pool's first connection: meanwhile the loops' calls go on, and
    a timeout is the store's StoreUnavailable (not psycopg_pool's error), with nothing left open."""
    entered, gate = threading.Event(), threading.Event()
    opened: list[Any] = []

    def slow_open(pool: Any, wait: bool = False, timeout: float = 30.0) -> None:
        opened.append(pool)
        entered.set()
        gate.wait(WAIT)
        raise store_module.PoolTimeout("no connection yet")

    monkeypatch.setattr(store_module.ConnectionPool, "open", slow_open)
    failed: list[BaseException] = []

    def blocking_insert() -> None:
        try:
            pg.insert_runs_blocking([NewRun("a", {})])
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=blocking_insert)
    thread.start()
    try:
        assert await asyncio.to_thread(entered.wait, WAIT)
        assert await asyncio.wait_for(pg.get_run(1), WAIT) is None  # not stalled behind the open
    finally:
        gate.set()
        await asyncio.to_thread(thread.join, WAIT)
    assert len(failed) == 1 and isinstance(failed[0], StoreUnavailable), failed
    assert pg._blocking_pool is None and opened[0].closed
