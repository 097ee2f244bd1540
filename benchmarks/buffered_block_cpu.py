"""Engine CPU per 64-channel reading in buffered mode: the per-reading path against the
vectorised block pass (labdaq/engine/block_pass.py), on the same recorded blocks.

One job: one simulated 64-channel cabinet over TCP on a manual clock (the rig of
tests/test_buffered_acquisition.py), every channel cycling with its set point changing
every 10 s (staggered), blocks recorded once and replayed into a fresh group per path, the
group's ``_block`` timed with ``time.thread_time`` (the engine thread's CPU only: the
simulator's server thread is not counted), and its split between the pass, the
per-reading ``_reading`` and the hand-off (``_put_pending``, rows encoded as for the writer
process). Two rounds of each path, alternated, so a busy machine weighs on both alike.

Run from the repository root: ``python benchmarks/buffered_block_cpu.py [--seconds S]
[--fetch-s F] [--quick]`` (defaults 10 s of cabinet time and 0.05 s; ``--quick`` 3 s). The
last line of stdout is one JSON object (benchmarks/_common.py): value = the block pass's
engine CPU per reading (labdaq as built), baseline = the per-reading path, medians of the
two rounds of each; lower is better. The split of each round goes to stderr.
"""
import argparse
import asyncio
import os
import statistics
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import result  # noqa: E402

import labdaq.engine.group_buffered as gb  # noqa: E402
from labdaq.drivers.cabinet import CyclerCabinet  # noqa: E402
from labdaq.drivers.transport import open_transport  # noqa: E402
from labdaq.engine.fetch_record import record_fetches  # noqa: E402
from labdaq.engine.sample_batch import SampleBatch, encode  # noqa: E402
from labdaq.sims.cabinet import CabinetSim  # noqa: E402
from labdaq.sims.clock import ManualClock  # noqa: E402
from labdaq.sims.server import SimServer  # noqa: E402
from tests.test_buffered_acquisition import Rig  # noqa: E402

CH = 64
SECONDS = 10.0
FETCH = 0.05


async def rig(stack: AsyncExitStack) -> Rig:
    clock = ManualClock(50.0)
    sim = CabinetSim(CH, "nmc811", clock=clock, seed=4)
    server = stack.enter_context(SimServer.tcp(sim))
    cab = await asyncio.to_thread(
        lambda: CyclerCabinet(open_transport(server.resource, timeout_s=5.0), "cab",
                              acquisition="buffered", buffer_points=2000,
                              fetch_period_s=FETCH))
    stack.callback(cab.close)
    r = Rig(sim, clock, cab)
    r.group.writer = r.sink = _EncodeSink()  # type: ignore[assignment]
    return r


class _EncodeSink:
    """What the writer process's put costs the engine: the batch's binary form."""

    def __init__(self) -> None:
        self.n = 0
        self.steps = 0
        self.bytes = 0

    async def put(self, rows: Any, ledger: Any = None) -> None:
        if isinstance(rows, SampleBatch):
            self.n += len(rows)
            self.bytes += len(encode(rows, ledger))
        if ledger is not None:
            self.steps += len(ledger.steps)


def doc(k: int) -> dict[str, Any]:
    # Every channel cycles (a set point change every 10 s), the changes staggered.
    first = round(0.05 + 10.0 * k / CH, 3)
    return {"schema_version": 1, "name": f"c{k}", "steps": [
        {"step": "cc", "current_a": 1.0, "until": {"duration_s": first}},
        {"step": "loop", "count": 1000, "body": [
            {"step": "cc", "current_a": -1.0, "until": {"duration_s": 10.0}},
            {"step": "cc", "current_a": 1.0, "until": {"duration_s": 10.0}}]}]}


async def scenario(r: Rig) -> float:
    for k in range(CH):
        await r.join(k + 1, doc(k), run_id=k + 1)
    await r.group._start_logging()
    cpu = 0.0
    for _ in range(int(SECONDS / FETCH)):
        r.clock.advance(FETCH)
        c0 = time.thread_time()
        await r.group._block()
        cpu += time.thread_time() - c0
    return cpu


async def measure() -> dict[bool, list[float]]:
    """Engine CPU seconds per reading of each round, by ``block_pass``."""
    per_reading: dict[bool, list[float]] = {False: [], True: []}
    async with AsyncExitStack() as stack:
        src = await rig(stack)
        src.group.block_pass = False
        blocks = record_fetches(src.group)
        await scenario(src)
        for flag in (False, True, False, True):
            r = await rig(stack)
            r.group.block_pass = flag
            it = iter(blocks)

            async def replay(start: int, chans: list[int], it: Any = it) -> Any:
                return next(it)

            r.group._fetch = replay  # type: ignore[method-assign]
            spent = {"quiet_pass": 0.0, "_reading": 0.0, "_put_pending": 0.0}
            calls = {"quiet_pass": 0, "_reading": 0, "_put_pending": 0}
            qp = gb.quiet_pass

            def timed_qp(*a: Any, qp: Any = qp, spent: dict[str, float] = spent,
                         calls: dict[str, int] = calls) -> Any:
                c0 = time.thread_time()
                try:
                    return qp(*a)
                finally:
                    spent["quiet_pass"] += time.thread_time() - c0
                    calls["quiet_pass"] += 1
            gb.quiet_pass = timed_qp  # type: ignore[assignment]
            for name in ("_reading", "_put_pending"):
                fn = getattr(r.group, name)

                async def timed(*a: Any, fn: Any = fn, name: str = name,
                                spent: dict[str, float] = spent,
                                calls: dict[str, int] = calls) -> Any:
                    c0 = time.thread_time()
                    try:
                        return await fn(*a)
                    finally:
                        spent[name] += time.thread_time() - c0
                        calls[name] += 1
                setattr(r.group, name, timed)
            cpu = await scenario(r)
            gb.quiet_pass = qp
            print({k: f"{v * 1e3:.0f} ms in {calls[k]} calls" for k, v in spent.items()},
                  file=sys.stderr)
            readings = r.group.ticks
            sink = r.group.writer
            assert isinstance(sink, _EncodeSink)
            print(f"block_pass={flag}: {readings} readings of {CH} ch, fetch {FETCH * 1e3:g} ms:"
                  f" engine CPU {cpu * 1e3:.0f} ms = {cpu / readings * 1e6:.0f} us/reading, "
                  f"{sink.n} rows, {sink.steps} steps", file=sys.stderr)
            per_reading[flag].append(cpu / readings)
    return per_reading


def main() -> None:
    global SECONDS, FETCH
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=SECONDS, help="cabinet time per round")
    ap.add_argument("--fetch-s", type=float, default=FETCH, help="engine fetch period")
    ap.add_argument("--quick", action="store_true", help="3 s of cabinet time per round")
    args = ap.parse_args()
    SECONDS, FETCH = (3.0 if args.quick else args.seconds), args.fetch_s
    per_reading = asyncio.run(measure())
    block, single = (statistics.median(per_reading[k]) * 1e6 for k in (True, False))
    result("buffered_block_cpu", block, "us engine CPU per 64-ch reading", single,
           seconds=SECONDS, fetch_s=FETCH, load_avg=round(os.getloadavg()[0], 1),
           note=(f"buffered mode, one 64-channel cabinet over TCP on a manual clock, every "
                 f"channel cycling; value = the vectorised block pass (labdaq as built), "
                 f"baseline = the per-reading path on the same recorded blocks, medians of 2 "
                 f"alternated rounds of {SECONDS:g} s each; lower is better"))


if __name__ == "__main__":
    main()
