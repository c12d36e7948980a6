"""The ``runlane`` command: a thin layer over the app, the client and the worker.

Every failure the user can act on (a ``RunlaneError``, a bad option value, an APP path that does not import)
becomes one ``error: …`` line on stderr and exit status 1; click's usage errors exit 2.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

import click

from runlane import __version__
from runlane.app import Runlane
from runlane.cli.common import (
    CliError,
    call,
    client_app,
    describe,
    emit_json,
    json_option,
    load_user_app,
    opened,
    url_from_command_line,
    url_option,
)
from runlane.cli.output import fmt_time
from runlane.cli.runs import COMMANDS
from runlane.cli.schedules import COMMANDS as FLOW_COMMANDS
from runlane.errors import RunlaneError
from runlane.models import to_datetime

LOG_LEVELS = ["debug", "info", "warning", "error"]


class RunlaneGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (RunlaneError, ValueError) as exc:
            raise CliError(describe(exc)) from exc


@click.group(
    cls=RunlaneGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}
)
@click.version_option(__version__, prog_name="runlane")
def cli() -> None:
    """Runlane: durable background jobs on SQLite or PostgreSQL.

    Every command reads the store URL from --url or RUNLANE_URL; settings come from RUNLANE_<NAME>
    variables (RUNLANE_LEASE_TIMEOUT, RUNLANE_SHUTDOWN_TIMEOUT, …).
    """


for command in [*COMMANDS, *FLOW_COMMANDS]:
    cli.add_command(command)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )


@cli.command()
@click.argument("app_path", metavar="APP")
@click.option(
    "--queues",
    envvar="RUNLANE_QUEUES",
    show_envvar=True,
    metavar="A,B",
    help="Comma-separated queues to claim from.  [default: every queue the app's jobs use]",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    envvar="RUNLANE_CONCURRENCY",
    show_envvar=True,
    help="Runs executed at once, per process.",
)
@click.option("--burst", is_flag=True, help="Exit once no run is due and none is running.")
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    envvar="RUNLANE_PROCESSES",
    show_envvar=True,
    help="Worker processes to supervise (restarted if they crash; signals are forwarded).",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS),
    default="info",
    show_default=True,
    envvar="RUNLANE_LOG_LEVEL",
    show_envvar=True,
)
@url_option
def worker(
    app_path: str,
    queues: str | None,
    concurrency: int,
    burst: bool,
    processes: int,
    log_level: str,
    url: str | None,
) -> None:
    """Run a worker for APP (module:attr, e.g. tasks:app) until stopped.

    The first signal stops claiming and lets running attempts finish within RUNLANE_SHUTDOWN_TIMEOUT, then
    hands unfinished runs back to pending; a second signal stops at once.
    """
    _setup_logging(log_level)
    if processes > 1:
        from runlane.worker.processes import Supervisor

        argv = [
            sys.executable,
            "-m",
            "runlane",
            "worker",
            app_path,
            "--processes",
            "1",
            "--concurrency",
            str(concurrency),
            "--log-level",
            log_level,
        ]
        argv += ["--queues", queues] if queues else []
        argv += ["--burst"] if burst else []
        argv += ["--url", url] if url and url_from_command_line() else []
        supervisor = Supervisor(argv, processes, burst=burst)
        supervisor.start_gated()  # they import while this process checks (see processes.py)
        try:
            app = load_user_app(app_path, url)
            with opened(app):
                call(app, app.open_store())  # a wrong URL or an unmigrated store fails here once, not N times
        except BaseException:
            supervisor.abort()
            raise
        sys.exit(supervisor.run())
    from runlane.worker.processes import wait_at_gate

    if not wait_at_gate():
        sys.exit(0)  # the supervisor found a problem and reports it
    app = load_user_app(app_path, url)
    # CPU-bound sync jobs hold the GIL in 5 ms slices by default; every store round trip of the heartbeat,
    # claim and finish paths must win it back several times, so under such jobs a heartbeat took over a
    # second (chaos T06). Shorter slices keep the worker's own threads responsive for a few % of job speed.
    sys.setswitchinterval(0.001)
    runner = app.worker(queues=queues, concurrency=concurrency, burst=burst)

    async def serve() -> None:
        try:
            await runner.run(handle_signals=True)
        finally:
            await app.aclose()

    asyncio.run(serve())
    if runner.stopped_at_once:
        # A second signal means "exit now": do not let interpreter shutdown wait for job threads that are
        # still inside a sync job (their runs come back after the lease expires).
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)


@cli.command()
@click.argument("app_path", metavar="[APP]", required=False)
@url_option
@json_option
def migrate(app_path: str | None, url: str | None, as_json: bool) -> None:
    """Apply schema migrations, and record APP's jobs.

    With APP (module:attr), its jobs are recorded in the store's catalogue, so that client-only processes
    (`runlane trigger`, `Runlane(url).client`) can validate and trigger them without the code.
    """
    app = load_user_app(app_path, url) if app_path else Runlane(url)
    with opened(app):
        store = app.store
        if app_path:
            applied = call(app, app.migrate())
        else:
            call(app, store.open())
            applied = call(app, store.migrate())
        version, _ = call(app, store.schema_version())
    jobs = sorted(app.jobs)
    if as_json:
        emit_json({"url": store.display_url, "applied": applied, "version": version, "jobs": jobs})
        return
    if applied:
        listed = ", ".join(str(v) for v in applied)
        click.echo(f"applied migration{'s' if len(applied) > 1 else ''} {listed} to {store.display_url}")
        click.echo(f"schema at version {version}")
    else:
        click.echo(f"schema up to date (version {version})")
    if app_path:
        click.echo(
            f"job catalogue: {len(jobs)} job{'s' if len(jobs) != 1 else ''} ({', '.join(jobs) or '-'})"
        )


@cli.command()
@click.option(
    "--older-than",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Prune runs that finished this long ago.  [default: the retention setting, RUNLANE_RETENTION]",
)
@url_option
@json_option
def prune(older_than: float | None, url: str | None, as_json: bool) -> None:
    """Delete finished runs older than the retention.

    Their attempts and events go with them; runs with an active descendant are kept.
    """
    with client_app(url) as app:
        if older_than is None:
            if app.settings.retention is None:
                raise CliError("retention is off (RUNLANE_RETENTION=none): pass --older-than SECONDS")
            older_than = app.settings.retention.total_seconds()

        async def do_prune(age: float) -> tuple[float, int]:
            store = await app.open_store()
            cutoff = store.now() - age
            return cutoff, await store.prune(cutoff)

        cutoff, count = call(app, do_prune(older_than))
    when = to_datetime(cutoff)
    if as_json:
        emit_json({"pruned": count, "finished_before": when})
    else:
        click.echo(f"pruned {count} run{'s' if count != 1 else ''} finished before {fmt_time(when)} UTC")


@cli.command()
@click.option(
    "--url",
    envvar="RUNLANE_DEMO_URL",
    show_envvar=True,
    default="sqlite:///runlane-demo.db",
    show_default=True,
    help="Where the demo keeps its runs (not RUNLANE_URL: never your real store).",
)
@click.option(
    "--runs",
    "total",
    type=click.IntRange(min=0),
    default=40,
    show_default=True,
    help="Sample runs to trigger over the first part of the demo (0: keep triggering).",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0),
    default=20.0,
    show_default=True,
    help="Seconds before stopping (0: until Ctrl-C).",
)
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True)
def demo(url: str, total: int, duration: float, concurrency: int) -> None:
    """Run a self-contained demo with a live view.

    Example jobs, a worker in the same process and a stream of sample runs, on a SQLite file.
    """
    from runlane.demo import run_demo

    sys.exit(run_demo(url, runs=total, duration=duration, concurrency=concurrency))


def main() -> None:
    cli(prog_name="runlane")


if __name__ == "__main__":
    main()
