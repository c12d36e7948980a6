"""``runlane schedules`` and ``runlane queues``: recurring triggers and queue controls, through the client."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import click

from runlane.cli.common import CliError, client_app, emit_json, json_option, url_option
from runlane.cli.output import fmt_time, table
from runlane.models import QueueInfo, Schedule


def _schedule_json(s: Schedule) -> dict[str, Any]:
    data = dataclasses.asdict(s)
    data["active"] = s.active
    return data


def _when(s: Schedule) -> str:
    if s.cron is not None:
        return s.cron if s.timezone == "UTC" else f"{s.cron} ({s.timezone})"
    return f"every {s.interval:g}s"


def _state(s: Schedule) -> str:
    if s.disabled_reason is not None:
        return "disabled"
    return "enabled" if s.enabled else "paused"


def _print_schedules(items: list[Schedule], as_json: bool) -> None:
    if as_json:
        emit_json([_schedule_json(s) for s in items])
        return
    if not items:
        click.echo("no schedules")
        return
    rows = [
        (s.id, s.job, _when(s), _state(s), s.overlap, fmt_time(s.next_fire_at), fmt_time(s.last_fire_at))
        for s in items
    ]
    click.echo(table(["id", "job", "when", "state", "overlap", "next fire (UTC)", "last fire (UTC)"], rows))
    for s in items:
        if s.disabled_reason:
            click.echo(f"{s.id}: {s.disabled_reason}")


@click.group(invoke_without_command=True)
@url_option
@json_option
@click.pass_context
def schedules(ctx: click.Context, url: str | None, as_json: bool) -> None:
    """List schedules, or manage one (add, show, pause, resume, remove)."""
    ctx.ensure_object(dict)
    ctx.obj["url"] = url
    if ctx.invoked_subcommand is None:
        with client_app(url) as app:
            _print_schedules(app.client.schedules.list(), as_json)


def _url(ctx: click.Context, url: str | None) -> str | None:
    return url or (ctx.obj or {}).get("url")


@schedules.command("add")
@click.argument("schedule_id", metavar="ID")
@click.argument("job")
@click.argument("cron", required=False)
@click.option("--args", "args_text", default="{}", show_default=True, help="Arguments as a JSON object.")
@click.option("--every", type=click.FloatRange(min=1), metavar="SECONDS", help="An interval instead of CRON.")
@click.option("--timezone", default="UTC", show_default=True, help="IANA timezone the cron expression is in.")
@click.option("--overlap", type=click.Choice(["skip", "allow", "queue"]), default="skip", show_default=True)
@click.option("--misfire", type=click.Choice(["latest", "skip", "all"]), default="latest", show_default=True)
@click.option("--max-catch-up", type=click.IntRange(min=0), default=100, show_default=True)
@url_option
@json_option
@click.pass_context
def add_schedule(
    ctx: click.Context,
    schedule_id: str,
    job: str,
    cron: str | None,
    args_text: str,
    every: float | None,
    timezone: str,
    overlap: str,
    misfire: str,
    max_catch_up: int,
    url: str | None,
    as_json: bool,
) -> None:
    """Create or replace schedule ID that triggers JOB on CRON (5 fields, or 6 with leading seconds)."""
    try:
        args = json.loads(args_text)
    except json.JSONDecodeError as exc:
        raise CliError(f"--args is not valid JSON ({exc.msg}): {args_text!r}") from None
    with client_app(_url(ctx, url)) as app:
        s = app.client.schedules.add(
            schedule_id,
            job,
            cron,
            args,
            interval=every,
            timezone=timezone,
            overlap=overlap,
            misfire=misfire,
            max_catch_up=max_catch_up,
        )
    _print_one(s, as_json)


def _print_one(s: Schedule, as_json: bool) -> None:
    if as_json:
        emit_json(_schedule_json(s))
        return
    click.echo(f"schedule {s.id}: {s.job} {_when(s)}, {_state(s)}, overlap={s.overlap}, misfire={s.misfire}")
    if s.disabled_reason:
        click.echo(f"  {s.disabled_reason}")
    for t in s.next_fire_times:
        click.echo(f"  next: {fmt_time(t)} UTC")


def _single(name: str, verb: str, doc: str) -> click.Command:
    @click.argument("schedule_id", metavar="ID")
    @url_option
    @json_option
    @click.pass_context
    def command(ctx: click.Context, schedule_id: str, url: str | None, as_json: bool) -> None:
        with client_app(_url(ctx, url)) as app:
            s = app.client.schedules
            if verb == "remove":
                gone = s.remove(schedule_id)
                if as_json:
                    emit_json({"id": schedule_id, "removed": gone})
                elif not gone:
                    raise CliError(f"schedule {schedule_id!r} not found")
                else:
                    click.echo(f"removed schedule {schedule_id}")
                return
            result = {"show": s.get, "pause": s.pause, "resume": s.resume}[verb](schedule_id)
        _print_one(result, as_json)

    command.__doc__ = doc
    return schedules.command(name)(command)


_single("show", "show", "Show schedule ID with its next fire times.")
_single("pause", "pause", "Pause schedule ID (no runs are created while paused).")
_single("resume", "resume", "Resume schedule ID from its next fire time after now.")
_single("remove", "remove", "Delete schedule ID (its runs stay).")


def _print_queues(items: list[QueueInfo], as_json: bool) -> None:
    if as_json:
        emit_json([dataclasses.asdict(q) for q in items])
        return
    if not items:
        click.echo("no queues")
        return
    rows = [
        (
            q.name,
            "paused" if q.paused else "active",
            q.pending,
            q.running,
            q.scheduled,
            q.retrying,
            q.max_concurrency if q.max_concurrency is not None else "-",
            q.rate_limit or "-",
        )
        for q in items
    ]
    headers = [
        "queue",
        "state",
        "pending",
        "running",
        "scheduled",
        "retrying",
        "max concurrency",
        "rate limit",
    ]
    click.echo(table(headers, rows))


@click.group(invoke_without_command=True)
@url_option
@json_option
@click.pass_context
def queues(ctx: click.Context, url: str | None, as_json: bool) -> None:
    """List queues (runs by status, paused or not, limits), or pause and resume one."""
    ctx.ensure_object(dict)
    ctx.obj["url"] = url
    if ctx.invoked_subcommand is None:
        with client_app(url) as app:
            _print_queues(app.client.queues(), as_json)


@queues.command("pause")
@click.argument("name")
@url_option
@click.pass_context
def pause_queue(ctx: click.Context, name: str, url: str | None) -> None:
    """Stop workers from claiming runs of queue NAME (it keeps accepting runs)."""
    with client_app(_url(ctx, url)) as app:
        app.client.pause_queue(name)
    click.echo(f"paused queue {name}")


@queues.command("resume")
@click.argument("name")
@url_option
@click.pass_context
def resume_queue(ctx: click.Context, name: str, url: str | None) -> None:
    """Let workers claim runs of queue NAME again."""
    with client_app(_url(ctx, url)) as app:
        app.client.resume_queue(name)
    click.echo(f"resumed queue {name}")


COMMANDS = [schedules, queues]
