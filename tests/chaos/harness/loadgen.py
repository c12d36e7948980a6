"""Trigger clients in processes of their own, so the nemesis can kill them like workers (T09, T22).

``python -m harness.loadgen --log PATH --prefix P [--rate R] [--duration S] [--count N]`` triggers
``ledger_probe`` runs keyed ``P-0``, ``P-1``, … through a client-only app on ``RUNLANE_URL`` and appends the
Jepsen-style client log to PATH as JSON lines: ``{"k", "i"}`` when a trigger is invoked, then
``{"k", "o", "r", "c", "e"}`` with its outcome. Lines are written unbuffered, so a SIGKILL loses at most the
outcome of the trigger in flight (which the checker then treats as indeterminate).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.clientlog import Op
from harness.faults import FaultLog

JOB = "ledger_probe"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="harness.loadgen")
    parser.add_argument("--log", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="triggers per second; 0: as fast as possible")
    parser.add_argument("--duration", type=float, default=3600.0)
    parser.add_argument("--count", type=int, default=10**9)
    parser.add_argument("--max-ms", type=int, default=20, help="ledger_probe durations are 0..max-ms")
    opts = parser.parse_args(argv)

    from harness import sqlite_audit

    sqlite_audit.install_from_env()
    from runlane import Runlane
    from runlane.errors import InvalidArguments, JobNotFound, RunConflict

    rng = random.Random(opts.prefix)
    app = Runlane()
    client = app.client
    out = open(opts.log, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    start = time.monotonic()
    try:
        for i in range(opts.count):
            if opts.rate > 0:
                delay = start + i / opts.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            if time.monotonic() - start >= opts.duration:
                break
            key = f"{opts.prefix}-{i}"
            out.write(json.dumps({"k": key, "i": time.time()}) + "\n")
            record: dict[str, Any] = {"k": key}
            try:
                run = client.trigger(JOB, {"key": key, "duration_ms": rng.randint(0, opts.max_ms)})
            except RunConflict as exc:
                record.update(o="failed", r=exc.existing_run_id, e=f"RunConflict: {exc}")
            except (InvalidArguments, JobNotFound) as exc:
                record.update(o="failed", e=f"{type(exc).__name__}: {exc}")
            except Exception as exc:
                record.update(o="indeterminate", e=f"{type(exc).__name__}: {exc}")
            else:
                record.update(o="ok", r=run.id)
            record["c"] = time.time()
            out.write(json.dumps(record) + "\n")
    finally:
        out.close()
        app.close()


def read_ops(paths: Sequence[Path]) -> list[Op]:
    """The client log of every process: an op per invoked trigger, ``invoked`` if its outcome never came."""
    ops: dict[str, Op] = {}
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # the line a kill cut short
                continue
            if "i" in rec:
                ops[rec["k"]] = Op(rec["k"], JOB, rec["i"])
            elif rec["k"] in ops:
                op = ops[rec["k"]]
                op.outcome, op.run_id, op.error, op.t_complete = (
                    rec["o"],
                    rec.get("r"),
                    rec.get("e"),
                    rec["c"],
                )
    return list(ops.values())


@dataclass
class Clients:
    """Trigger client processes started and killed by a test; kills are logged as ``client_kill`` faults."""

    env: dict[str, str]
    workdir: Path
    faults: FaultLog
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def start(self, prefix: str, **options: Any) -> subprocess.Popen[bytes]:
        log = self.workdir / f"clients-{prefix}.jsonl"
        argv = [sys.executable, "-m", "harness.loadgen", "--log", str(log), "--prefix", prefix]
        for name, value in options.items():
            argv += [f"--{name.replace('_', '-')}", str(value)]
        with open(self.workdir / f"clients-{prefix}.out", "ab") as output:
            proc = subprocess.Popen(
                argv, env=self.env, cwd=self.workdir, stdout=output, stderr=subprocess.STDOUT
            )
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def signal_all(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to every live client at once (no waiting between them)."""
        for proc in self.procs:
            if proc.poll() is None:
                if sig == signal.SIGKILL:
                    self.faults.instant("client_kill", proc.pid)
                os.kill(proc.pid, sig)

    def wait(self, timeout: float = 30.0) -> list[int]:
        return [proc.wait(timeout=timeout) for proc in self.procs]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)

    def ops(self) -> list[Op]:
        return read_ops(self.logs)

    def output(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in self.workdir.glob("clients-*.out"))


if __name__ == "__main__":
    main()
