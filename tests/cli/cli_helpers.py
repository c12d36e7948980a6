"""Helpers for driving the real ``runlane`` command in subprocesses.

Synchronisation is by polling the store (or a worker's log) with generous deadlines, never by sleeping for a
fixed time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from runlane import Run, Runlane

DEADLINE = 30.0

APP_MODULE = textwrap.dedent(
    '''
    """The app the CLI tests run: plain, failing and sleeping jobs."""
    import asyncio

    from runlane import JobContext, Retry, Runlane

    app = Runlane()


    @app.job
    def add(a: int, b: int) -> int:
        return a + b


    @app.job(retry=Retry(attempts=1))
    def boom() -> None:
        raise ValueError("kaboom")


    @app.job
    async def nap(seconds: float, ctx: JobContext) -> str:
        ctx.progress(0, "napping")
        await asyncio.sleep(seconds)
        ctx.progress(100, "awake")
        return "rested"


    @app.job(executor="process")
    def crunch(pid_file: str, seconds: float) -> int:
        """Runs in a job process: says which one, then works for a while."""
        import os
        import time

        with open(pid_file + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)
        time.sleep(seconds)
        return os.getpid()
    '''
)


class Spawned:
    """A long-running command (a worker) whose stderr is collected by a thread, so that its log can be
    waited on and a chatty process never blocks on a full pipe."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:
            for line in self.proc.stderr:
                self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_for_output(self, text: str, timeout: float = DEADLINE) -> None:
        wait_for(
            lambda: any(text in line for line in list(self.lines)), f"{text!r} in:\n{self.stderr}", timeout
        )

    def exit_code(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.reader.join(timeout=10)
            pytest.fail(f"the process did not exit within {timeout:g} s:\n{self.stderr}")


@dataclass
class Cli:
    """Runs ``python -m runlane`` in ``cwd`` against ``url``; also reads the store from the test process."""

    cwd: Path
    url: str
    env: dict[str, str]
    _apps: list[Runlane] = field(default_factory=list)
    _procs: list[Spawned] = field(default_factory=list)

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "runlane", *args]

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            cwd=self.cwd,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ok(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        result = self(*args, **kwargs)
        assert result.returncode == 0, f"runlane {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json").stdout)

    def spawn(self, *args: str, env: dict[str, str] | None = None) -> Spawned:
        proc = subprocess.Popen(
            self.argv(*args),
            cwd=self.cwd,
            env={**self.env, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        spawned = Spawned(proc)
        self._procs.append(spawned)
        return spawned

    def trigger(self, job: str, args: dict[str, Any] | None = None) -> int:
        data = self.json("trigger", job, "--args", json.dumps(args or {}))
        run_id: int = data["id"]
        return run_id

    @property
    def app(self) -> Runlane:
        if not self._apps:
            self._apps.append(Runlane(self.url))
        return self._apps[0]

    def get_run(self, run_id: int) -> Run:
        run = self.app.client.get_run(run_id)
        assert run is not None, f"run {run_id} not found"
        return run

    def wait_for_run(self, run_id: int, predicate: Callable[[Run], bool], what: str) -> Run:
        run: Run = wait_for(lambda: r if predicate(r := self.get_run(run_id)) else None, what)
        return run

    def close(self) -> None:
        for spawned in self._procs:
            if spawned.proc.poll() is None:
                spawned.proc.kill()
            spawned.proc.wait(timeout=10)
            spawned.reader.join(timeout=10)
        for app in self._apps:
            app.close()


def wait_for(check: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def one_error_line(stderr: str) -> str:
    """The CLI's failure contract: exactly one ``error: …`` line and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]
