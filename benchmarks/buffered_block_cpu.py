"""Engine CPU per 64-channel reading in buffered mode: the per-reading path against the
vectorised block pass (labdaq/engine/block_pass.py), on the same recorded blocks.

One job: one simulated 64-channel cabinet over TCP on a manual clock (the rig of
tests/test_buffered_acquisition.py), every channel cycling with its set point changing
every 10 s (staggered), blocks recorded once and replayed into a fresh group per path, the
group's ``_block`` timed with ``time.thread_time`` (the engine thread's CPU only: the
simulator's server thread is not counted), and its split between the pass, the
per-reading ``_reading`` and the hand-off (``_put_pending``, rows encoded as for the writer
process). Two rounds of each path, alternated, so a busy machine weighs on both alike.

Run from the repository root: ``python benchmarks/buffered_block_cpu.py [seconds] [fetch_s]``
(defaults 10 and 0.05).
"""
import asyncio
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

sys.path.insert(0, ".")
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
SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
FETCH = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05


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


async def main() -> None:
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
            print({k: f"{v * 1e3:.0f} ms in {calls[k]} calls" for k, v in spent.items()})
            readings = r.group.ticks
            sink = r.group.writer
            assert isinstance(sink, _EncodeSink)
            print(f"block_pass={flag}: {readings} readings of {CH} ch, fetch {FETCH * 1e3:g} ms:"
                  f" engine CPU {cpu * 1e3:.0f} ms = {cpu / readings * 1e6:.0f} us/reading, "
                  f"{sink.n} rows, {sink.steps} steps")


asyncio.run(main())
