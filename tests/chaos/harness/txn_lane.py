"""Triggering processes for T15: caller transactions that enqueue a run with ``trigger(..., connection=conn)``
next to a write of their own, then commit, roll back, or get SIGKILLed by the test before COMMIT.

``python -m harness.txn_lane`` is one lane, driven by JSON lines on stdin — ``{"n", "action", "hold"}`` — and
answering on stdout: ``triggered`` (with the run id), then ``committed`` (wall times just before and after
COMMIT), ``rolled_back``, or for ``kill`` ``doomed`` with the pid of the process to kill, then ``reaped`` once
the test has killed it and says ``reap``. A doomed transaction runs in a child forked from the lane, whose
client is open already: the child connects, triggers through the async client (the lane's blocking client
lives on a thread the child does not have) and waits for the signal; it never runs cleanup code, which would
touch the lane's connections.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import sys
import time
from typing import Any

import psycopg

from runlane import Runlane

OUTBOX = "chaos_t15_outbox"


def _say(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _trigger(app: Runlane, conn: psycopg.Connection[Any], n: int) -> int:
    conn.execute(f"INSERT INTO {OUTBOX} (txn) VALUES (%s)", (n,))  # the caller's own business write
    run = app.client.trigger("ledger_probe", {"key": f"t{n}", "duration_ms": 1}, connection=conn)
    return run.id


def _doomed(app: Runlane, url: str, n: int, hold: float, report: int) -> None:
    """The forked child: one transaction, then wait for SIGKILL before COMMIT. Never returns."""
    try:
        conn = psycopg.connect(url)
        conn.execute(f"INSERT INTO {OUTBOX} (txn) VALUES (%s)", (n,))
        args = {"key": f"t{n}", "duration_ms": 1}
        # The blocking client's async half: the same call, with the catalogue the lane already fetched.
        run = asyncio.run(app.client.async_client.trigger("ledger_probe", args, connection=conn))
        time.sleep(hold)  # the transaction stays open while workers poll and listen
        os.write(report, f"{run.id}\n".encode())
        while True:
            time.sleep(60)  # the transaction stays open until the test's SIGKILL
    except BaseException as exc:
        os.write(report, f"error {exc!r}\n".encode())
    os._exit(1)


def main() -> None:
    url = os.environ["RUNLANE_URL"]
    app = Runlane(url)
    conn = psycopg.connect(url)  # not autocommit: every statement runs in the caller's transaction
    _trigger(app, conn, -1)  # opens the store and caches the job's catalogue entry, which a doomed child
    conn.rollback()  # then reuses without a connection pool of its own (and leaves nothing behind)
    _say(event="ready_for_work")
    for line in sys.stdin:
        cmd = json.loads(line)
        n, action, hold = cmd["n"], cmd["action"], cmd["hold"]
        if action == "kill":
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                _doomed(app, url, n, hold, w)
            os.close(w)
            if not select.select([r], [], [], 60)[0]:
                os.kill(pid, signal.SIGKILL)
            with os.fdopen(r) as reader:
                answer = reader.readline().strip()
            if not answer.isdigit():
                raise RuntimeError(f"doomed transaction {n} failed: {answer}")
            _say(event="triggered", n=n, run_id=int(answer))
            _say(event="doomed", n=n, pid=pid)
            assert json.loads(sys.stdin.readline()) == {"reap": n}
            _, status = os.waitpid(pid, 0)
            _say(event="reaped", n=n, status=status)
            continue
        _say(event="triggered", n=n, run_id=_trigger(app, conn, n))
        time.sleep(hold)  # the transaction stays open while workers poll and listen
        if action == "commit":
            sent = time.time()
            conn.commit()
            _say(event="committed", n=n, sent=sent, done=time.time())
        else:
            conn.rollback()
            _say(event="rolled_back", n=n)
    conn.close()
    app.close()


if __name__ == "__main__":
    main()
