"""The sample writer process at an acquisition's pace: its CPU per row, by thread.

One job: feed a :class:`~labdaq.engine.writer_process.WriterProcess` what buffered
acquisition hands it at 100 Hz (``--cabinets`` x 64 runs; every 50 ms one SampleBatch of
5 readings per cabinet with its ledger's fast state, each run's full position once at the
start), paced in real time, into a fresh migrated SQLite database; then print the writer
process's CPU per stored row, its share of a core, how it split between its threads
(largest first: aiosqlite's thread, the event loop, the pipe thread, in the runs of
docs/performance.md) and the rows still unsettled at
the end (a writer that keeps up ends with about one commit interval's rows). Nothing
else runs, so this is the writer's own cost, not what it gets on a busy machine.

By hand (``run_all`` skips it; docs/performance.md cites it)::

    python benchmarks/writer_pace.py [--cabinets 16] [--seconds 25]
        [--commit-interval 0.25] [--no-ledger]
    PYTHONPATH=<another tree> python benchmarks/writer_pace.py --commit-interval 0

The last line of stdout is one JSON object (benchmarks/_common.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import result  # noqa: E402
from ingest import fetch_batch, prepare_runs  # noqa: E402

from labdaq.engine.ledger import FAST_COLUMNS, Ledger  # noqa: E402
from labdaq.engine.writer_process import WriterProcess  # noqa: E402
from labdaq.storage.db import upgrade  # noqa: E402

READINGS = 5  # per fetch: 50 ms at 100 Hz
FETCH_S = 0.05
WARM_S = 5.0


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid``, by thread id (Python does not name its
    threads for the OS)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = task.name
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a thread that ended meanwhile
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def position() -> dict[str, Any]:
    cycle = {k: 0.0 for k in ("start_t_s", "end_t_s", "charge_ah", "discharge_ah",
                              "charge_wh", "discharge_wh", "charge_v_s", "charge_s",
                              "discharge_v_s", "discharge_s")}
    return {"pc": 0, "loop_iters": {"0": 1}, "loop_dis_ah": {"0": 0.0},
            "loop_first_dis_ah": {}, "cycle": {"cycle_index": 0, "gaps": 0, **cycle},
            "step_number": 1, "step_t0_s": 0.0, "step_started_t_s": 0.0,
            "phase_t0_s": 0.0, "phase_name": "cccv.cc", "pulse_i": 0, "seq": 0, "t_s": 0.0,
            "step_cap_ah": 0.0, "step_en_wh": 0.0, "step_dis_ah": 0.0}


def fast_state(runs: np.ndarray, f: int) -> np.ndarray:
    """The ledger's fast state after fetch ``f``: each run's newest seq and t_s."""
    fast = np.zeros((len(runs), len(FAST_COLUMNS)))
    fast[:, 0], fast[:, 1], fast[:, 2] = runs, (f + 1) * READINGS, ((f + 1) * READINGS - 1) * 0.01
    return fast


async def paced(url: str, run_ids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    # Without the option when it is 0, so a tree from before it was added runs this too
    # (PYTHONPATH=<that tree>): the same load on both.
    spacing = {"commit_interval_s": args.commit_interval} if args.commit_interval else {}
    writer = WriterProcess(url, journal_dir=None, **spacing)
    writer.start()
    pid = writer._proc.pid
    cabinets = [np.asarray(run_ids[i:i + 64], np.int64) for i in range(0, len(run_ids), 64)]
    t0 = time.monotonic()
    f = sent = sent0 = 0
    cpu0: dict[str, float] | None = None
    tc = 0.0
    while (now := time.monotonic() - t0) < args.seconds:
        if f * FETCH_S > now:
            await asyncio.sleep(f * FETCH_S - now)
            continue
        for runs in cabinets:
            batch = fetch_batch(runs, f, READINGS)
            ledger = None
            if not args.no_ledger:
                ledger = Ledger(fast=[fast_state(runs, f)])
                if f == 0:
                    ledger.positions = [
                        {"run_id": int(r), "step_index": 0, "step_count": 2, "cycle_index": 0,
                         "position": position()} for r in runs]
            await writer.put(batch, ledger)
            sent += len(batch)
        f += 1
        if cpu0 is None and now > WARM_S:
            cpu0, tc, sent0 = thread_cpu_s(pid), time.monotonic(), sent
    assert cpu0 is not None, "--seconds must be longer than the warm-up"
    cpu1, t1 = thread_cpu_s(pid), time.monotonic()
    unsettled = writer.pending_rows
    await writer.close()
    spent = {k: cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in cpu1}
    total = sum(spent.values())
    rows = sent - sent0
    return {"rows": rows, "us_per_row": 1e6 * total / rows, "core_pct": 100 * total / (t1 - tc),
            "threads_pct": sorted((round(100 * v / (t1 - tc), 1) for v in spent.values() if v),
                                  reverse=True),
            "unsettled_at_end": unsettled, "rate_per_s": rows / (t1 - tc)}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--cabinets", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=25.0)
    ap.add_argument("--commit-interval", type=float, default=0.25)
    ap.add_argument("--no-ledger", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        url = f"sqlite:///{d}/pace.db"
        upgrade(url)
        run_ids = asyncio.run(prepare_runs(url, 64 * args.cabinets, state="running"))
        got = asyncio.run(paced(url, run_ids, args))
    print(f"writer at {got['rate_per_s']:,.0f} rows/s: {got['us_per_row']:.2f} us of CPU per "
          f"row, {got['core_pct']:.0f} % of a core {got['threads_pct']}; "
          f"{got['unsettled_at_end']:,} rows unsettled at the end", file=sys.stderr)
    result("writer_process_cpu_per_row", got["us_per_row"], "us/row", None,
           cabinets=args.cabinets, commit_interval_s=args.commit_interval,
           ledger=not args.no_ledger, **got)


if __name__ == "__main__":
    main()
