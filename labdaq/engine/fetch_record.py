"""Recording a buffered group's fetches: the one job of :func:`record_fetches`.

Comparing two ways of processing buffered readings (the per-reading path against the
vectorised block pass, block_pass.py) is only fair on identical input: one group fetches
from its instrument and keeps every block it got, and the other group is handed those
blocks in the same order instead of fetching. Used by tests/test_buffered_block.py and
benchmarks/buffered_block_cpu.py.
"""

from __future__ import annotations

from typing import Any

from labdaq.engine.group_buffered import GroupBuffered


def record_fetches(group: GroupBuffered) -> list[Any]:
    """Wrap ``group``'s fetch so that every block it returns (as the driver returned it)
    is also appended to the list returned here, in fetch order."""
    blocks: list[Any] = []
    fetch = group._fetch

    async def record(start: int, chans: list[int]) -> Any:
        got = await fetch(start, chans)
        blocks.append(got)
        return got

    group._fetch = record  # type: ignore[method-assign]
    return blocks
