"""Transactions that go out in one round trip (pipeline mode), and how the statements in them are planned."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from psycopg import pq

AConn = psycopg.AsyncConnection[Any]

KEYED_PLANNING = {"enable_seqscan": "off", "jit": "off"}
"""How statements that find every row by key are planned: flights (below, for their transaction) and the
heartbeat's connection (``config.KEYED_ROLES``, for the session). A plan cached while a table was small or
its statistics were stale would otherwise scan the whole table on every execution until the next ANALYZE;
and a table read whole anyway (the limits) is still scanned, at a cost the setting makes 10^10, which would
pass ``jit_above_cost`` and compile the statement on every execution (10-70 ms, measured): no JIT either."""

FLIGHT_SETTINGS = "SELECT set_config('plan_cache_mode', 'force_generic_plan', true), " + ", ".join(
    f"set_config('{name}', '{value}', true)" for name, value in KEYED_PLANNING.items()
)
"""The settings of a flight's transaction.

Generic plans: left to choose, PostgreSQL estimates a custom plan cheaper for a flight of one or two runs and
plans the finish and the continuations' decision again on every execution: ~0.7 ms of server CPU per flight,
more than the flight's whole work. These statements find their rows by primary key, ``ANY(ids)`` or a partial
index whatever the parameters, so the generic plan is the plan a custom one would pick (EXPLAINed on 320,000
runs) -- as long as the statistics are not stale. Then ``KEYED_PLANNING``: a generic plan made from
statistics that saw a table empty (a VACUUM ANALYZE right after ``migrate``) scanned every attempt in each
flight until autovacuum came back, a minute or more later; nothing a flight reads is found by scanning.
"""


@contextlib.asynccontextmanager
async def one_trip(conn: AConn) -> AsyncIterator[psycopg.AsyncPipeline]:
    """A transaction whose BEGIN, statements and COMMIT go out in one pipeline: one round trip.

    psycopg's ``transaction()`` inside a pipeline nests two more pipelines, each synced on exit: three
    round trips for one transaction (a one-run claim: 0.87-1.07 ms against 0.6 ms). Statements are queued
    inside the block and their results read after it. When one fails, the server skips the rest up to the
    sync, COMMIT included, leaving a failed transaction block; an error raised in the block itself leaves
    the queued statements sent without their COMMIT. Either way the transaction is rolled back here, as
    ``transaction()`` would, before the error propagates.

    The flight's settings are ``FLIGHT_SETTINGS``. A caller that must read a result before it can queue the
    rest uses ``sync_and_fetch``: reading one without a sync would leave the transaction open on the server
    without ever counting as idle in it (the server arms ``idle_in_transaction_session_timeout`` only at a
    sync), so a process stopped at that moment would hold its locks until it resumed.
    """
    try:
        async with conn.pipeline() as pipeline:
            await conn.execute("BEGIN")
            await conn.execute(FLIGHT_SETTINGS)
            yield pipeline
            await conn.execute("COMMIT")
    except Exception:  # (a cancelled wait is left to the pool, which checks the connection it gets back)
        if not conn.broken and conn.info.transaction_status != pq.TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):
                await conn.rollback()
        raise


async def sync_and_fetch(
    pipeline: psycopg.AsyncPipeline, *cursors: psycopg.AsyncCursor[Any]
) -> list[list[Any]]:
    """Read results inside ``one_trip`` (one trip for all of them): sync first, so that the server counts
    the wait for the caller's next statement as idle in transaction, and ends the transaction (and its
    locks) if the caller is stopped before it sends one."""
    await pipeline.sync()
    return [await cur.fetchall() for cur in cursors]
