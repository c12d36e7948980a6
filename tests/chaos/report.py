"""Rewrite the figures table of RELIABILITY.md from a full chaos run's results (``scripts/chaos``).

Each test wrote ``<test>-<backend>.json`` (see ``Scenario.record``); the table sits between two markers in
RELIABILITY.md so the prose around it stays hand-written.
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
STANDARD = {key for key, _ in COLUMNS} | {"test", "backend", "seed", "unexpected", "accounting", "legality"}


def table(results: list[dict[str, object]]) -> str:
    head = "| test | store | " + " | ".join(title for _, title in COLUMNS) + " | other figures |"
    rule = "|" + "---|" * (len(COLUMNS) + 3)
    lines = [head, rule]
    for r in sorted(results, key=lambda r: (str(r["test"]), str(r["backend"]))):
        cells = ["" if r.get(key) is None else str(r.get(key)) for key, _ in COLUMNS]
        other = ", ".join(f"{k}={v}" for k, v in r.items() if k not in STANDARD and k != "max_overlap")
        lines.append(f"| {r['test']} | {r['backend']} | " + " | ".join(cells) + f" | {other} |")
    return "\n".join(lines)


def main(results_dir: str, page: str) -> None:
    results = [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("*.json"))]
    if not results:
        print(f"no results in {results_dir}", file=sys.stderr)
        return
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"{BEGIN}\nFull tier, {stamp}, {platform.node() or 'this machine'} "
        f"({platform.machine()}, Python {platform.python_version()}); `make chaos`.\n\n{table(results)}\n{END}"
    )
    path = Path(page)
    text = path.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    path.write_text(text[:start] + block + text[end:])
    print(f"wrote {len(results)} results to {page}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
