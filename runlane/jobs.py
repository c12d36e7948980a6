"""What ``@app.job`` returns: a named function with options and an argument model built from its signature.

Arguments are JSON objects keyed by parameter name. The model derived from the type hints (pydantic models
included) validates them when a run is triggered and again in the worker, so that a run created by an older
client, or by a client-only process, is still checked against the code that will execute it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, get_type_hints

import pydantic
import pydantic_core

from runlane.errors import InvalidArguments
from runlane.limits import ConcurrencyKey, JobLimits, RateLimit, check_max_concurrency
from runlane.models import JobInfo
from runlane.retry import DEFAULT_RETRY, Retry
from runlane.serialization import NotSerializable, to_jsonable

if TYPE_CHECKING:
    import jsonschema

    from runlane.app import Runlane
    from runlane.models import Run

P = ParamSpec("P")
R = TypeVar("R")


EXECUTORS = frozenset({"thread", "process"})  # where a sync job runs: a worker thread or a job process


@dataclass(frozen=True, slots=True)
class JobOptions:
    name: str
    queue: str = "default"
    retry: Retry = DEFAULT_RETRY
    timeout: float | None = None
    priority: int = 0
    max_concurrency: int | None = None
    rate_limit: RateLimit | None = None
    concurrency_key: ConcurrencyKey | None = None
    schedule: str | None = None
    interval: float | None = None
    timezone: str = "UTC"
    overlap: str = "skip"
    misfire: str = "latest"
    max_catch_up: int = 100
    executor: str = "thread"

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError("a job needs a non-empty name")
        if not self.queue:
            raise ValueError(f"job {self.name!r}: queue must be a non-empty string")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"job {self.name!r}: timeout must be positive")
        check_max_concurrency(self.max_concurrency, f"job {self.name!r}")
        if self.executor not in EXECUTORS:
            raise ValueError(
                f"job {self.name!r}: executor must be one of {sorted(EXECUTORS)}, got {self.executor!r}"
            )
        if self.concurrency_key is not None and not (
            (isinstance(self.concurrency_key, str) and self.concurrency_key) or callable(self.concurrency_key)
        ):
            raise ValueError(f"job {self.name!r}: concurrency_key must be an argument name or a callable")
        if self.schedule is not None or self.interval is not None:
            from runlane.scheduler.cron import check_policies, make_timing

            make_timing(self.schedule, self.interval, self.timezone)
            check_policies(self.overlap, self.misfire, self.max_catch_up)

    @property
    def limits(self) -> JobLimits:
        return JobLimits(self.name, self.max_concurrency, self.rate_limit)

    def to_dict(self) -> dict[str, Any]:
        key = self.concurrency_key
        return {
            "queue": self.queue,
            "retry": self.retry.to_dict(),
            "timeout": self.timeout,
            "priority": self.priority,
            "max_concurrency": self.max_concurrency,
            "rate_limit": None if self.rate_limit is None else str(self.rate_limit),
            # A callable key cannot travel: client-only processes refuse to trigger such a job.
            "concurrency_key": key if key is None or isinstance(key, str) else {"callable": True},
            "schedule": self.schedule,
            "interval": self.interval,
            "timezone": self.timezone,
        }


@dataclass(frozen=True, slots=True)
class ArgumentSpec:
    """The parameters a job takes from its arguments, and how to validate them."""

    model: type[pydantic.BaseModel]
    names: tuple[str, ...]
    context_param: str | None
    accepts_extra: bool
    schema: dict[str, Any] = field(default_factory=dict)


def _context_type() -> type:
    from runlane.context import JobContext

    return JobContext


def build_argument_spec(func: Callable[..., Any], job_name: str) -> ArgumentSpec:
    signature = inspect.signature(func)
    try:
        hints = get_type_hints(func, include_extras=True)
    except Exception as exc:  # unresolvable forward references
        raise TypeError(
            f"job {job_name!r}: cannot resolve the type hints of {func.__qualname__}: {exc}"
        ) from exc
    context_type = _context_type()
    fields: dict[str, Any] = {}
    context_param: str | None = None
    accepts_extra = False
    for param in signature.parameters.values():
        annotation = hints.get(param.name, Any)
        if annotation is context_type:
            context_param = param.name
            continue
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"job {job_name!r}: *{param.name} is not supported; arguments are passed by name")
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            accepts_extra = True
            continue
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise TypeError(
                f"job {job_name!r}: positional-only parameter {param.name!r} cannot take arguments"
            )
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (annotation, default)
    config = pydantic.ConfigDict(extra="allow" if accepts_extra else "forbid", arbitrary_types_allowed=False)
    try:
        model = pydantic.create_model(f"{job_name}.arguments", __config__=config, **fields)
    except (pydantic.PydanticSchemaGenerationError, TypeError) as exc:
        raise TypeError(f"job {job_name!r}: its parameters cannot be validated from JSON: {exc}") from exc
    try:
        schema = model.model_json_schema()
    except (pydantic.PydanticInvalidForJsonSchema, TypeError):
        schema = {}
    return ArgumentSpec(model, tuple(fields), context_param, accepts_extra, schema)


def describe_validation_error(job: str, exc: pydantic.ValidationError) -> str:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        problems.append(f"{where}: {err['msg']}")
    return f"invalid arguments for job {job!r}: " + "; ".join(problems)


class Job(Generic[P, R]):
    """A registered job. Calling it calls the function; ``trigger``/``run`` go through the app's client."""

    def __init__(self, app: Runlane, func: Callable[P, R], options: JobOptions) -> None:
        self.app = app
        self.func = func
        self.options = options
        self.spec = build_argument_spec(func, options.name)
        self.is_async = inspect.iscoroutinefunction(func)
        self.is_async_generator = inspect.isasyncgenfunction(func)
        self.is_generator = inspect.isgeneratorfunction(func)
        if options.executor == "process":
            if self.is_async or self.is_async_generator:
                raise ValueError(
                    f"job {options.name!r}: executor='process' runs sync functions; an async job runs on the "
                    "worker's event loop"
                )
            from runlane.worker.job_processes import job_reference

            job_reference(func)
        self.__doc__ = func.__doc__
        self.__wrapped__ = func

    @property
    def name(self) -> str:
        return self.options.name

    @property
    def queue(self) -> str:
        return self.options.queue

    @property
    def is_streaming(self) -> bool:
        return self.is_generator or self.is_async_generator

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Job {self.name!r} queue={self.queue!r}>"

    def bind(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Positional and keyword arguments as the JSON-object form runs store."""
        params = [n for n in self.spec.names]
        if len(args) > len(params):
            raise InvalidArguments(f"job {self.name!r} takes at most {len(params)} positional arguments")
        bound = dict(zip(params, args, strict=False))
        for key in kwargs:
            if key in bound:
                raise InvalidArguments(f"job {self.name!r}: argument {key!r} given twice")
        bound.update(kwargs)
        return bound

    def validate(self, args: Mapping[str, Any] | None) -> dict[str, Any]:
        """Check ``args`` and return their JSON form (as given: defaults are applied by the worker)."""
        if args is None:
            args = {}
        if not isinstance(args, Mapping):
            raise InvalidArguments(
                f"arguments for job {self.name!r} must be a JSON object (a dict), not {type(args).__name__}"
            )
        if not args and not self.spec.names:
            return {}  # a job without parameters called without arguments: nothing to validate
        if self.spec.context_param is not None and self.spec.context_param in args:
            raise InvalidArguments(
                f"job {self.name!r}: {self.spec.context_param!r} is the job context, not an argument"
            )
        try:
            instance = self.spec.model.model_validate(dict(args))
        except pydantic.ValidationError as exc:
            raise InvalidArguments(describe_validation_error(self.name, exc)) from None
        try:
            return instance.model_dump(mode="json", exclude_unset=True)
        except pydantic_core.PydanticSerializationError as exc:
            raise InvalidArguments(
                f"arguments for job {self.name!r} are not JSON-serialisable: {exc}"
            ) from None

    def load(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        """Stored JSON arguments → keyword arguments for the function (pydantic models rebuilt)."""
        if not stored and not self.spec.names:
            return {}  # no parameters and no arguments: skip the model
        try:
            instance = self.spec.model.model_validate(dict(stored))
        except pydantic.ValidationError as exc:
            raise InvalidArguments(describe_validation_error(self.name, exc)) from None
        kwargs = {name: getattr(instance, name) for name in self.spec.names}
        if self.spec.accepts_extra and instance.model_extra:
            kwargs.update(instance.model_extra)
        return kwargs

    def info(self) -> JobInfo:
        return JobInfo(self.name, self.queue, self.options.to_dict(), self.spec.schema)

    # -- convenience through the app's clients ---------------------------------------------------------------

    def trigger(self, *args: P.args, **kwargs: P.kwargs) -> Run:
        """Trigger with typed arguments through the app's blocking client."""
        return self.app.client.trigger(self, self.bind(*args, **kwargs))

    async def trigger_async(self, *args: P.args, **kwargs: P.kwargs) -> Run:
        return await self.app.async_client.trigger(self, self.bind(*args, **kwargs))


_VALIDATORS: dict[int, tuple[Mapping[str, Any], jsonschema.Draft202012Validator]] = {}
_VALIDATORS_MAX = 256


def _schema_validator(schema: Mapping[str, Any]) -> jsonschema.Draft202012Validator:
    """One validator per catalogue schema object: building one costs more than a typical validation. Keyed
    by identity (the entry keeps the schema alive, so its id is not reused); catalogue entries are cached
    per client and never mutated."""
    entry = _VALIDATORS.get(id(schema))
    if entry is not None and entry[0] is schema:
        return entry[1]
    if len(_VALIDATORS) >= _VALIDATORS_MAX:
        _VALIDATORS.clear()
    # Imported here: only client-only processes validate against a schema, and jsonschema (with its
    # referencing and attrs) is a quarter of the import time of every worker and script.
    import jsonschema

    validator = jsonschema.Draft202012Validator(dict(schema))
    _VALIDATORS[id(schema)] = (schema, validator)
    return validator


def validate_with_schema(
    job: str, schema: Mapping[str, Any], args: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Client-only validation against the catalogue's JSON schema (no job code in this process)."""
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise InvalidArguments(
            f"arguments for job {job!r} must be a JSON object (a dict), not {type(args).__name__}"
        )
    try:
        data = to_jsonable(dict(args))
    except NotSerializable as exc:
        raise InvalidArguments(f"arguments for job {job!r} are not JSON-serialisable: {exc}") from None
    if schema:
        validator = _schema_validator(schema)
        errors = sorted(validator.iter_errors(data), key=lambda e: list(e.path))
        if errors:
            problems = "; ".join(f"{'.'.join(map(str, e.path)) or 'arguments'}: {e.message}" for e in errors)
            raise InvalidArguments(f"invalid arguments for job {job!r}: {problems}")
    if not isinstance(data, dict):  # pragma: no cover - a Mapping always dumps to a dict
        raise InvalidArguments(f"arguments for job {job!r} must be a JSON object")
    return data
