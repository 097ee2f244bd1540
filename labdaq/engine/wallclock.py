"""Steps of the wall clock, so a gap measured in wall seconds is not a clock jump.

A run interrupted by an engine restart resumes only within ``max_resume_gap_s`` wall
seconds, measured from its last committed sample's ``ts_utc`` (recovery.py): the wall
clock is what survives the process, and a power cut. But the wall clock can be stepped
(an NTP correction, someone setting the date): a step of an hour while the engine was
down would read as an hour's gap, and end a run that was away for seconds, or read as a
negative gap and move the run's time backwards. ``CLOCK_BOOTTIME`` never steps, and is
shared by every process of one boot; so each committed position carries a snapshot of
the wall clock's offset from it (``snapshot``, taken with the batch the position is
committed in), and a resume in the same boot subtracts how far the wall clock stepped
since (``step_since``). After a reboot only the wall clock is left, and its reading is
taken as it is.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
KEY = "wall_clock"  # the snapshot's key in a run's position
# Smaller differences are NTP slewing the rate (at most 500 ppm) and the reading's own
# jitter, not a step: the wall clock is taken as it is.
STEP_MIN_S = 1.0


def _boot_id() -> str | None:
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return None  # not Linux: no boot clock to compare against


BOOT_ID = _boot_id()


def _offset_s() -> float:
    """Wall clock minus boot clock now, seconds."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def snapshot() -> dict[str, Any] | None:
    """The wall clock's offset from this boot's clock, to commit with a position."""
    if BOOT_ID is None:
        return None
    return {"boot_id": BOOT_ID, "offset_s": _offset_s()}


def step_since(snap: Any) -> float:
    """Seconds the wall clock stepped (forward positive) since ``snap`` was taken, when it
    was taken in this boot and the step is at least ``STEP_MIN_S``; 0.0 otherwise."""
    if not isinstance(snap, dict) or BOOT_ID is None or snap.get("boot_id") != BOOT_ID:
        return 0.0
    try:
        step_s = _offset_s() - float(snap["offset_s"])
    except (KeyError, TypeError, ValueError):
        return 0.0
    return step_s if abs(step_s) >= STEP_MIN_S else 0.0
