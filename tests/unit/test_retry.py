import random

import pytest

from runlane import JobTimeout, NonRetryable, Retry


def test_backoff_doubles_and_caps() -> None:
    policy = Retry(attempts=10, backoff=2.0, max_delay=30.0, jitter=False)
    assert [policy.base_delay(n) for n in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert policy.base_delay(10_000) == 30.0  # no overflow for absurd attempt numbers


def test_jitter_stays_within_half_to_full_delay() -> None:
    policy = Retry(attempts=5, backoff=1.0, max_delay=100.0)
    rng = random.Random(7)
    for attempt in range(1, 6):
        base = policy.base_delay(attempt)
        for _ in range(50):
            assert base / 2 <= policy.delay(attempt, rng) <= base


def test_next_delay_gives_up_after_last_attempt() -> None:
    policy = Retry(attempts=3, backoff=1.0, jitter=False)
    assert policy.next_delay(ValueError(), 1, 3) == 1.0
    assert policy.next_delay(ValueError(), 2, 3) == 2.0
    assert policy.next_delay(ValueError(), 3, 3) is None
    # a trigger's max_attempts overrides the job's attempts
    assert policy.next_delay(ValueError(), 3, 5) == 4.0


def test_only_listed_exceptions_are_retried() -> None:
    policy = Retry(attempts=5, on=(ConnectionError,), jitter=False)
    assert policy.next_delay(ConnectionError(), 1, 5) == 1.0
    assert policy.next_delay(ValueError(), 1, 5) is None
    assert policy.next_delay(NonRetryable("stop"), 1, 5) is None
    assert policy.next_delay(JobTimeout("slow"), 1, 5) == 1.0


def test_single_exception_type_is_accepted() -> None:
    assert Retry(on=KeyError).on == (KeyError,)  # type: ignore[arg-type]


def test_retry_attempts_one_disables_retries() -> None:
    assert Retry(attempts=1).next_delay(ValueError(), 1, 1) is None


@pytest.mark.parametrize("kwargs", [{"attempts": 0}, {"backoff": -1}, {"max_delay": -5}])
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        Retry(**kwargs)  # type: ignore[arg-type]
