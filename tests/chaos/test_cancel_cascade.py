"""T18 cancel_cascade_chaos: cancelling the root of a run tree cancels every non-terminal descendant
(scheduled, pending, running, retrying) within 5 s, while a worker is SIGKILLed during propagation and, on
PostgreSQL, every other tree is cancelled with the LISTEN connections killed so that only polling delivers the
signal. No descendant starts after the cancel committed; running sync attempts see ``ctx.cancelled`` and async
ones are cancelled within a heartbeat interval plus a poll interval."""

from __future__ import annotations

import time
from datetime import timedelta

import psycopg
from harness.checker import wait_all_terminal
from harness.clientlog import Op
from harness.scenario import Scenario, scale

from runlane import Client, Run

SLACK = 1.0
# Long enough to still be running when the cancel comes: a full-scale tree (11,110 runs, triggered one by one)
# takes over a minute to build. The cancel stops them; nothing waits for them to end on their own.
RUNNING_MS = scale(30_000, 600_000)


def _kill_listeners(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND query ILIKE 'LISTEN%'"
        ).fetchone()
    return int(row[0]) if row else 0


def _children(scenario: Scenario, client: Client, parent: Run, fanout: int, tag: str) -> list[Run]:
    runs: list[Run] = []
    kinds = ["sync", "async", "scheduled", "fail", "sync"]
    for i in range(fanout):
        key = f"{tag}-{parent.id}-{i}"
        kind = kinds[i % len(kinds)]
        child = client.with_parent(parent.id)
        if kind == "sync":
            run = child.trigger("ledger_probe", {"key": key, "duration_ms": RUNNING_MS})
        elif kind == "async":
            run = child.trigger("ledger_probe_async", {"key": key, "duration_ms": RUNNING_MS})
        elif kind == "scheduled":
            run = child.trigger(
                "ledger_probe", {"key": key, "duration_ms": 10}, not_before=timedelta(seconds=120)
            )
        else:
            run = child.trigger("fail_probe", {"key": key})
        now = time.time()
        scenario.clientlog.ops.append(Op(key, run.job, now, now, "ok", run.id))
        runs.append(run)
    return runs


def test_cancel_cascade_chaos(scenario: Scenario) -> None:
    timing = scenario.timing
    trees, levels, fanout = scale(3, 3), scale(3, 4), scale(5, 10)
    client = scenario.client
    pool = scenario.pool(4, concurrency=scale(8, 64), restart_delay=0.5)
    worst_cascade = worst_stop = 0.0
    for t in range(trees):
        key = f"root{t}"
        root = client.trigger("ledger_probe", {"key": key, "duration_ms": 2 * RUNNING_MS})
        scenario.clientlog.ops.append(Op(key, root.job, time.time(), time.time(), "ok", root.id))
        tree, frontier = [root], [root]
        for _ in range(levels):
            nxt: list[Run] = []
            for parent in frontier:
                nxt.extend(_children(scenario, client, parent, fanout, f"t{t}"))
            tree.extend(nxt)
            frontier = nxt
        ids = {r.id for r in tree}
        # Mid-flight: some descendants running, some already retrying (earlier trees are all terminal, so
        # the queue counts are this tree's).
        deadline = time.time() + 30
        while time.time() < deadline:
            counts = client.queues()
            statuses = {
                name
                for q in counts
                for name in ("running", "retrying", "scheduled", "pending")
                if getattr(q, name) > 0
            }
            if len(statuses) == 4:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"tree {t} never had every kind of active descendant: {statuses}")
        polling_only = scenario.backend == "postgres" and t % 2 == 1
        if polling_only:
            assert _kill_listeners(scenario.url) >= 1
        open_before = {e.id for e in scenario.ledger.executions() if e.t_end is None and e.run_id in ids}
        assert client.cancel(root.id) is True
        cancelled_at = time.time()
        live = pool.live()
        killed = pool.kill(scenario.random.choice(live), "during cascade") if live else None
        # Every non-terminal descendant is cancelled, with a cascade reason, within 5 s (store time).
        try:
            wait_all_terminal(scenario.url, cancelled_at + 5.0 + SLACK, poll=0.05)
        except TimeoutError as exc:
            raise AssertionError(f"tree {t}: {exc} 5 s after the cancel") from None
        state = scenario.state()
        ends = [state.runs[i].finished_at for i in ids]
        cascade = max(e.timestamp() for e in ends if e is not None) - cancelled_at
        assert cascade <= 5.0, f"tree {t}: the cascade took {cascade:.1f} s"
        worst_cascade = max(worst_cascade, cascade)
        # Every descendant still active when the cancel committed (the root's end, in store time) is cancelled;
        # at full scale building a tree takes longer than its first 30 s runs, which may end before.
        cancel_committed = state.runs[root.id].finished_at
        assert cancel_committed is not None
        for run_id in ids - {root.id}:
            run = state.runs[run_id]
            if run.status.value != "cancelled" and run.finished_at is not None:
                assert run.finished_at <= cancel_committed, (run, cancel_committed)
                continue
            assert run.status.value == "cancelled", run
            assert run.error is not None and "cascade" in run.error.message, run.error
        assert client.cancel(root.id) is False  # already terminal
        # No start after the cancel; open attempts stopped within a heartbeat plus a poll interval.
        executions = [e for e in scenario.ledger.executions() if e.run_id in ids]
        # No claim after the cancel committed. A body claimed just before it may start a moment after (the
        # worker checks the store before a body only when a cancel wake-up crossed its claim, which can
        # still be in flight): it must then stop within the bound below like any running attempt.
        attempts = {(i, a.number): a for i in ids for a in state.attempts[i]}
        late = [
            e for e in executions if attempts[(e.run_id, e.attempt)].started_at.timestamp() > cancelled_at
        ]
        assert not late, f"tree {t}: runs claimed after their cancel: {late[:5]}"
        open_before |= {e.id for e in executions if e.t_start > cancelled_at - 0.001}
        bound = timing.heartbeat_interval + timing.poll_interval + SLACK
        while True:  # until every attempt that was running has stopped, or the bound under test is over
            executions = [e for e in scenario.ledger.executions() if e.run_id in ids]
            still = [e for e in executions if e.id in open_before and e.t_end is None]
            if time.time() > cancelled_at + bound or all(killed and e.pid == killed.pid for e in still):
                break
            time.sleep(0.05)
        for e in executions:
            if e.id not in open_before or (killed is not None and e.pid == killed.pid):
                continue
            assert e.t_end is not None, f"run {e.run_id} never stopped after its cancel"
            worst_stop = max(worst_stop, e.t_end - cancelled_at)
            assert e.t_end - cancelled_at <= bound, (e, e.t_end - cancelled_at, polling_only)

    recovered = scenario.wait_terminal(60.0)
    report = scenario.check(recovered_at=recovered)
    scenario.record(
        report, trees=trees, worst_cascade_s=round(worst_cascade, 2), worst_stop_s=round(worst_stop, 2)
    )
    print(report.summary(), f"worst cascade {worst_cascade:.2f} s, worst stop {worst_stop:.2f} s")
    report.assert_ok(scenario.logs())
