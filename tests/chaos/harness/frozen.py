"""T06's second variant: a worker whose heartbeat component is frozen (``CHAOS_FREEZE_HEARTBEAT=1``), to prove
that the lease detector still reclaims its runs."""

from __future__ import annotations

import os


def install_from_env() -> None:
    if os.environ.get("CHAOS_FREEZE_HEARTBEAT") != "1":
        return
    from runlane.worker.heartbeat import Heartbeat

    def frozen(self: Heartbeat) -> None:
        """Renew nothing, and do not self-fence either: the process believes it is healthy."""

    Heartbeat.beat = frozen  # type: ignore[method-assign]
