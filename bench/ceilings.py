"""What the stores themselves can do on this machine, with no queue library on top.

    .venv-bench/bin/python -m bench.ceilings [--scale 1.0]

PostgreSQL (pgbench, custom scripts, prepared statements): insert one row per transaction; claim one row per
transaction (`UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED LIMIT 1)`); claim 100 rows per transaction —
each with 1 and 4 clients. SQLite (the `sqlite3` module, WAL): one transaction per insert, and one per
insert + claim-update, with `synchronous=FULL` (Runlane's setting) and `NORMAL`.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.systems.base import DATA_DIR, PG_BASE, drop_pg_database, reset_pg_database, reset_sqlite

DB = "bench_ceiling"
SCHEMA = """
CREATE TABLE q (
    id bigserial PRIMARY KEY,
    status smallint NOT NULL DEFAULT 0,
    payload jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    locked_by text
);
CREATE INDEX q_pending ON q (id) WHERE status = 0;
"""
SCRIPTS = {
    "insert 1 row": "INSERT INTO q (payload) VALUES ('{}');",
    "claim 1 row (SKIP LOCKED)": (
        "UPDATE q SET status = 1, locked_by = 'w' WHERE id = "
        "(SELECT id FROM q WHERE status = 0 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED);"
    ),
    "claim 100 rows per tx (SKIP LOCKED)": (
        "UPDATE q SET status = 1, locked_by = 'w' WHERE id IN "
        "(SELECT id FROM q WHERE status = 0 ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED);"
    ),
}
ROWS_PER_TX = {"insert 1 row": 1, "claim 1 row (SKIP LOCKED)": 1, "claim 100 rows per tx (SKIP LOCKED)": 100}


def psql(url: str, sql: str) -> None:
    subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", url, "-c", sql], check=True, capture_output=True)


def pgbench(url: str, script: str, clients: int, transactions: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script + "\n")
        path = f.name
    try:
        proc = subprocess.run(
            [
                "pgbench",
                "-n",
                "-M",
                "prepared",
                "-f",
                path,
                "-c",
                str(clients),
                "-j",
                str(min(clients, 2)),
                "-t",
                str(transactions),
                url,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    finally:
        Path(path).unlink(missing_ok=True)
    match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", proc.stdout)
    if not match:
        raise RuntimeError(f"cannot read pgbench output:\n{proc.stdout}\n{proc.stderr}")
    return float(match.group(1))


def measure_pg(scale: float) -> list[dict[str, Any]]:
    results = []
    url = f"{PG_BASE}/{DB}"
    for name, script in SCRIPTS.items():
        for clients in (1, 4):
            per_client = max(100, int((20_000 if ROWS_PER_TX[name] == 1 else 500) * scale))
            reset_pg_database(DB)
            psql(url, SCHEMA)
            if name.startswith("claim"):
                rows = per_client * clients * ROWS_PER_TX[name] + 1000
                psql(url, f"INSERT INTO q (payload) SELECT '{{}}' FROM generate_series(1, {rows})")
                psql(url, "VACUUM ANALYZE q")
            tps = pgbench(url, script, clients, per_client)
            results.append(
                {
                    "store": "PostgreSQL",
                    "what": name,
                    "clients": clients,
                    "tx_per_s": tps,
                    "rows_per_s": tps * ROWS_PER_TX[name],
                }
            )
    drop_pg_database(DB)
    return results


def measure_sqlite(scale: float) -> list[dict[str, Any]]:
    results = []
    n = max(500, int(5_000 * scale))
    path = DATA_DIR / "ceiling.db"
    for sync in ("FULL", "NORMAL"):
        for what in ("insert 1 row", "insert 1 row + claim 1 row"):
            reset_sqlite(path)
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {sync}")
            conn.execute(
                "CREATE TABLE q (id INTEGER PRIMARY KEY, status INTEGER NOT NULL DEFAULT 0, "
                "payload TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL, locked_by TEXT)"
            )
            conn.execute("CREATE INDEX q_pending ON q (id) WHERE status = 0")
            claim = what.endswith("claim 1 row")
            t0 = time.perf_counter()
            for _ in range(n):
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT INTO q (payload, created_at) VALUES ('{}', ?)", (time.time(),))
                if claim:
                    conn.execute(
                        "UPDATE q SET status = 1, locked_by = 'w' WHERE id = "
                        "(SELECT id FROM q WHERE status = 0 ORDER BY id LIMIT 1)"
                    )
                conn.execute("COMMIT")
            elapsed = time.perf_counter() - t0
            conn.close()
            results.append(
                {
                    "store": f"SQLite WAL, synchronous={sync}",
                    "what": what,
                    "clients": 1,
                    "tx_per_s": n / elapsed,
                    "rows_per_s": n / elapsed,
                }
            )
    reset_sqlite(path)
    return results


def measure(scale: float) -> list[dict[str, Any]]:
    return measure_pg(scale) + measure_sqlite(scale)


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "### Store ceilings (no queue library: pgbench custom scripts, plain sqlite3)",
        "",
        "| store | transaction | clients | tx/s | rows/s |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['store']} | {r['what']} | {r['clients']} | {r['tx_per_s']:,.0f} | {r['rows_per_s']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    print(markdown(measure(args.scale)))


if __name__ == "__main__":
    main()
