"""Workers: claim runs from queues and execute them."""

from runlane.worker.worker import Worker

__all__ = ["Worker"]
