"""What every command shares: the ``--url``/``--json`` options, one-line errors, and reaching the client."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import click

from runlane.app import Runlane
from runlane.cli.loading import load_app
from runlane.settings import DEFAULT_URL

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """A failure the user can act on: printed as one ``error: …`` line on stderr, exit status 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def describe(exc: BaseException) -> str:
    """The message and its cause chain on one line, so that a driver error is not hidden behind ours;
    a cause whose text the message already quotes is left out."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    causes: list[str] = []
    seen = {id(exc)}
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    while cause is not None and id(cause) not in seen and len(causes) < 3:
        seen.add(id(cause))
        text = " ".join(str(cause).split())
        if not text or text not in message:
            causes.append(f"{type(cause).__name__}: {text}" if text else type(cause).__name__)
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return message + "".join(f" (caused by {c})" for c in causes)


def url_option(func: F) -> F:
    return click.option(
        "--url",
        envvar="RUNLANE_URL",
        show_envvar=True,
        metavar="URL",
        help=f"Store URL: sqlite:///path.db or postgresql://user@host/db.  [default: {DEFAULT_URL}]",
    )(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")(
        func
    )


def url_from_command_line() -> bool:
    ctx = click.get_current_context()
    return ctx.get_parameter_source("url") is click.core.ParameterSource.COMMANDLINE


def load_user_app(path: str, url: str | None) -> Runlane:
    """The user's app; a ``--url`` typed on the command line wins over the URL written in its code
    (an explicit argument beats configuration), while ``RUNLANE_URL`` only fills in ``Runlane()``."""
    if url and url_from_command_line():
        os.environ["RUNLANE_URL"] = url  # for every Runlane() the module makes, and for child processes
    app = load_app(path)
    if url and url_from_command_line():
        app.url = url
    return app


@contextlib.contextmanager
def opened(app: Runlane) -> Iterator[Runlane]:
    """Close the store and the client's loop thread however the command ends."""
    try:
        yield app
    finally:
        app.close()


def client_app(url: str | None, app_path: str | None = None) -> contextlib.AbstractContextManager[Runlane]:
    """A client-only app (the job catalogue in the store stands in for the code), or the user's app."""
    app = load_user_app(app_path, url) if app_path else Runlane(url)
    return opened(app)


def call(app: Runlane, coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on the blocking client's loop, where the app's store lives for this command."""
    return app.client.portal.call(coro)


def emit_json(data: Any) -> None:
    from runlane.cli.output import dumps

    click.echo(dumps(data))
