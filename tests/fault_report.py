"""The fault campaign's record: each fault scenario test appends what it measured.

`make faults` runs the tests marked ``faults`` with ``LABDAQ_FAULT_REPORT`` naming a JSON
lines file; each scenario appends one line here (outside ``make faults`` nothing is
written), and ``tests/fault_table.py`` prints the table and puts it in the README. The
figures are counted by the test from the database, before it asserts on them, so a
scenario that loses a sample still leaves its line and then fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPORT_ENV = "LABDAQ_FAULT_REPORT"


def record_fault(
    scenario: str,
    *,
    faults: int,
    lost: int,
    duplicates: int,
    runs_resumed: int,
    runs: int,
    missed_periods: int | None = None,
    rss_growth_mb: float | None = None,
    recover_s: list[float] | None = None,
) -> None:
    """Append one scenario's figures (``recover_s``: seconds from each fault until every
    run took samples again, as the test saw it on this machine)."""
    target = os.environ.get(REPORT_ENV)
    if not target:
        return
    line = {
        "scenario": scenario,
        "faults": faults,
        "lost": lost,
        "duplicates": duplicates,
        "runs_resumed": runs_resumed,
        "runs": runs,
        "missed_periods": missed_periods,
        "rss_growth_mb": rss_growth_mb,
        "recover_max_s": max(recover_s) if recover_s else None,
    }
    with Path(target).open("a") as out:
        out.write(json.dumps(line) + "\n")


def lost_and_duplicates(seqs: list[int], committed_before: list[int]) -> tuple[int, int]:
    """(committed samples missing from the final rows, duplicated seq numbers)."""
    final = set(seqs)
    lost = sum(1 for s in committed_before if s not in final)
    return lost, len(seqs) - len(final)
