"""A simulated lab left as a technician leaves an idle one: every cycler's output off, safe.

One job: a 2450/2460 powers up with its output off in the NORM state, 0 V across its cell,
which drains it (sims/keithley2450.py, as the real instrument does). The engine makes
every cycler safe when it opens it (``AcquisitionNode.open_all``); a test that starts a lab
well before its engine does the same at once, so the wall time the rest of its start-up
takes on a loaded machine (at a simulated speed of 100 or more) cannot empty the cell
before the first run: at SPEED 100 a cell at 20 % read 0 V after 60 s of wall time.
"""

from __future__ import annotations

from typing import Any

from labdaq.drivers.opener import open_instrument
from labdaq.drivers.roles import Cycler


def make_idle_safe(desc: dict[str, Any]) -> None:
    """``safe_shutdown`` on every cycler of a simulated lab's description."""
    for inst_desc in desc["instruments"]:
        inst = open_instrument(inst_desc["resource"])
        try:
            if isinstance(inst, Cycler):
                inst.safe_shutdown()
        finally:
            inst.close()
