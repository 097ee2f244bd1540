"""What the audit chain costs: the time of a commit holding one audit event against one
holding a plain event (the difference is the chain append and the head file), the same
without the head file, and `verify`'s rate. Not part of `make bench` (run it by hand:
`python benchmarks/audit_chain.py [COMMITS] [DATABASE_URL]`).

Variants alternate in rounds so machine noise hits them alike; medians over rounds.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from typing import Any

import labdaq.audit as audit
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker, upgrade

ROUNDS = 3


async def _commits(engine: Any, kind: str, n: int) -> float:
    maker = sessionmaker(engine)
    t = time.perf_counter()
    for i in range(n):
        async with session_scope(maker) as s:
            s.add(m.Event(kind=kind, message=f"change {i}", actor="bench",
                          data={"before": {"i": i}, "after": {"i": i + 1}}))
    return (time.perf_counter() - t) / n


async def main(url: str, n: int) -> None:
    engine = create_engine(url)
    write_head_file = audit.write_head_file
    times: dict[str, list[float]] = {"plain": [], "audit": [], "audit, no head file": []}
    try:
        for _ in range(ROUNDS):
            times["plain"].append(await _commits(engine, "note", n))
            times["audit"].append(await _commits(engine, "audit", n))
            audit.write_head_file = lambda *a, **k: None  # type: ignore[assignment]
            try:
                times["audit, no head file"].append(await _commits(engine, "audit", n))
            finally:
                audit.write_head_file = write_head_file
        for name, ts in times.items():
            print(f"per commit, {name}: {statistics.median(ts) * 1e3:.2f} ms")
        async with engine.connect() as conn:
            t = time.perf_counter()
            result = await audit.verify(conn)
            dt = time.perf_counter() - t
        print(f"verify: {result.records} records in {dt:.3f} s "
              f"({result.records / dt:,.0f} records/s), ok={result.ok}")
    finally:
        await engine.dispose()


if __name__ == "__main__":
    commits = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    db = sys.argv[2] if len(sys.argv) > 2 else f"sqlite:///{tempfile.mkdtemp()}/labdaq.db"
    upgrade(db)
    asyncio.run(main(db, commits))
