"""Run one cell — one workload on one system, once — in a fresh process; print its figures as one JSON line.

    .venv-bench/bin/python -m bench.one --system runlane_sqlite --workload w1 --scale 0.1

`bench.run` calls this for every (repeat, workload, system), so a crashing or hanging peer cannot take the
others down, and no library state leaks between cells.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

from bench.systems import module
from bench.workloads import WORKLOADS


def load(system: str) -> object:
    return module(system).System()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--system", required=True)
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    record: dict[str, object] = {"system": args.system, "workload": args.workload, "scale": args.scale}
    started = time.time()
    system = None
    try:
        system = load(args.system)
        record["config"] = system.describe()  # type: ignore[attr-defined]
        unsupported = getattr(system, "unsupported", {})
        if args.workload in unsupported or args.workload.rstrip("ab") in unsupported:
            record["skipped"] = unsupported.get(args.workload) or unsupported[args.workload.rstrip("ab")]
        else:
            record["figures"] = WORKLOADS[args.workload](system, args.scale)
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stderr)
    finally:
        if system is not None:
            try:
                system.teardown()  # type: ignore[attr-defined]
            except Exception:
                traceback.print_exc(file=sys.stderr)
    record["cell_s"] = round(time.time() - started, 2)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
