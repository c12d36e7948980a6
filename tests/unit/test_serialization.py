import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pydantic
import pytest

from runlane.models import ErrorInfo, to_datetime, to_timestamp
from runlane.serialization import NotSerializable, dumps, loads, to_jsonable


class Item(pydantic.BaseModel):
    name: str
    at: datetime


def test_pydantic_models_and_common_types_are_dumped() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    value = {"item": Item(name="x", at=at), "id": uuid.UUID(int=1), "n": Decimal("1.5"), "t": (1, 2)}
    assert to_jsonable(value) == {
        "item": {"name": "x", "at": "2026-01-02T03:04:05Z"},
        "id": "00000000-0000-0000-0000-000000000001",
        "n": "1.5",
        "t": [1, 2],
    }
    assert loads(dumps(value)) == to_jsonable(value)


def test_unserialisable_values_raise_a_typed_error() -> None:
    with pytest.raises(NotSerializable, match="object"):
        to_jsonable(object())
    with pytest.raises(NotSerializable):
        dumps({"x": object()})


def test_non_finite_floats_are_refused() -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - NaN is not JSON
        dumps(float("nan"))


def test_timestamps_round_trip_and_naive_means_utc() -> None:
    aware = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
    assert to_datetime(to_timestamp(aware)) == aware
    assert to_timestamp(aware.replace(tzinfo=None)) == to_timestamp(aware)
    assert to_datetime(None) is None
    assert to_timestamp(None) is None


def test_error_info_prints_type_and_message() -> None:
    error = ErrorInfo("ValueError", "bad", "Traceback ...")
    assert str(error) == "ValueError: bad"
    assert ErrorInfo.from_dict(error.to_dict()) == error
    assert str(ErrorInfo("WorkerLost", "")) == "WorkerLost"
