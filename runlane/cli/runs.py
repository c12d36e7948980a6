"""Commands that act on runs through the client: trigger, list, inspect, cancel, retry, rerun.

They need no job code: the store's job catalogue validates triggers, so any host with ``RUNLANE_URL`` can
drive a deployment.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
from datetime import timedelta
from typing import Any

import click

from runlane.cli.common import CliError, call, client_app, emit_json, json_option, url_option
from runlane.cli.output import event_text, record, run_details, runs_table
from runlane.client import AsyncClient
from runlane.errors import RunCancelled, RunFailed, RunNotFound
from runlane.models import Event, Run, RunFilter, RunStatus

STATUSES = [s.value for s in RunStatus]


def _parse_args(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"--args is not valid JSON ({exc.msg} at position {exc.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise CliError(f"--args must be a JSON object such as '{{\"a\": 1}}', not {type(value).__name__}")
    return value


class _ProgressLine:
    """Shows a waited-for run's progress on stderr: one rewritten line on a terminal, plain lines otherwise."""

    def __init__(self, run: Run) -> None:
        self.run_id, self.job = run.id, run.job
        self.status, self.progress = run.status.value, ""
        self.tty = sys.stderr.isatty()

    def __call__(self, event: Event) -> None:
        if event.kind == "status" and isinstance(event.data, dict):
            self.status = str(event.data.get("to", self.status))
            if self.status != "running":
                self.progress = ""
        elif event.kind == "progress":
            self.progress = event_text(event)
        elif event.kind == "log":
            self._line(f"run {self.run_id}: {event_text(event)}", keep=True)
            return
        else:
            return
        self._line(f"run {self.run_id} ({self.job}): {self.status} {self.progress}".rstrip())

    def _line(self, text: str, keep: bool = False) -> None:
        if self.tty:
            click.echo(f"\r\x1b[K{text}", err=True, nl=keep)
        else:
            click.echo(text, err=True)

    def close(self) -> None:
        if self.tty:
            click.echo("", err=True)


async def _follow(client: AsyncClient, run_id: int, timeout: float | None, show: _ProgressLine) -> Run:
    async with asyncio.timeout(timeout):
        async for event in client.events(run_id):
            show(event)
        run = await client.get_run(run_id)
    if run is None:
        raise RunNotFound(run_id)
    return run


@click.command()
@click.argument("job")
@click.option("--args", "args_json", default="{}", metavar="JSON", help="Arguments as a JSON object.")
@click.option(
    "--wait", is_flag=True, help="Wait for the run to end and print its result (exit 1 if it failed)."
)
@click.option("--timeout", type=click.FloatRange(min=0), help="With --wait: give up after this many seconds.")
@click.option("--queue", help="Queue instead of the job's own.")
@click.option("--priority", type=int, help="Higher runs first.")
@click.option("--dedup-id", help="Refuse the run while another active run has this id.")
@click.option(
    "--delay", type=click.FloatRange(min=0), help="Start no sooner than this many seconds from now."
)
@click.option(
    "--max-attempts", type=click.IntRange(min=1), help="Attempts instead of the job's retry policy."
)
@click.option("--tag", "tags", multiple=True, help="Tag the run (repeatable).")
@click.option(
    "--app", "app_path", metavar="MODULE:ATTR", help="Validate against this app's code, not the catalogue."
)
@url_option
@json_option
def trigger(
    job: str,
    args_json: str,
    wait: bool,
    timeout: float | None,
    queue: str | None,
    priority: int | None,
    dedup_id: str | None,
    delay: float | None,
    max_attempts: int | None,
    tags: tuple[str, ...],
    app_path: str | None,
    url: str | None,
    as_json: bool,
) -> None:
    """Trigger a run of JOB; with --wait, wait and print its result."""
    args = _parse_args(args_json)
    with client_app(url, app_path) as app:
        run = app.client.trigger(
            job,
            args,
            queue=queue,
            priority=priority,
            dedup_id=dedup_id,
            not_before=timedelta(seconds=delay) if delay else None,
            max_attempts=max_attempts,
            tags=tags or None,
        )
        if not wait:
            if as_json:
                emit_json(record(run))
            else:
                click.echo(f"run {run.id} triggered: job {run.job}, queue {run.queue}, {run.status.value}")
            return
        click.echo(f"run {run.id} triggered ({run.job}); waiting for it to end…", err=True)
        show = _ProgressLine(run)
        try:
            final = call(app, _follow(app.client.async_client, run.id, timeout, show))
        except TimeoutError:
            show.close()
            current = app.client.get_run(run.id)
            state = current.status.value if current else "unknown"
            raise CliError(f"timed out after {timeout:g} s waiting for run {run.id} (now {state})") from None
        except KeyboardInterrupt:
            show.close()
            click.echo(f"stopped waiting; run {run.id} goes on (see `runlane run {run.id}`)", err=True)
            sys.exit(130)
        show.close()
        if as_json:
            emit_json(record(final))
        elif final.status is RunStatus.SUCCEEDED:
            click.echo(json.dumps(final.result, ensure_ascii=False, default=str))
        if final.status is not RunStatus.SUCCEEDED:
            exc = RunCancelled(final) if final.status is RunStatus.CANCELLED else RunFailed(final)
            if as_json:
                click.echo(f"error: {exc}", err=True)
                sys.exit(1)
            raise exc


@click.command()
@click.option("--status", type=click.Choice(STATUSES), help="Only runs in this status.")
@click.option("--job", help="Only runs of this job.")
@click.option("--queue", help="Only runs in this queue.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="At most this many.")
@url_option
@json_option
def runs(
    status: str | None, job: str | None, queue: str | None, limit: int, url: str | None, as_json: bool
) -> None:
    """List runs, newest first."""
    with client_app(url) as app:
        found = list(app.client.list_runs(RunFilter(job=job, status=status, queue=queue), limit=limit))
    if as_json:
        emit_json([record(r) for r in found])
    elif found:
        click.echo(runs_table(found))
    else:
        click.echo("no runs", err=True)


async def _latest_events(app_client: AsyncClient, run_id: int, keep: int) -> list[Event]:
    # The client's `events` follows a live run until it ends; a snapshot reads the store directly.
    store = await app_client.app.open_store()
    latest: collections.deque[Event] = collections.deque(maxlen=keep)
    since: int | None = None
    while True:
        page = await store.events(run_id, since=since, limit=1000)
        latest.extend(page)
        if len(page) < 1000:
            return list(latest)
        since = page[-1].id


@click.command(name="run")
@click.argument("run_id", type=int, metavar="ID")
@click.option(
    "--events",
    "keep",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Show this many latest events.",
)
@url_option
@json_option
def show_run(run_id: int, keep: int, url: str | None, as_json: bool) -> None:
    """Show one run: its fields, attempts and latest events."""
    with client_app(url) as app:
        run = app.client.get_run(run_id)
        if run is None:
            raise RunNotFound(run_id)
        attempts = app.client.attempts(run_id)
        events = call(app, _latest_events(app.client.async_client, run_id, keep)) if keep else []
    if as_json:
        emit_json(
            {**record(run), "attempts": [record(a) for a in attempts], "events": [record(e) for e in events]}
        )
    else:
        click.echo(run_details(run, attempts, events))


@click.command()
@click.argument("run_id", type=int, metavar="ID")
@url_option
@json_option
def cancel(run_id: int, url: str | None, as_json: bool) -> None:
    """Cancel a run and its active descendants.

    Exits 1 if the run had already ended.
    """
    with client_app(url) as app:
        done = app.client.cancel(run_id)
        run = app.client.get_run(run_id)
    _report(run_id, run, done, as_json, "cancelled", "nothing to cancel")


@click.command()
@click.argument("run_id", type=int, metavar="ID")
@url_option
@json_option
def retry(run_id: int, url: str | None, as_json: bool) -> None:
    """Put a failed or cancelled run back to pending.

    Same id, one more attempt allowed; exits 1 for a run in any other state.
    """
    with client_app(url) as app:
        done = app.client.retry(run_id)
        run = app.client.get_run(run_id)
    _report(run_id, run, done, as_json, "back to pending", "only failed or cancelled runs can be retried")


def _report(run_id: int, run: Run | None, done: bool, as_json: bool, did: str, refused: str) -> None:
    if run is None:
        raise RunNotFound(run_id)
    if as_json:
        emit_json({"id": run_id, "changed": done, "status": run.status.value})
    elif done:
        click.echo(f"run {run_id} ({run.job}): {did}")
    if not done:
        raise CliError(f"run {run_id} is {run.status.value}: {refused}")


@click.command()
@click.argument("run_id", type=int, metavar="ID")
@url_option
@json_option
def rerun(run_id: int, url: str | None, as_json: bool) -> None:
    """Trigger a new run with the same job and arguments.

    The old run stays as it is.
    """
    with client_app(url) as app:
        run = app.client.rerun(run_id)
    if as_json:
        emit_json(record(run))
    else:
        click.echo(f"run {run.id} triggered (rerun of {run_id}): job {run.job}, {run.status.value}")


COMMANDS = [trigger, runs, show_run, cancel, retry, rerun]
