"""Rewrite the figures table of RELIABILITY.md from a full chaos run's results (``scripts/chaos``).

Each test wrote ``<test>-<backend>.json`` (see ``Scenario.record``); the table sits between two markers in
RELIABILITY.md so the prose around it stays hand-written. The full tier takes longer than one sitting, so a run
of some tests replaces their rows and keeps the others' (each row says when it was measured).
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

BEGIN = "<!-- chaos-figures:begin -->"
END = "<!-- chaos-figures:end -->"
COLUMNS = [
    ("runs", "runs"),
    ("executions", "executions"),
    ("faults", "faults"),
    ("lost", "lost"),
    ("duplicates_justified", "dup. justified"),
    ("duplicates_unjustified", "dup. unjustified"),
    ("limit_overlaps", "limit overlaps"),
    ("recovery_s", "recovery (s)"),
]
STANDARD = {key for key, _ in COLUMNS} | {
    "test",
    "backend",
    "seed",
    "at",
    "unexpected",
    "accounting",
    "legality",
}


def figure(value: object) -> str:
    """A figure for a table cell: a list (per-fault timings, say) becomes its length and largest value."""
    if isinstance(value, list):
        last = [item[-1] if isinstance(item, list) and item else item for item in value]
        numbers = [x for x in last if isinstance(x, int | float)]
        return f"{len(value)} (max {max(numbers):.3g})" if numbers else str(len(value))
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def row(r: dict[str, object]) -> str:
    cells = ["" if r.get(key) is None else str(r.get(key)) for key, _ in COLUMNS]
    other = ", ".join(
        f"{k}={figure(v)}"
        for k, v in r.items()
        if k not in STANDARD and k not in ("max_overlap", "lease_s") and not k.endswith("_case")
    )
    if r.get("lease_s") is not None:
        other = f"lease {r['lease_s']:g} s" + (", " + other if other else "")
    return f"| {r['test']} | {r['backend']} | " + " | ".join(cells) + f" | {other} | {r.get('at') or ''} |"


def table(rows: dict[tuple[str, str], str]) -> str:
    head = (
        "| test | store | "
        + " | ".join(title for _, title in COLUMNS)
        + " | other figures | measured (UTC) |"
    )
    rule = "|" + "---|" * (len(COLUMNS) + 4)
    return "\n".join([head, rule, *(rows[key] for key in sorted(rows))])


def kept_rows(block: str) -> dict[tuple[str, str], str]:
    """The rows already on the page, by (test, store): a partial run leaves the others as they were."""
    rows: dict[tuple[str, str], str] = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or cells[0] in {"test", ""} or set(cells[0]) <= {"-"}:
            continue
        rows[(cells[0], cells[1])] = line.rstrip()
    return rows


def main(results_dir: str, page: str) -> None:
    results = [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("*.json"))]
    if not results:
        print(f"no results in {results_dir}", file=sys.stderr)
        return
    path = Path(page)
    text = path.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    rows = kept_rows(text[start:end])
    for r in results:
        r.setdefault("at", datetime.now(UTC).strftime("%Y-%m-%d %H:%M"))
        rows[(str(r["test"]), str(r["backend"]))] = row(r)
    block = (
        f"{BEGIN}\nFull tier (`make chaos`), last written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on "
        f"{platform.node() or 'this machine'} ({platform.machine()}, Python {platform.python_version()}).\n\n"
        f"{table(rows)}\n{END}"
    )
    path.write_text(text[:start] + block + text[end:])
    print(f"wrote {len(results)} results to {page}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
