"""CPU per row of a tree's own ingest benchmark: what its writer costs, whatever the load.

Usage (the tree's python, ``PYTHONPATH=TREE``; ``before_after.py`` runs it)::

    python benchmarks/_ingest_cpu.py TREE sqlite|pg [--rows N]

One job: run TREE's ``benchmarks/ingest.py`` (SQLite) or ``ingest_pg.py`` (PostgreSQL)
once, as they are, and add up the CPU time this process spends in each side, labdaq's
SampleWriter and the raw baseline (``resource.getrusage``: every thread, so aiosqlite's
included; the PostgreSQL server's work is not). On a shared machine a wall-clock rate
says how much of a core the process was given; CPU per row says what the code costs.
Prints one JSON line (benchmarks/_common.py).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import result  # noqa: E402


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def counting(fn: Callable[..., Any], spent: list[float]) -> Callable[..., Any]:
    """``fn`` (sync or async) with the CPU seconds of every call added to ``spent``."""
    if asyncio.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def timed_async(*args: Any) -> Any:
            c0 = cpu_s()
            try:
                return await fn(*args)
            finally:
                spent.append(cpu_s() - c0)
        return timed_async

    @functools.wraps(fn)
    def timed(*args: Any) -> Any:
        c0 = cpu_s()
        try:
            return fn(*args)
        finally:
            spent.append(cpu_s() - c0)
    return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("tree", type=Path)
    ap.add_argument("backend", choices=["sqlite", "pg"])
    ap.add_argument("--rows", type=int, default=200_000)
    args = ap.parse_args()
    # The tree's own benchmark modules (their module globals are what main() calls).
    sys.path.insert(0, str(args.tree.resolve() / "benchmarks"))
    stem = "ingest" if args.backend == "sqlite" else "ingest_pg"
    mod: Any = importlib.import_module(stem)
    ours: list[float] = []
    raw: list[float] = []
    mod.labdaq_ingest = counting(mod.labdaq_ingest, ours)
    mod.raw_ingest = counting(mod.raw_ingest, raw)
    sys.argv = [stem, "--rows", str(args.rows), "--repeats", "1"]
    mod.main()  # prints the benchmark's own JSON line first
    if not ours or not raw:
        result(f"{args.backend}_ingest_cpu", 0.0, "error", None, note="nothing measured")
        return
    ours_us, raw_us = 1e6 * sum(ours) / args.rows, 1e6 * sum(raw) / args.rows
    result(f"{args.backend}_ingest_cpu", ours_us, "CPU us/row", raw_us,
           note=f"{args.rows} rows; this process's CPU, labdaq's writer vs the raw baseline")


if __name__ == "__main__":
    main()
