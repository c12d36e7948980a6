"""Runlane and its Python peers, side by side: one command, one machine, one run.

    .venv-bench/bin/python -m bench.run --workloads w1,w2,w3,w4,w5,w6 --repeats 3 --scale 1.0 --ceilings

Cells (one workload on one system, once) run in fresh processes (`bench.one`), alternating systems within each
workload and repeating the whole sequence (A B C A B C …), so machine drift hits every system alike. Each
figure is the median of the repeats, with the min-max spread. Raw records go to `<out>/raw.jsonl`, the table to
`<out>/results.md` and to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.systems import DEFAULT_SYSTEMS, SYSTEMS, module
from bench.systems.base import OUT, ROOT
from bench.workloads import W5_CONCURRENCY, W5_SLEEP, latency_scale

ALL_WORKLOADS = ["w1", "w2", "w3", "w4", "w5", "w6"]
RUNLANE_ONLY = {"w6"}


def expand(workloads: Sequence[str]) -> list[str]:
    cells: list[str] = []
    for w in workloads:
        cells += ["w3a", "w3b"] if w == "w3" else [w]
    return cells


def run_cell(system: str, workload: str, scale: float, log: Path) -> dict[str, Any]:
    timeout = 180 + 1200 * scale
    command = [
        sys.executable,
        "-m",
        "bench.one",
        "--system",
        system,
        "--workload",
        workload,
        "--scale",
        str(scale),
    ]
    with log.open("ab") as err:
        err.write(f"\n=== {system} {workload} scale={scale} {time.ctime()}\n".encode())
        err.flush()
        try:
            proc = subprocess.run(
                command,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=err,
                timeout=timeout,
                env={**os.environ},
            )
        except subprocess.TimeoutExpired:
            return {
                "system": system,
                "workload": workload,
                "error": f"cell timed out after {timeout:.0f} s",
            }
    lines = [line for line in proc.stdout.decode().splitlines() if line.startswith("{")]
    if not lines:
        return {
            "system": system,
            "workload": workload,
            "error": f"no result (exit {proc.returncode}); see {log}",
        }
    record: dict[str, Any] = json.loads(lines[-1])
    return record


# -- the table ---------------------------------------------------------------------------------------------------


def fmt_rate(v: float) -> str:
    return f"{v:,.0f}"


def fmt_ms(v: float) -> str:
    return f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def fmt_s(v: float) -> str:
    return f"{v:.2f}"


def fmt_int(v: float) -> str:
    return f"{v:.0f}"


def cell_text(values: list[float], fmt: Callable[[float], str]) -> str:
    if not values:
        return "\u2013"
    if len(values) == 1:
        return fmt(values[0])
    med = statistics.median(values)
    return f"{fmt(med)} ({fmt(min(values))}\u2013{fmt(max(values))})"


COLUMNS: dict[str, list[tuple[str, str, str, Callable[[float], str]]]] = {
    # workload -> [(column title, cell workload, figure key, formatter)]
    "w1": [
        ("runs/s", "w1", "runs_per_s", fmt_rate),
        ("runs/s, Runlane's blocking Client", "w1", "blocking_runs_per_s", fmt_rate),
    ],
    "w2": [("runs/s", "w2", "runs_per_s", fmt_rate)],
    "w3": [
        ("1 proc, runs/s incl. start-up", "w3a", "with_startup_per_s", fmt_rate),
        ("1 proc, steady runs/s", "w3a", "steady_per_s", fmt_rate),
        ("2 procs, runs/s incl. start-up", "w3b", "with_startup_per_s", fmt_rate),
        ("2 procs, steady runs/s", "w3b", "steady_per_s", fmt_rate),
        ("start-up to 1st completion, s (1 proc)", "w3a", "startup_s", fmt_s),
    ],
    "w4": [
        ("p50 ms", "w4", "p50_ms", fmt_ms),
        ("p95 ms", "w4", "p95_ms", fmt_ms),
        ("p99 ms", "w4", "p99_ms", fmt_ms),
    ],
    "w5": [
        ("wall s (1st start → last end)", "w5", "wall_s", fmt_s),
        ("wall s from enqueue", "w5", "wall_from_enqueue_s", fmt_s),
        ("max in flight", "w5", "max_in_flight", fmt_int),
    ],
    "w6": [
        ("run() p50 ms", "w6", "run_p50_ms", fmt_ms),
        ("run() p99 ms", "w6", "run_p99_ms", fmt_ms),
        ("stream items/s", "w6", "stream_items_per_s", fmt_rate),
    ],
}


def titles(scale: float) -> dict[str, str]:
    def n(x: int, floor: int, latency: bool = False) -> str:
        return f"{max(floor, int(x * (latency_scale(scale) if latency else scale))):,}"

    w5_runs = max(250, int(2_000 * scale))
    ideal = w5_runs / W5_CONCURRENCY * W5_SLEEP
    return {
        "w1": f"w1 · enqueue one call at a time ({n(10_000, 100)} runs, one client)",
        "w2": f"w2 · bulk enqueue ({n(50_000, 500)} runs)",
        "w3": (
            f"w3 · drain {n(20_000, 200)} pre-enqueued no-op runs (concurrency 16 per process; time box "
            f"{os.environ.get('BENCH_DRAIN_TIMEBOX', '60')} s after the first completion)"
        ),
        "w4": f"w4 · trigger→start latency, idle worker, {n(300, 50, True)} runs 20 ms apart",
        "w5": (
            f"w5 · concurrency: {w5_runs:,} runs sleeping {W5_SLEEP * 1000:.0f} ms, 1 process \u00d7 "
            f"{W5_CONCURRENCY} (ideal {ideal:.2f} s)"
        ),
        "w6": f"w6 · Runlane only: run() round trip ({n(200, 20, True)}\u00d7) and stream of {n(10_000, 1000, True)} items",
    }


def markdown(
    records: list[dict[str, Any]],
    workloads: list[str],
    systems: list[str],
    scale: float,
) -> str:
    by_cell: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_cell[(r["system"], r["workload"])].append(r)
    out: list[str] = []
    names = titles(scale)
    problems: list[str] = []
    for w in workloads:
        cols = COLUMNS[w]
        rows = [s for s in systems if w not in RUNLANE_ONLY or s.startswith("runlane")]
        if not rows:
            continue
        out += [f"### {names[w]}", ""]
        out.append("| system | " + " | ".join(c[0] for c in cols) + " |")
        out.append("|---|" + "---|" * len(cols))
        for s in rows:
            cells = []
            for _title, cw, key, fmt in cols:
                recs = by_cell.get((s, cw), [])
                values = [r["figures"][key] for r in recs if r.get("figures", {}).get(key) is not None]
                skipped = next((r["skipped"] for r in recs if "skipped" in r), None)
                errors = [r["error"] for r in recs if "error" in r]
                if skipped and not values:
                    cells.append("n/a")
                elif errors and not values:
                    cells.append(f"failed ({len(errors)}/{len(recs)})")
                else:
                    text = cell_text(values, fmt)
                    cells.append(text + (f" ⚠{len(errors)} failed" if errors else ""))
            out.append(f"| {s} | " + " | ".join(cells) + " |")
            for r in by_cell.get((s, cols[0][1]), []) + (by_cell.get((s, "w3b"), []) if w == "w3" else []):
                if "error" in r:
                    problems.append(f"- {s} {r['workload']}: {r['error']}")
                elif "skipped" in r and f"- {s} {w}: n/a — {r['skipped']}" not in problems:
                    problems.append(f"- {s} {w}: n/a — {r['skipped']}")
                elif (fig := r.get("figures", {})).get("completed", fig.get("runs", 0)) < fig.get("runs", 0):
                    problems.append(
                        f"- {s} {r['workload']} (repeat {r.get('repeat', 0) + 1}): time box reached, measured on "
                        f"{fig['completed']:,} of {fig['runs']:,} runs"
                    )
                elif r.get("figures", {}).get("note"):
                    note = f"- {s} {w}: {r['figures']['note']}"
                    if note not in problems:
                        problems.append(note)
        out.append("")
    if problems:
        out += ["### Notes and failures", "", *dict.fromkeys(problems), ""]
    configs = {}
    for r in records:
        if r.get("config"):
            configs[r["system"]] = r["config"]
    if configs:
        out += [
            "### Configurations",
            "",
            *(f"- **{s}**: {configs[s]}" for s in systems if s in configs),
            "",
        ]
    return "\n".join(out)


def header(args: argparse.Namespace, started: float, load_start: tuple[float, ...]) -> str:
    load_end = os.getloadavg()
    cmd = " ".join(shlex.quote(a) for a in [".venv-bench/bin/python", "-m", "bench.run", *sys.argv[1:]])
    return "\n".join(
        [
            f"Command: `{cmd}`  ",
            f"Date: {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, {time.time() - started:.0f} s; "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}  ",
            f"Load average at start {load_start[0]:.2f}/{load_start[1]:.2f}, "
            f"at end {load_end[0]:.2f}/{load_end[1]:.2f} (1/5 min)  ",
            f"Repeats: {args.repeats}, scale {args.scale}; each cell is `median (min\u2013max)` over the repeats.",
            "",
        ]
    )


def cleanup(systems: list[str]) -> None:
    """Drop the benchmark databases, flush the benchmark Redis db, delete the SQLite files."""
    from bench.systems.base import DATA_DIR, reset_redis

    for s in systems:
        fn = getattr(module(s), "cleanup", None)
        if fn is not None:
            try:
                fn()
            except Exception as exc:
                print(f"cleanup {s}: {exc}", file=sys.stderr)
    try:
        reset_redis()
    except Exception as exc:
        print(f"cleanup redis: {exc}", file=sys.stderr)
    for path in DATA_DIR.glob("*.db*"):
        if path.is_file():
            path.unlink()
        else:
            import shutil

            shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default=",".join(ALL_WORKLOADS), help="comma-separated: w1..w6")
    parser.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help=f"comma-separated: {', '.join(SYSTEMS)}",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiplies every run count (0.1 for a smoke run)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory [bench/out/<timestamp>]",
    )
    parser.add_argument(
        "--ceilings",
        action="store_true",
        help="also measure the store ceilings (bench.ceilings)",
    )
    parser.add_argument(
        "--drain-timebox",
        type=float,
        default=60.0,
        help="w3: stop a drain this many seconds after its first completion and measure what completed [60]",
    )
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="RAW",
        help="only re-render the tables of a raw.jsonl",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the benchmark databases/files at the end",
    )
    args = parser.parse_args()
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for w in workloads:
        if w not in ALL_WORKLOADS:
            parser.error(f"unknown workload {w!r}")
    for s in systems:
        module(s)  # fail fast on a name or an import error
    os.environ["BENCH_DRAIN_TIMEBOX"] = str(args.drain_timebox)
    if args.render is not None:
        recs = [json.loads(line) for line in args.render.read_text().splitlines() if line.strip()]
        print(
            markdown(
                recs,
                workloads,
                [s for s in systems if any(r["system"] == s for r in recs)],
                args.scale,
            )
        )
        return
    out: Path = args.out or OUT / time.strftime("run-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "raw.jsonl"
    log = out / "cells.log"
    started, load_start = time.time(), os.getloadavg()
    cells = [
        (rep, w, s)
        for rep in range(args.repeats)
        for w in expand(workloads)
        for s in systems
        if w not in RUNLANE_ONLY or s.startswith("runlane")
    ]
    records: list[dict[str, Any]] = []
    for i, (rep, w, s) in enumerate(cells, 1):
        record = run_cell(s, w, args.scale, log)
        record["repeat"] = rep
        records.append(record)
        with raw.open("a") as f:
            f.write(json.dumps(record) + "\n")
        status = record.get("error") or record.get("skipped") or json.dumps(record.get("figures"))
        print(
            f"[{i}/{len(cells)} {time.time() - started:5.0f}s] rep {rep + 1} {w:4} {s:15} {status}",
            file=sys.stderr,
        )
    text = header(args, started, load_start) + "\n" + markdown(records, workloads, systems, args.scale)
    if args.ceilings:
        from bench import ceilings

        text += "\n" + ceilings.markdown(ceilings.measure(args.scale))
    if not args.keep:
        cleanup(systems)
    (out / "results.md").write_text(text)
    print(text)
    print(f"\nraw records: {raw}\ntable: {out / 'results.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
