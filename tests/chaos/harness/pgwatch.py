"""What the chaos tests see of PostgreSQL sessions: the workers' LISTEN connections, found in pg_stat_activity
by application name, and how to cut them (T15, T20)."""

from __future__ import annotations

import time
from collections.abc import Collection
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

WORKER_APP = "chaos-worker"
LISTENER_APP = f"{WORKER_APP}-listener"  # the store names its LISTEN session "<application_name>-listener"


def worker_url(url: str) -> str:
    """The store URL for worker processes: their sessions carry ``application_name=chaos-worker``."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "application_name"]
    query.append(("application_name", WORKER_APP))
    return urlunsplit(parts._replace(query=urlencode(query)))


def listeners(url: str) -> dict[int, str]:
    """Backend pid → query of every live LISTEN session of the workers on this database."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, query FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            (LISTENER_APP,),
        ).fetchall()
    return {int(pid): str(query) for pid, query in rows}


def wait_listeners(url: str, count: int, timeout: float, *, not_in: Collection[int] = ()) -> dict[int, str]:
    """Wait until ``count`` worker LISTEN sessions (none of the pids ``not_in``) are up and listening."""
    deadline = time.monotonic() + timeout
    while True:
        live = {
            pid: q
            for pid, q in listeners(url).items()
            if pid not in not_in and q.upper().startswith("LISTEN")
        }
        if len(live) >= count:
            return live
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(live)} of {count} worker LISTEN sessions after {timeout} s")
        time.sleep(0.02)


def terminate_listeners(url: str) -> list[int]:
    """``pg_terminate_backend`` on every worker LISTEN session; the pids terminated."""
    with psycopg.connect(url, autocommit=True) as conn:
        # The call sits in the select list of a materialised set: in a WHERE clause the planner may run it
        # before the filters, on every session of the server.
        rows = conn.execute(
            "WITH s AS MATERIALIZED (SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = %s) SELECT pid, pg_terminate_backend(pid) FROM s",
            (LISTENER_APP,),
        ).fetchall()
    return [int(r[0]) for r in rows if r[1]]
