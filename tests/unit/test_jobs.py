from datetime import datetime
from typing import Any

import pydantic
import pytest

from runlane import InvalidArguments, JobContext, Retry, Runlane


class Payload(pydantic.BaseModel):
    to: str
    count: int = 1


@pytest.fixture
def app() -> Runlane:
    return Runlane("sqlite:///:memory:")


def test_bare_decorator_uses_the_function_name(app: Runlane) -> None:
    @app.job
    def add(a: int, b: int) -> int:
        return a + b

    assert add.name == "add"
    assert add.queue == "default"
    assert add.options.retry == Retry(attempts=3, backoff=1.0, max_delay=300)
    assert add(1, 2) == 3
    assert app.jobs["add"] is add


def test_options(app: Runlane) -> None:
    @app.job(name="emails.send", queue="emails", retry=Retry(attempts=5), timeout=60, priority=3)
    async def send(payload: Payload, ctx: JobContext) -> None: ...

    assert (send.name, send.queue, send.options.timeout, send.options.priority) == (
        "emails.send",
        "emails",
        60,
        3,
    )
    assert send.is_async
    assert send.spec.context_param == "ctx"
    assert send.spec.names == ("payload",)


def test_duplicate_names_are_refused(app: Runlane) -> None:
    @app.job
    def twice() -> None: ...

    with pytest.raises(ValueError, match="twice"):
        app.job(name="twice")(lambda: None)


def test_validation_coerces_and_dumps_json(app: Runlane) -> None:
    @app.job
    def send(payload: Payload, when: datetime, retries: int = 2) -> None: ...

    data = send.validate({"payload": {"to": "a@b.c"}, "when": "2026-01-02T03:04:05Z"})
    assert data == {"payload": {"to": "a@b.c"}, "when": "2026-01-02T03:04:05Z"}
    loaded = send.load(data)
    assert loaded["payload"] == Payload(to="a@b.c")
    assert loaded["when"].year == 2026
    assert loaded["retries"] == 2


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ({"a": "x", "b": 1}, "a: Input should be a valid integer"),
        ({"a": 1}, "b: Field required"),
        ({"a": 1, "b": 2, "c": 3}, "c: Extra inputs are not permitted"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_invalid_arguments_name_the_problem(app: Runlane, args: Any, fragment: str) -> None:
    @app.job
    def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(InvalidArguments, match="job 'add'") as info:
        add.validate(args)
    assert fragment in str(info.value)


def test_kwargs_jobs_accept_extra_arguments(app: Runlane) -> None:
    @app.job
    def anything(first: int, **rest: Any) -> None: ...

    assert anything.load({"first": 1, "x": 2}) == {"first": 1, "x": 2}


def test_bind_maps_positional_arguments(app: Runlane) -> None:
    @app.job
    def add(a: int, b: int) -> int:
        return a + b

    assert add.bind(1, b=2) == {"a": 1, "b": 2}
    with pytest.raises(InvalidArguments, match="given twice"):
        add.bind(1, a=2)


def test_varargs_jobs_are_refused_at_definition(app: Runlane) -> None:
    with pytest.raises(TypeError, match=r"\*items"):

        @app.job
        def many(*items: int) -> None: ...


def test_catalogue_entry_carries_a_json_schema(app: Runlane) -> None:
    @app.job(queue="q")
    def send(payload: Payload) -> None: ...

    info = send.info()
    assert info.name == "send"
    assert info.queue == "q"
    assert info.args_schema["required"] == ["payload"]
    assert info.options["retry"]["attempts"] == 3
