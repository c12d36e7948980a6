"""A throwaway PostgreSQL cluster (``initdb`` + ``pg_ctl`` on a spare port) that a test may stop and start at
will: the plan's store-restart faults never touch the shared server. Trust auth on 127.0.0.1 only.

PostgreSQL refuses to run as root, so when the tests run as root every binary runs as the ``postgres`` OS user
(``runuser``) and the data directory is a temporary directory owned by it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def find_bindir() -> Path | None:
    """The directory of ``pg_ctl``/``initdb``: PATH (/usr/local/bin), else the newest Debian install."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
    )
    for path in reversed(candidates):
        if (Path(path) / "pg_ctl").exists() and (Path(path) / "initdb").exists():
            return Path(path)
    return None


def spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgCluster:
    """``PgCluster().start()``; ``stop("immediate")`` is a crash as clients see it, ``start()`` recovers."""

    def __init__(self, *, port: int | None = None, bindir: Path | None = None) -> None:
        found = bindir or find_bindir()
        if found is None:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found")
        self.bindir = found
        self.port = port or spare_port()
        self.root = Path(tempfile.mkdtemp(prefix="runlane-pgcluster-"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "postgres"
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        os.chmod(self.root, 0o700)
        self._initialised = False

    def _cmd(self, tool: str, *args: str) -> list[str]:
        argv = [str(self.bindir / tool), *args]
        return ["runuser", "-u", self._user, "--", *argv] if self._user else argv

    def _run(self, tool: str, *args: str, timeout: float = 60.0) -> None:
        result = subprocess.run(self._cmd(tool, *args), capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(
                f"{tool} {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n"
                f"{self.log_tail()}"
            )

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def init(self) -> None:
        if self._initialised:
            return
        self._run(
            "initdb", "-D", str(self.datadir), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"
        )
        with open(self.datadir / "postgresql.conf", "a") as conf:
            # Crash-stops are the point: fsync off only skips flushing the OS cache, which survives them.
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\nmax_connections = 200\n"
                "fsync = off\nfull_page_writes = off\nshared_buffers = 64MB\n"
            )
        self._initialised = True

    def start(self, timeout: float = 60.0) -> PgCluster:
        self.init()
        self._run(
            "pg_ctl", "start", "-D", str(self.datadir), "-l", str(self.logfile), "-w",
            "-t", str(int(timeout)), timeout=timeout + 5,
        )  # fmt: skip
        return self

    def stop(self, mode: str = "immediate", timeout: float = 60.0) -> None:
        """``immediate``: no checkpoint, clients reset at once (recovery runs on the next start)."""
        if not self.running:
            return
        self._run(
            "pg_ctl", "stop", "-D", str(self.datadir), "-m", mode, "-w", "-t", str(int(timeout)),
            timeout=timeout + 5,
        )  # fmt: skip

    def restart(self, mode: str = "immediate", down_for: float = 0.0) -> None:
        self.stop(mode)
        if down_for > 0:
            time.sleep(down_for)
        self.start()

    @property
    def running(self) -> bool:
        return (self.datadir / "postmaster.pid").exists()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
