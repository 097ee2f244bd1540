"""Waiting for a started ``labdaq serve`` / ``labdaq api`` to answer ``GET /health``.

One job: a hang guard, never a performance bound. The API starts at nice 10 (``api_nice``)
and does its first request's imports (pandas via pyarrow, SciPy) before it answers; on
a 2-core machine shared with other test runs that took minutes, so the wait is long, and
it ends at once when the process exits.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import httpx

#: Longest wait for a service to answer /health: only a hang takes longer. A test that
#: waits this long needs a pytest timeout above it (``SERVICE_TEST_TIMEOUT_S``).
SERVICE_START_S = 300.0
SERVICE_TEST_TIMEOUT_S = 600


def wait_healthy(base: str, proc: subprocess.Popen[str] | subprocess.Popen[bytes],
                 output: Callable[[], str] = lambda: "") -> None:
    """Return once ``base``/health answers 200; fail if ``proc`` exits first or after
    ``SERVICE_START_S`` (with ``output()``, the service's log so far)."""
    deadline = time.monotonic() + SERVICE_START_S
    while True:
        assert proc.poll() is None, f"the service exited ({proc.returncode}):\n{output()}"
        try:
            if httpx.get(f"{base}/health", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"no answer to /health:\n{output()}"
        time.sleep(0.2)
