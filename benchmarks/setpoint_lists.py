"""Set points of a cabinet's channels whose phases end on the same tick: one by one vs in lists.

One job: measure how long the engine's ``Outputs`` takes to program N channels of a
64-channel cabinet simulator over TCP for their next phase (a 1C charge: lower clamp, CC
with its compliance, output on, each followed by the error-queue check), channel by
channel (``Outputs.apply`` per channel, as before) and as the engine does it now
(``Outputs.apply_many``: the channels with the same set points in one command per
quantity). Same run, rounds alternating. The simulator runs in its own process.

    python benchmarks/setpoint_lists.py [--channels 64] [--rounds 5]

The last line of stdout is one JSON object (benchmarks/_common.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import result  # noqa: E402
from cabinet_query import serve  # noqa: E402

from labdaq.drivers.cabinet import CyclerCabinet  # noqa: E402
from labdaq.drivers.opener import open_instrument  # noqa: E402
from labdaq.engine.channel import Phase  # noqa: E402
from labdaq.engine.setpoints import Outputs  # noqa: E402


async def _call(fn: Any, *args: Any) -> Any:
    return fn(*args)


async def _time(out: Outputs, chans: list[int], phase: Phase, lists: bool) -> float:
    t0 = time.perf_counter()
    if lists:
        await out.apply_many([(ch, phase) for ch in chans])
    else:
        for ch in chans:
            await out.apply(ch, phase)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=64, help="channels ending together")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="3 rounds")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(64, 1.0)
        return
    if args.quick:
        args.rounds = 3
    proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().split()[1])
        cab = open_instrument(f"TCPIP::127.0.0.1::{port}::SOCKET", timeout_s=5.0)
        assert isinstance(cab, CyclerCabinet)
        out = Outputs("cab", cab, _call)
        chans = list(range(1, args.channels + 1))
        charge = Phase("cc", current_a=2.0, voltage_v=4.2)
        one: list[float] = []
        many: list[float] = []

        async def rounds() -> None:
            for r in range(args.rounds):
                for lists in ((False, True) if r % 2 == 0 else (True, False)):
                    s = await _time(out, chans, charge, lists)
                    (many if lists else one).append(s)
                    print(f"round {r + 1} {'lists' if lists else 'one by one'}: "
                          f"{s * 1e3:.1f} ms", file=sys.stderr)

        asyncio.run(rounds())
        cab.close()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
    old, new = statistics.median(one), statistics.median(many)
    load = os.getloadavg()[0]
    print(f"{args.channels} channels to their next phase (median of {args.rounds}): one by "
          f"one {old * 1e3:.1f} ms, in lists {new * 1e3:.1f} ms; load average {load:.1f}",
          file=sys.stderr)
    result("setpoint_lists_ms", new * 1e3, "ms", old * 1e3, channels=args.channels,
           load_avg=round(load, 1),
           note=("set points of a cabinet's channels ending on the same tick, over TCP to "
                 "its simulator; value = Outputs.apply_many (labdaq as built, one command "
                 "per quantity for channels alike), baseline = one channel at a time; "
                 "lower is better"))


if __name__ == "__main__":
    main()
