"""SIGTERM/SIGINT handling that restores the previous handlers on exit.

asyncio's ``add_signal_handler`` replaces whatever the host application installed; a worker embedded in
another program must give the handlers back when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def handle_stop_signals(on_signal: Callable[[signal.Signals], None]) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    installed = []
    try:
        for sig in SIGNALS:
            try:
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no support
                pass
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
            handler = previous[sig]
            if handler is not None:
                signal.signal(sig, handler)
