"""Graceful stop for long-running commands: SIGINT/SIGTERM set a flag the main loop polls."""

from __future__ import annotations

import signal
import threading


def stop_event() -> threading.Event:
    """An event set by Ctrl-C or SIGTERM, so a command can finish its clean-up in order."""
    event = threading.Event()

    def _set(*_: object) -> None:
        event.set()

    signal.signal(signal.SIGINT, _set)
    signal.signal(signal.SIGTERM, _set)
    return event
