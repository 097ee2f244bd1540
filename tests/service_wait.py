"""Waiting for a started ``labdaq serve`` / ``labdaq api`` to answer ``GET /health``.

One job: a hang guard, never a performance bound. The API starts at nice 10 (``api_nice``)
and does its first request's imports (pandas via pyarrow, SciPy) before it answers; on
a 2-core machine shared with other test runs that took minutes, so the wait is long, and
it ends at once when the process exits.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from urllib.parse import urlsplit

from labdaq import processes

#: Longest wait for a service to answer /health: only a hang takes longer. A test that
#: waits this long needs a pytest timeout above it (``SERVICE_TEST_TIMEOUT_S``).
SERVICE_START_S = 300.0
SERVICE_TEST_TIMEOUT_S = 600


def wait_healthy(base: str, proc: subprocess.Popen[str] | subprocess.Popen[bytes],
                 output: Callable[[], str] = lambda: "") -> None:
    """Return once ``base``/health answers 200; fail if ``proc`` exits first or after
    ``SERVICE_START_S`` (with ``output()``, the service's log so far)."""
    url = urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    try:
        # Each request may take 10 s: the niced API answers slowly while it starts.
        processes.wait_until(lambda: processes.http_ok(host, port, "/health", timeout_s=10),
                             SERVICE_START_S, "GET /health", proc, poll_s=0.2)
    except processes.ChildFailed as exc:
        raise AssertionError(f"{exc}:\n{output()}") from exc
