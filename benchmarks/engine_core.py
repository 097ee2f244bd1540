"""Engine core: how many channel-samples per second InstrumentGroup's per-tick work handles.

One job: measure labdaq.engine.group on its own — safety check, integration, end
conditions, row building and the SampleWriter into SQLite — with the instrument replaced by
an in-memory cabinet that parses a real ``MEAS:ALL?`` reply (the same numpy parse as the
cabinet driver) and no sockets, no simulators, no API. benchmarks/acquisition_scale.py
measures the whole path through real sockets; this one says how much of it the engine's
own Python costs, so a regression in group.py shows here first.

* core: K cabinet groups × 64 channels, every channel running a constant-current step,
  sample period = control period, ticked back to back (round robin) for the duration;
  rows handed to a counting sink. Reported as channel-samples/s and µs per 64-channel
  tick.
* stored: the same with the real SampleWriter into an SQLite file; rows counted in the
  database afterwards.
* baseline (bare): parse the same reply, build the same 12-column rows with
  ``zip(*columns.tolist())`` and ``executemany`` them into SQLite in 10k batches — the
  minimum any engine storing one row per channel-sample must do (perf-anchors.md §2
  without the socket).

Last stdout line: one JSON object (benchmarks/_common.py); ``--quick`` runs in a few
seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import result  # noqa: E402

from labdaq.drivers.roles import Cycler  # noqa: E402

CHANNELS = 64


def _reply(rng: np.random.Generator) -> str:
    """A MEAS:ALL? reply for 64 channels (V, I, T, mode, status), as the cabinet formats it."""
    v = 3.6 + 0.1 * rng.random(CHANNELS)
    i = np.full(CHANNELS, -1.0)
    t = 25 + rng.random(CHANNELS)
    rows = [f"{a:+.8E},{b:+.8E},{c:+.8E},1,3" for a, b, c in zip(v, i, t, strict=True)]
    return ",".join(rows)


class MemoryCabinet(Cycler):
    """Stands in for labdaq.drivers.cabinet.CyclerCabinet: same measure() parse, no I/O."""

    channel_total = CHANNELS
    switches_channel_lists = True

    def configure_protection(self, channel: int, voltage_max_v: float,
                             current_max_a: float) -> None:
        pass

    def all_off(self) -> None:
        pass

    def safe_shutdown(self) -> None:
        pass

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self._replies = [_reply(rng) for _ in range(16)]
        self._k = 0
        self.channels = list(range(1, CHANNELS + 1))

    def measure(self, channels: Sequence[int] | None = None) -> np.ndarray:
        channels = self.channels if channels is None else channels
        self._k = (self._k + 1) % len(self._replies)
        table = np.array(self._replies[self._k].split(","), dtype=float).reshape(CHANNELS, 5)
        return table[[c - 1 for c in channels], :3]

    def output(self, channel: Any, on: bool) -> None:
        pass

    def set_current(self, channel: int, current_a: float, voltage_limit_v: float) -> None:
        pass

    def set_voltage(self, channel: int, voltage_v: float, current_limit_a: float) -> None:
        pass


class CountingSink:
    def __init__(self) -> None:
        self.rows = 0

    async def put(self, rows: list[Any], ledger: Any = None) -> None:
        self.rows += len(rows)

    async def flush(self) -> None:
        pass


async def _noop(*_: Any) -> None:
    return None


async def _call(fn: Any, *args: Any) -> Any:
    return fn(*args)


async def engine_run(cabinets: int, duration_s: float, db: Path | None,
                     writer_process: bool = False) -> dict[str, float]:
    from labdaq.engine.channel import ChannelRun
    from labdaq.engine.clock import EngineClock
    from labdaq.engine.group import InstrumentGroup
    from labdaq.engine.writer import SampleWriter
    from labdaq.protocol import CellLimits, InstrumentLimits, parse_protocol, resolve
    from labdaq.storage import models as m
    from labdaq.storage.db import create_engine, session_scope, sessionmaker

    doc = {
        "schema_version": 1,
        "name": "bench",
        "steps": [{"step": "cc", "current_a": -1.0, "until": {"duration_s": 3e7}}],
    }
    plan = resolve(
        parse_protocol(doc),
        CellLimits(capacity_ah=5.0, charge_cutoff_v=4.2, discharge_cutoff_v=2.5,
                   max_charge_current_a=5.0, max_discharge_current_a=5.0),
        InstrumentLimits(max_current_a=10.0),
    )
    # The clock runs so fast that every tick is a due sample (one row per channel-tick).
    clock = EngineClock(1e6)
    engine = None
    writer: Any = CountingSink()
    if db is not None:
        from labdaq.storage.db import upgrade

        url = f"sqlite:///{db}"
        await asyncio.to_thread(upgrade, url)
        engine = create_engine(url)
        async with session_scope(sessionmaker(engine)) as s:
            inst = m.Instrument(name="bench", driver="cabinet", resource="mem", options={})
            s.add(inst)
            await s.flush()
            for c in range(cabinets * CHANNELS):
                s.add(m.Channel(instrument_id=inst.id, index=c + 1, name=f"ch{c}"))
            s.add(m.Cell(serial="bench", chemistry="x", capacity_ah=5.0, charge_cutoff_v=4.2,
                         discharge_cutoff_v=2.5))
            proto = m.Protocol(name="bench", content_hash="bench", document=doc)
            s.add(proto)
            await s.flush()
            for c in range(cabinets * CHANNELS):
                s.add(m.Run(id=c + 1, channel_id=c + 1, cell_id=1, protocol_id=proto.id,
                            state="running", plan={}, sample_period_s=1.0))
        if writer_process:
            from labdaq.engine.writer_process import WriterProcess

            writer = WriterProcess(url, batch_rows=10_000, batch_age_s=0.2)
            writer.start()
            await writer.flush()  # the child is up before the clock starts
        else:
            writer = SampleWriter(engine, batch_rows=10_000, batch_age_s=0.2)
            writer.start()
    cb = _noop
    groups = []
    run_id = 0
    for k in range(cabinets):
        g = InstrumentGroup(f"cab{k}", MemoryCabinet(k), _call, clock, writer, cb, 1.0)
        for ch in range(1, CHANNELS + 1):
            run_id += 1
            cr = ChannelRun(run_id, ch, plan, 1.0)
            tr = cr.start(0.0)
            assert tr.next_phase is not None
            await g.add(cr, tr.next_phase, clock.now())
        g._closing = True  # ticked by hand below, not by its own loop
        groups.append(g)
    await asyncio.sleep(0)
    rows0 = writer.rows if isinstance(writer, CountingSink) else 0
    ticks = 0
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    while time.perf_counter() - t0 < duration_s:
        for g in groups:
            await g._tick()
            ticks += 1
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    out = {"ticks": ticks, "elapsed_s": elapsed, "cpu_s": cpu}
    if isinstance(writer, CountingSink):
        out["rows_per_s"] = (writer.rows - rows0) / elapsed
    else:
        await writer.close()
        assert engine is not None
        await engine.dispose()
        with sqlite3.connect(db) as conn:  # type: ignore[arg-type]
            stored = conn.execute("SELECT count(*) FROM samples").fetchone()[0]
        # Rows stored minus the first sample of each run (taken when it joined).
        stored -= cabinets * CHANNELS
        out["rows_per_s"] = stored / (time.perf_counter() - t0)
    out["tick_us"] = 1e6 * elapsed / max(ticks, 1)
    return out


def bare_run(cabinets: int, duration_s: float, db: Path) -> dict[str, float]:
    """Parse, build rows, executemany in 10k batches: the floor of the same work."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE s (run_id INTEGER, seq INTEGER, t_s REAL, ts_utc REAL, step_index "
        "INTEGER, cycle_index INTEGER, voltage_v REAL, current_a REAL, temperature_c REAL, "
        "step_capacity_ah REAL, step_energy_wh REAL, flags INTEGER, PRIMARY KEY (run_id, seq))"
    )
    cabs = [MemoryCabinet(k) for k in range(cabinets)]
    chans = list(range(1, CHANNELS + 1))
    run_ids = [np.arange(k * CHANNELS + 1, (k + 1) * CHANNELS + 1) for k in range(cabinets)]
    seq = [np.zeros(CHANNELS, np.int64) for _ in range(cabinets)]
    zeros = np.zeros(CHANNELS)
    batch: list[tuple[Any, ...]] = []
    stored = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < duration_s:
        for k, cab in enumerate(cabs):
            meas = cab.measure(chans)
            seq[k] += 1
            now = time.time()
            batch.extend(zip(run_ids[k].tolist(), seq[k].tolist(), zeros.tolist(),
                             [now] * CHANNELS, zeros.tolist(), zeros.tolist(),
                             meas[:, 0].tolist(), meas[:, 1].tolist(), meas[:, 2].tolist(),
                             zeros.tolist(), zeros.tolist(), [0] * CHANNELS, strict=True))
            if len(batch) >= 10_000:
                conn.executemany("INSERT INTO s VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", batch)
                conn.commit()
                stored += len(batch)
                batch = []
    elapsed = time.perf_counter() - t0
    conn.close()
    return {"rows_per_s": stored / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds")
    ap.add_argument("--cabinets", type=int, default=16)
    args = ap.parse_args()
    duration = 2.0 if args.quick else 3.0
    with tempfile.TemporaryDirectory(prefix="labdaq-engine-core-") as tmp:
        core = asyncio.run(engine_run(args.cabinets, duration, None))
        stored = asyncio.run(engine_run(args.cabinets, duration, Path(tmp) / "engine.db"))
        stored_wp = asyncio.run(engine_run(args.cabinets, duration, Path(tmp) / "engine_wp.db",
                                           writer_process=True))
        bare = bare_run(args.cabinets, duration, Path(tmp) / "bare.db")
        one = asyncio.run(engine_run(1, duration / 2, None))
    print(
        f"engine core, {args.cabinets} x {CHANNELS} ch: {core['rows_per_s']:,.0f} "
        f"channel-samples/s, {core['tick_us']:.0f} us per 64-channel tick; "
        f"with SampleWriter into SQLite {stored['rows_per_s']:,.0f}/s in-process, "
        f"{stored_wp['rows_per_s']:,.0f}/s in its own process (as built); "
        f"bare parse+rows+executemany {bare['rows_per_s']:,.0f}/s; "
        f"one cabinet {one['tick_us']:.0f} us per tick",
        file=sys.stderr,
    )
    result(
        "engine_core_channel_samples",
        stored_wp["rows_per_s"],
        "channel-samples/s",
        bare["rows_per_s"],
        core_only_per_s=round(core["rows_per_s"], 1),
        stored_writer_in_process_per_s=round(stored["rows_per_s"], 1),
        tick_us_64ch=round(core["tick_us"], 1),
        tick_us_64ch_one_cabinet=round(one["tick_us"], 1),
        cabinets=args.cabinets,
        channels=args.cabinets * CHANNELS,
        note=(
            "InstrumentGroup ticks with an in-memory 64-channel cabinet (real MEAS:ALL? "
            "parse, no sockets), every tick a stored sample; value = rows stored in SQLite "
            "per second through the writer process (labdaq as built); baseline = the same "
            "parse + rows + "
            "executemany(10k) without the engine. End to end through sockets: "
            "benchmarks/acquisition_scale.py."
        ),
    )


if __name__ == "__main__":
    main()
