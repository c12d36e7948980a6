"""The checker's own rules, on hand-made records (no processes)."""

from __future__ import annotations

from harness.checker import _stopped_between
from harness.faults import Fault


def test_limits_under_chaos_a_zombie_paused_again_is_not_executing_while_stopped() -> None:
    """T19 (full tier): a worker resumed from one pause was paused again (and again) before it noticed its lost
    lease; the zombie tail counted those pauses as execution (50 s against a 2 s bound)."""
    faults = [
        Fault("pause", 7, 10.0, 20.0),  # the pause the zombie tail starts after
        Fault("pause", 7, 21.0, 31.0),
        Fault("pause", 7, 25.0, 35.0),  # overlapping records of the same stop count once
        Fault("pause", 8, 22.0, 40.0),  # another process
        Fault("kill", 7, 50.0),
        Fault("pause", 7, 60.0),  # still paused when the execution ended
    ]
    assert _stopped_between(7, 20.0, 36.0, faults) == 14.0
    assert _stopped_between(7, 20.0, 21.0, faults) == 0.0
    assert _stopped_between(7, 20.0, 62.0, faults) == 14.0 + 2.0
