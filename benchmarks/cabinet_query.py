"""All-channel cabinet query rate: CyclerCabinet.measure() vs a raw socket client.

One job: measure how fast labdaq reads every channel of a 64-channel cabinet simulator
over TCP (``MEAS:ALL? (@1:64)``, one line of 64 x V,I,T,mode,status), against a raw socket
client sending the same query in the same run (``sendall`` + ``recv`` until newline, no
parsing). The driver path is pyvisa-py SOCKET + channel-list formatting + numpy parsing
into an (n, 3) array.

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


def run_driver(port: int, channels: int, duration_s: float) -> list[float]:
    """labdaq client: CyclerCabinet.measure() over pyvisa-py; latency (s) per call."""
    from labdaq.drivers.cabinet import CyclerCabinet
    from labdaq.drivers.transport import open_transport

    cab = CyclerCabinet(open_transport(f"TCPIP::127.0.0.1::{port}::SOCKET", timeout_s=2.0))
    try:
        assert cab.channel_total == channels
        lat: list[float] = []
        end = time.perf_counter() + duration_s
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                break
            data = cab.measure()
            lat.append(time.perf_counter() - t0)
        assert data.shape == (channels, 3) and np.isfinite(data).all()
    finally:
        cab.close()
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (< 30 s)")
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--duration", type=float, default=None, help="seconds per repeat")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--sim-speed", type=float, default=1.0,
                    help="simulated seconds per wall second (>= 10 steps the cells on "
                         "nearly every query; 1 = real time, readings refresh every 10 ms)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.channels, args.sim_speed)
        return
    duration_s = args.duration if args.duration is not None else (2.0 if args.quick else 5.0)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
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
        rates: dict[str, list[float]] = {"raw": [], "ours": []}
        lats: dict[str, list[float]] = {"raw": [], "ours": []}
        server_cpu_s_per_query: list[float] = []
        for _ in range(repeats):
            for kind in ("raw", "ours"):
                cpu0 = cpu_seconds(child.pid)
                t0 = time.perf_counter()
                lat = (run_raw(port, command, duration_s) if kind == "raw"
                       else run_driver(port, n, duration_s))
                wall = time.perf_counter() - t0
                if kind == "raw":
                    server_cpu_s_per_query.append((cpu_seconds(child.pid) - cpu0) / len(lat))
                rates[kind].append(len(lat) / wall)
                lats[kind].extend(lat)
                print(f"{kind:5s} {len(lat) / wall:9.0f} queries/s "
                      f"{len(lat) / wall * n:11.0f} channel-samples/s "
                      f"p50 {np.percentile(lat, 50) * 1e3:.3f} ms "
                      f"p99 {np.percentile(lat, 99) * 1e3:.3f} ms", flush=True)
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()

    ours_qps = statistics.median(rates["ours"])
    raw_qps = statistics.median(rates["raw"])
    result(
        "cabinet_all_channel_query",
        ours_qps * n,
        "channel-samples/s",
        raw_qps * n,
        channels=n,
        queries_per_s=round(ours_qps, 1),
        baseline_queries_per_s=round(raw_qps, 1),
        p50_ms=round(float(np.percentile(lats["ours"], 50)) * 1e3, 3),
        p99_ms=round(float(np.percentile(lats["ours"], 99)) * 1e3, 3),
        baseline_p50_ms=round(float(np.percentile(lats["raw"], 50)) * 1e3, 3),
        baseline_p99_ms=round(float(np.percentile(lats["raw"], 99)) * 1e3, 3),
        server_cpu_us_per_query=round(statistics.median(server_cpu_s_per_query) * 1e6, 1),
        repeats=repeats,
        sim_speed=args.sim_speed,
        duration_s=duration_s,
    )


if __name__ == "__main__":
    main()
