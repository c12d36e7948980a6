"""JSON in and out of the store. Pydantic models and common types are dumped; anything else is refused."""

from __future__ import annotations

import json
from typing import Any

import pydantic_core


class NotSerializable(TypeError):
    """Raised when a value cannot be stored as JSON."""


def to_jsonable(value: Any) -> Any:
    """Turn a value (pydantic models, datetimes, UUIDs, … included) into plain JSON types."""
    try:
        return pydantic_core.to_jsonable_python(value)
    except pydantic_core.PydanticSerializationError as exc:
        raise NotSerializable(f"{type(value).__name__} is not JSON-serialisable: {exc}") from None


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
"""Shared: ``json.dumps`` with any option builds a new encoder per call, a third of a small value's cost."""


def dumps(value: Any) -> str:
    """Compact JSON text for a value that is already JSON-safe (or made so by `to_jsonable`)."""
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError):
        return _ENCODER.encode(to_jsonable(value))


def loads(text: str | bytes | None) -> Any:
    return None if text is None else json.loads(text)
