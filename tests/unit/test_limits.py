"""Limit parsing and admission bookkeeping are pure."""

from __future__ import annotations

import pytest

from runlane import InvalidArguments
from runlane.limits import JobLimits, QueueLimits, RateLimit, concurrency_key_value
from runlane.store.limiter import Admission, job_rate_key, queue_rate_key


@pytest.mark.parametrize(
    ("text", "count", "period"), [("100/m", 100, 60.0), ("5/s", 5, 1.0), (" 3 / h ", 3, 3600.0)]
)
def test_rate_limits_parse(text: str, count: int, period: float) -> None:
    limit = RateLimit.parse(text)
    assert (limit.count, limit.period) == (count, period)
    assert RateLimit.parse(str(limit)) == limit


@pytest.mark.parametrize("text", ["", "100", "0/s", "-1/s", "10/d", "ten/m", "1.5/s", "10/ms"])
def test_invalid_rate_limits_name_the_string(text: str) -> None:
    with pytest.raises(InvalidArguments, match="rate limit"):
        RateLimit.parse(text)


def test_concurrency_key_from_an_argument_or_a_callable() -> None:
    assert concurrency_key_value(None, {"a": 1}, "j") is None
    assert concurrency_key_value("customer", {"customer": 42}, "j") == "42"
    assert concurrency_key_value(lambda customer, **_: f"c-{customer}", {"customer": 7, "x": 1}, "j") == "c-7"
    with pytest.raises(InvalidArguments, match="missing"):
        concurrency_key_value("customer", {}, "j")
    with pytest.raises(InvalidArguments, match="callable failed"):
        concurrency_key_value(lambda: "x", {"a": 1}, "j")


def test_queue_limits_validate() -> None:
    with pytest.raises(InvalidArguments):
        QueueLimits("q", max_concurrency=0)
    with pytest.raises(InvalidArguments):
        QueueLimits("")


def test_admission_partitions_by_key_and_counts_queues() -> None:
    adm = Admission({"a": JobLimits("a", max_concurrency=1)}, {"q": QueueLimits("q", max_concurrency=3)})
    adm.count_running([("a", "q", "k1", 1)])
    assert not adm.admit("a", "q", "k1")  # k1 is at its limit
    assert adm.admit("a", "q", "k2")
    assert adm.admit("b", "q", "")
    assert not adm.admit("b", "q", "")  # the queue is now at 3
    assert "q" in adm.closed


def test_admission_rate_windows() -> None:
    adm = Admission(
        {"a": JobLimits("a", rate_limit=RateLimit(2, 1.0))},
        {"q": QueueLimits("q", rate_limit=RateLimit(3, 60))},
    )
    missing = adm.missing_windows([("a", "q", "")])
    assert set(missing) == {job_rate_key("a", ""), queue_rate_key("q")}
    adm.window_counts.update({job_rate_key("a", ""): 1, queue_rate_key("q"): 0})
    assert adm.admit("a", "q", "")
    assert not adm.admit("a", "q", "")  # the job's window is full (1 + 1)
    assert adm.starts == [queue_rate_key("q"), job_rate_key("a", "")]
