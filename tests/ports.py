"""TCP ports for the services that tests and benchmarks start on a fixed port.

One job: hand out a port that nothing else on the machine can take before the service
binds it. A port found by binding port 0 comes from the kernel's ephemeral range, and
until the service binds it any socket may get it: a simulated instrument of another
test's lab binding port 0, or the local end of any client connection. Then the service
fails with "address already in use", and the test's HTTP polling of that port reaches
whatever took it (a simulated SMU queues -113 "Undefined header" for ``GET /health``).
The kernel never hands out a port below the ephemeral range, and each pytest-xdist worker
picks from its own block there, so a port found free stays free for its caller.

``LABDAQ_TEST_PORT_BASE`` moves every block (default 18000): two checkouts that run their
tests at once on one machine give each a different base (25000 for the second leaves
room for 11 workers below Linux's default ephemeral range), or their workers share blocks.
"""

from __future__ import annotations

import os
import random
import socket

BLOCK = 500  # ports per process block
# The benchmarks' block; tests without xdist next, then each worker's.
FIRST = int(os.environ.get("LABDAQ_TEST_PORT_BASE", "18000"))
_given: set[int] = set()  # handed out by this process: its service may not have bound it yet


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def _block_start(owner: str | None) -> int:
    """First port of the block of ``owner`` ("bench", None for a test process without
    xdist, or an xdist worker id such as "gw3")."""
    if owner == "bench":
        index = 0
    elif owner is None:
        index = 1
    else:
        index = 2 + int(owner.removeprefix("gw"))
    start = FIRST + index * BLOCK
    if start < 1024 or start + BLOCK > _ephemeral_low():
        raise RuntimeError(f"no port block between 1024 and the ephemeral range for "
                           f"{owner!r} (LABDAQ_TEST_PORT_BASE={FIRST})")
    return start


def free_port(owner: str | None = None) -> int:
    """A port of 127.0.0.1 that nobody listens on, from this process's block."""
    if owner is None:
        owner = os.environ.get("PYTEST_XDIST_WORKER")
    start = _block_start(owner)
    candidates = [p for p in range(start, start + BLOCK) if p not in _given]
    if not candidates:
        _given.clear()
        candidates = list(range(start, start + BLOCK))
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as s:
            # As a server would bind it: a port whose last connection is in TIME_WAIT
            # is free for a listener.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"every port of {start}-{start + BLOCK - 1} is in use")
