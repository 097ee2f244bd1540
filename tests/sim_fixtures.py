"""Pytest fixtures for simulator-backed tests: clocks, a Keithley 2450 sim, TCP/pty servers.

Loaded as a plugin from tests/conftest.py. Every server is stopped at teardown and every
network fixture uses short timeouts so a broken transport fails fast instead of hanging.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from labdaq.sims.clock import ManualClock
from labdaq.sims.keithley2450 import Keithley2450Sim
from labdaq.sims.server import PtySimServer, SimServer, TcpSimServer

SIM_TIMEOUT_S = 0.5  # transport timeout for tests against local simulators


@pytest.fixture
def manual_clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def k2450_sim(manual_clock: ManualClock) -> Keithley2450Sim:
    """A 2450 with the built-in ideal cell on a manual clock (time moves only on demand)."""
    return Keithley2450Sim(clock=manual_clock)


@pytest.fixture
def k2450_tcp(k2450_sim: Keithley2450Sim) -> Iterator[TcpSimServer]:
    server = SimServer.tcp(k2450_sim)
    with server:
        yield server


@pytest.fixture
def k2450_pty(k2450_sim: Keithley2450Sim) -> Iterator[PtySimServer]:
    server = SimServer.pty(k2450_sim)
    with server:
        yield server
