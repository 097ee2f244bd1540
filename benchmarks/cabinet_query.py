"""All-channel cabinet query cost: CyclerCabinet vs a raw socket client, per reply format
and per transport.

One job: measure how fast labdaq reads every channel of a 64-channel cabinet simulator
over TCP (``MEAS:ALL? (@1:64)``: 64 x V,I,T,mode,status), against a raw socket client
sending the same query in the same run (``sendall`` + ``recv`` until the reply is whole,
no parsing), in both reply formats — ASCII (one line of NR3/NR1) and ``FORM:DATA REAL,32``
(one IEEE 488.2 block of float32) — and through each way the driver can go:

- ``pyvisa``: ``measure()`` over pyvisa-py SOCKET, in the calling thread;
- ``pyvisa-async``: ``await ameasure()`` on an event loop (pyvisa-py's socket driven by
  the loop, as the engine's hot path did before the stream transport);
- ``stream``: ``await ameasure()`` over the asyncio stream transport (the engine's hot
  path now);
- ``pyvisa-worker``: ``await`` an instrument worker thread running ``measure()`` over
  pyvisa-py (the engine's fallback and command path);
- ``stream-worker``: the same over the stream transport, whose connection lives on the
  running loop (two more thread hand-offs per exchange).

Each variant reports microseconds per 64-channel reply (median and p99).

The simulator runs in its own process (``--serve``): a real cabinet does not share the
client's interpreter, and in one process the server threads would compete for the GIL.
Both clients alternate in repeats so machine noise hits them alike. The last line of
stdout is one JSON object (benchmarks/_common.py).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import result  # noqa: E402

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def serve(channels: int, speed: float) -> None:
    """Child process: serve a CabinetSim until stdin closes; print the port first."""
    from labdaq.sims.cabinet import CabinetSim
    from labdaq.sims.clock import SimClock
    from labdaq.sims.server import SimServer

    sim = CabinetSim(channels, "nmc811", clock=SimClock(speed), seed=1)
    with SimServer.tcp(sim) as server:
        # Some channels charging, some discharging, so every reply carries real physics.
        half = channels // 2
        sim.handle_line(f"SOUR:CURR 2.0,(@1:{half});:SOUR:CURR -1.5,(@{half + 1}:{channels})")
        sim.handle_line(f"SOUR:CURR:VLIM 4.2,(@1:{channels});:OUTP ON,(@1:{channels})")
        print(f"PORT {server.port}", flush=True)
        sys.stdin.read()  # parent closes stdin to stop us


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (no psutil dependency)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def run_raw(port: int, command: bytes, duration_s: float) -> list[float]:
    """Raw socket client: latency (s) of each query, reply read up to the newline."""
    lat: list[float] = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end = time.perf_counter() + duration_s
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                break
            sock.sendall(command)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("simulator closed the connection")
                buf += chunk
            lat.append(time.perf_counter() - t0)
    return lat


def run_raw_block(port: int, command: bytes, duration_s: float) -> list[float]:
    """Raw socket client for REAL,32 replies: read the block header, then up to its
    length and the newline (no parsing)."""
    lat: list[float] = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"FORM:DATA REAL,32;:FORM:BORD NORM\n")
        end = time.perf_counter() + duration_s
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                break
            sock.sendall(command)
            buf = b""
            want = -1
            while want < 0 or len(buf) < want:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("simulator closed the connection")
                buf += chunk
                if want < 0 and len(buf) >= 2 and len(buf) >= 2 + buf[1] - 48:
                    digits = buf[1] - 48
                    want = 2 + digits + int(buf[2 : 2 + digits]) + 1
            lat.append(time.perf_counter() - t0)
    return lat


def run_driver(port: int, channels: int, duration_s: float, link: str,
               data_format: str) -> list[float]:
    """labdaq client: a CyclerCabinet read through ``link`` in ``data_format``;
    latency (s) per 64-channel reading."""
    import asyncio

    from labdaq.drivers.cabinet import CyclerCabinet
    from labdaq.drivers.transport import InstrumentWorker, open_transport

    resource = f"TCPIP::127.0.0.1::{port}::SOCKET"
    cab = CyclerCabinet(open_transport(resource, timeout_s=2.0,
                                       stream=link.startswith("stream")),
                        data_format=data_format)
    if data_format == "ascii":
        cab.write("FORM:DATA ASC")  # the simulator's format is shared by its clients
    lat: list[float] = []
    fallbacks = 0

    async def on_loop() -> np.ndarray:
        nonlocal fallbacks
        worker = InstrumentWorker("bench")
        data = np.empty(0)
        try:
            end = time.perf_counter() + duration_s
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    break
                if link.endswith("-worker"):
                    data = await worker.call(cab.measure)
                else:
                    got = await cab.ameasure()
                    if got is None:  # the engine would then ask in the worker thread
                        fallbacks += 1
                        got = await worker.call(cab.measure)
                    data = got
                lat.append(time.perf_counter() - t0)
        finally:
            worker.shutdown()
        return data

    try:
        assert cab.channel_total == channels and cab.data_format == data_format
        if link == "pyvisa":
            end = time.perf_counter() + duration_s
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    break
                data = cab.measure()
                lat.append(time.perf_counter() - t0)
        else:
            data = asyncio.run(on_loop())
        assert data.shape == (channels, 3) and np.isfinite(data).all()
        if fallbacks > len(lat) // 100:
            raise RuntimeError(f"{link}: {fallbacks} of {len(lat)} readings fell back "
                               "to the worker thread")
    finally:
        cab.close()
    return lat


LINKS = ("pyvisa", "pyvisa-worker", "pyvisa-async", "stream", "stream-worker")
FORMATS = ("ascii", "real32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (< 30 s)")
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--duration", type=float, default=None, help="seconds per repeat")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--sim-speed", type=float, default=1.0,
                    help="simulated seconds per wall second (>= 10 steps the cells on "
                         "nearly every query; 1 = real time, readings refresh every 10 ms)")
    ap.add_argument("--only", default="", help="comma-separated variants (e.g. "
                    "raw-ascii,stream-real32); default all")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.channels, args.sim_speed)
        return
    duration_s = args.duration if args.duration is not None else (0.7 if args.quick else 1.0)
    repeats = args.repeats if args.repeats is not None else 2
    n = args.channels
    command = f"MEAS:ALL? (@1:{n})\n".encode()

    child = subprocess.Popen([sys.executable, __file__, "--serve", "--channels", str(n),
                              "--sim-speed", str(args.sim_speed)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        if len(line) != 2 or line[0] != "PORT":
            raise RuntimeError(f"simulator did not start: {line!r}")
        port = int(line[1])
        run_raw(port, command, 0.3)  # warm-up: imports, first steps, caches
        kinds = [f"raw-{f}" for f in FORMATS] + [f"{link}-{f}" for link in LINKS
                                                  for f in FORMATS]
        if args.only:
            kinds = [k for k in kinds if k in args.only.split(",")]
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        lats: dict[str, list[float]] = {k: [] for k in kinds}
        server_cpu_s_per_query: list[float] = []
        # The client's own CPU per reply (every thread of this process): what an engine
        # with many cabinets pays per reading, whatever the waiting costs.
        client_cpu_s: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(repeats):
            for kind in kinds:
                cpu0 = cpu_seconds(child.pid)
                own0 = time.process_time()
                t0 = time.perf_counter()
                link, data_format = kind.rsplit("-", 1)
                if kind == "raw-ascii":
                    run_raw(port, b"FORM:DATA ASC;*OPC?\n", 0.05)
                    lat = run_raw(port, command, duration_s)
                elif kind == "raw-real32":
                    lat = run_raw_block(port, command, duration_s)
                else:
                    lat = run_driver(port, n, duration_s, link, data_format)
                wall = time.perf_counter() - t0
                client_cpu_s[kind].append((time.process_time() - own0) / len(lat))
                if kind == "raw-ascii":
                    server_cpu_s_per_query.append((cpu_seconds(child.pid) - cpu0) / len(lat))
                rates[kind].append(len(lat) / wall)
                lats[kind].extend(lat)
                print(f"{kind:20s} {len(lat) / wall:9.0f} queries/s "
                      f"{len(lat) / wall * n:11.0f} channel-samples/s "
                      f"p50 {np.percentile(lat, 50) * 1e6:7.0f} us "
                      f"p99 {np.percentile(lat, 99) * 1e6:7.0f} us "
                      f"client CPU {client_cpu_s[kind][-1] * 1e6:5.0f} us/reply", flush=True)
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()

    def p(kind: str, q: float) -> float:
        return round(float(np.percentile(lats[kind], q)) * 1e6, 1)

    # The headline is the engine's hot path (stream transport, binary replies) against
    # the raw ASCII client, as before the binary form existed.
    hot, raw = "stream-real32", "raw-ascii"
    if hot not in kinds or raw not in kinds:
        hot, raw = kinds[-1], kinds[0]
    ours_qps = statistics.median(rates[hot])
    raw_qps = statistics.median(rates[raw])
    result(
        "cabinet_all_channel_query",
        ours_qps * n,
        "channel-samples/s",
        raw_qps * n,
        channels=n,
        path=hot,
        baseline_path=raw,
        queries_per_s=round(ours_qps, 1),
        baseline_queries_per_s=round(raw_qps, 1),
        us_per_reply_p50={k: p(k, 50) for k in kinds},
        us_per_reply_p99={k: p(k, 99) for k in kinds},
        client_cpu_us_per_reply={k: round(statistics.median(client_cpu_s[k]) * 1e6, 1)
                                 for k in kinds},
        server_cpu_us_per_query=(round(statistics.median(server_cpu_s_per_query) * 1e6, 1)
                                 if server_cpu_s_per_query else None),
        repeats=repeats,
        sim_speed=args.sim_speed,
        duration_s=duration_s,
    )


if __name__ == "__main__":
    main()
