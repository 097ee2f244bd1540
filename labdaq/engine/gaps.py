"""Missed sample periods: which storage times a run's loop skipped, and their record.

A run stores one sample per ``sample_period_s`` on its grid of storage times; a tick
serves the storage time nearest to it (group.py). When the instrument answered late, the
loop fell behind or the run was away (instrument lost, engine restarted), the tick that
finally comes is nearest to a later storage time, and every one before it went by
without a sample: those are *missed periods*, and by the design map each is a lost
sample. The group finds them with one numpy comparison per tick (in place of the one
that re-anchored a late run's storage times; the rare late ticks then pay a few more
operations here), and each gap — the missed periods between two stored samples,
so contiguous misses are one gap — becomes one record that travels with the first sample
after it through the sample sink (ledger.py): an event of kind ``missed_periods`` (count,
``t_from_s``/``t_to_s`` the first and last missed storage times) and the run's new
``runs.missed_periods`` total, committed in the same transaction as that sample, so a
kill -9 can neither lose nor duplicate it. That sample carries ``SampleFlag.GAP``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from labdaq.storage.models import SampleFlag

FLAG_GAP = int(SampleFlag.GAP)
EVENT_KIND = "missed_periods"


def missed(reach_t_s: Any, due_t_s: NDArray[np.float64], period_s: NDArray[np.float64],
           skipped: NDArray[np.bool_]) -> NDArray[np.int64]:
    """Storage times each run missed at a tick that reaches ``reach_t_s`` (its scheduled
    time plus half a tick: it serves the storage times before that). ``due_t_s`` is each
    run's first storage time due; ``skipped`` marks the runs with a later one due too
    (``due + period < reach``: the group's one comparison per tick, only those runs missed
    any). The tick serves the last storage time due, the ones before it were missed."""
    n = np.ceil((reach_t_s - due_t_s) / period_s).astype(np.int64) - 1
    return np.where(skipped, np.maximum(n, 1), 0)


def outage_missed(from_t_s: float, to_t_s: float, period_s: float) -> int:
    """Periods missed between a run's last stored sample (``from_t_s``) and its first
    after an outage (``to_t_s``): the storage times strictly between the two."""
    return max(0, int(round((to_t_s - from_t_s) / period_s)) - 1)


def gap_record(run_id: int, seq: int, count: int, t_from_s: float, period_s: float,
               ts_utc: float, total: int, cause: str) -> dict[str, Any]:
    """One gap for the ledger (ledger.Ledger.gaps): ``count`` storage times from
    ``t_from_s`` missed before sample ``seq``; ``total`` is the run's count after it."""
    return {
        "run_id": int(run_id),
        "seq": int(seq),
        "count": int(count),
        "t_from_s": float(t_from_s),
        "t_to_s": float(t_from_s + (count - 1) * period_s),
        "period_s": float(period_s),
        "ts_utc": float(ts_utc),
        "total": int(total),
        "cause": cause,
    }
