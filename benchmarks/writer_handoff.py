"""Handing a tick's sample rows to the writer process: pickled row tuples vs one binary batch.

One job: measure what the engine's event loop pays per sample row to hand a 64-channel
tick (rows plus the ledger's fast state) to the writer process, by the old way (row
tuples built from the numpy columns, ``Connection.send`` of a pickled ``("put", rows,
ledger)``) and the new one (``sample_batch.encode`` of the columns, ``send_bytes``), in
the same run, rounds alternating so machine noise hits both alike.

The receiving end is a child process that decodes every message the way the writer
process does (``pickle.loads``; ``sample_batch.decode`` and ``SampleBatch.rows``), so
the pipe is drained at the writer's own pace; it reports its own CPU per row too.

Figures are rows per CPU second of the sending thread (``time.thread_time``: the
engine's loop thread; time blocked on a full pipe is not CPU) and per wall second, and
the receiver's rows per CPU second. The machine is shared: run it twice. The last line
of stdout is one JSON object (benchmarks/_common.py).

    python benchmarks/writer_handoff.py [--channels 64] [--ticks 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import subprocess
import sys
import time
from multiprocessing.connection import Connection, Pipe
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import result  # noqa: E402

from labdaq.engine.ledger import FAST_COLUMNS, Ledger  # noqa: E402
from labdaq.engine.sample_batch import SampleBatch, decode, encode, is_batch  # noqa: E402


def _receiver(fd: int) -> None:
    """Child: decode every message like the writer process; at the end, send back the
    CPU seconds and rows per kind."""
    conn = Connection(fd)
    cpu = {"pickle": 0.0, "batch": 0.0}
    rows = {"pickle": 0, "batch": 0}
    while True:
        buf = conn.recv_bytes()
        t0 = time.thread_time()
        if is_batch(buf):
            batch, _ = decode(buf)
            n = len(batch.rows())
            kind = "batch"
        else:
            msg = pickle.loads(buf)
            if msg[0] == "end":
                conn.send((cpu, rows))
                return
            n = len(msg[1])
            kind = "pickle"
        cpu[kind] += time.thread_time() - t0
        rows[kind] += n


class _Tick:
    """A group's per-run columns (as RunArrays holds them) and one tick's readings."""

    def __init__(self, channels: int) -> None:
        rng = np.random.default_rng(1)
        self.n = channels
        self.idx = np.arange(channels, dtype=np.int64)
        self.run_id = np.arange(1000, 1000 + channels, dtype=np.int64)
        self.seq = np.zeros(channels, np.int64)
        self.step_index = np.full(channels, 3, np.int64)
        self.cycle_index = np.full(channels, 12, np.int64)
        self.cap = rng.random(channels)
        self.en = rng.random(channels)
        self.fast_block = rng.random((len(FAST_COLUMNS), channels))
        self.t = rng.random(channels) * 1e4
        self.v = 3.0 + rng.random(channels)
        self.i = rng.random(channels) - 0.5
        self.temp = 25.0 + rng.random(channels)
        self.temp[::16] = np.nan  # a few lost sensors
        self.flags = np.zeros(channels, np.int64)
        self.age = np.where(np.isnan(self.temp), np.nan, 0.4)  # seconds since the scan

    def batch(self) -> tuple[SampleBatch, Ledger]:
        idx = self.idx
        seq = self.seq[idx] + 1
        self.seq[idx] = seq
        b = SampleBatch(self.run_id[idx], seq, self.t[idx], time.time(),
                        self.step_index[idx], self.cycle_index[idx], self.v[idx],
                        self.i[idx], self.temp[idx], self.cap[idx], self.en[idx],
                        self.flags[idx], self.age[idx])
        fast = np.ascontiguousarray(self.fast_block[:, idx].T)
        return b, Ledger(fast=[fast])


def _old(conn: Connection, tick: _Tick) -> None:
    b, ledger = tick.batch()
    conn.send(("put", b.rows(), ledger))


def _new(conn: Connection, tick: _Tick) -> None:
    b, ledger = tick.batch()
    conn.send_bytes(encode(b, ledger))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=64, help="rows per tick (one cabinet)")
    ap.add_argument("--ticks", type=int, default=3000, help="ticks per round and path")
    ap.add_argument("--rounds", type=int, default=5, help="rounds, alternating paths")
    ap.add_argument("--quick", action="store_true", help="500 ticks, 3 rounds")
    ap.add_argument("--receive", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.receive is not None:
        _receiver(args.receive)
        return
    if args.quick:
        args.ticks, args.rounds = 500, 3

    parent, child = Pipe(duplex=True)
    proc = subprocess.Popen([sys.executable, __file__, "--receive", str(child.fileno())],
                            pass_fds=(child.fileno(),), close_fds=True)
    child.close()
    tick = _Tick(args.channels)
    paths = {"pickled rows": _old, "binary batch": _new}
    cpu_rate: dict[str, list[float]] = {k: [] for k in paths}
    wall_rate: dict[str, list[float]] = {k: [] for k in paths}
    for send in paths.values():  # warm-up
        for _ in range(50):
            send(parent, tick)
    for r in range(args.rounds):
        order = list(paths.items()) if r % 2 == 0 else list(reversed(paths.items()))
        for name, send in order:
            c0, w0 = time.thread_time(), time.perf_counter()
            for _ in range(args.ticks):
                send(parent, tick)
            c1, w1 = time.thread_time(), time.perf_counter()
            rows = args.ticks * args.channels
            cpu_rate[name].append(rows / (c1 - c0))
            wall_rate[name].append(rows / (w1 - w0))
            print(f"round {r + 1} {name:13s}: {rows / (c1 - c0):12,.0f} rows/s CPU "
                  f"{rows / (w1 - w0):12,.0f} rows/s wall", file=sys.stderr)
    parent.send(("end",))
    recv_cpu, recv_rows = parent.recv()
    proc.wait(30)
    parent.close()

    old, new = (statistics.median(cpu_rate[k]) for k in paths)
    old_w, new_w = (statistics.median(wall_rate[k]) for k in paths)
    rx_old = recv_rows["pickle"] / recv_cpu["pickle"] if recv_cpu["pickle"] else 0.0
    rx_new = recv_rows["batch"] / recv_cpu["batch"] if recv_cpu["batch"] else 0.0
    load = os.getloadavg()[0]
    print(f"engine side, rows handed off per CPU second (median of {args.rounds}): "
          f"pickled rows {old:,.0f}, binary batch {new:,.0f}, ratio {new / old:.2f}",
          file=sys.stderr)
    print(f"engine side, per wall second: pickled rows {old_w:,.0f}, binary batch "
          f"{new_w:,.0f}, ratio {new_w / old_w:.2f}", file=sys.stderr)
    print(f"writer side, rows decoded per CPU second: pickled rows {rx_old:,.0f}, "
          f"binary batch {rx_new:,.0f}; load average {load:.1f}", file=sys.stderr)
    result("writer_handoff", new, "rows/s engine CPU", old,
           wall_rows_s=round(new_w), wall_rows_s_old=round(old_w),
           writer_decode_rows_s=round(rx_new), writer_decode_rows_s_old=round(rx_old),
           channels=args.channels, load_avg=round(load, 1),
           note=("engine-side CPU to hand a 64-channel tick's rows and ledger to the writer "
                 "process; value = one binary batch (labdaq as built), baseline = pickled "
                 "row tuples, same run, alternating rounds"))


if __name__ == "__main__":
    main()
