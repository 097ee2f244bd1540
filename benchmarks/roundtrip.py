"""Query round trips over TCP and over a pseudo-terminal: labdaq's transport vs raw I/O.

One job: how many `*IDN?` round trips per second labdaq's transports (pyvisa-py SOCKET
and ASRL, and pyserial) achieve against the Keithley 2450 simulator, with median and p99
latency, against a raw client in the same run (socket ``sendall``/``recv`` for TCP,
``os.write``/``os.read`` on the pty for serial). The simulator runs in its own process so
it does not share the client's GIL. The last line is the TCP result as one JSON object;
the pty results are printed as JSON lines before it.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import tty
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import result  # noqa: E402

QUERY = "*IDN?"


def serve() -> None:
    """Child: serve a Keithley 2450 simulator on TCP and on a pty; print both, then wait."""
    from labdaq.sims.keithley2450 import Keithley2450Sim
    from labdaq.sims.server import SimServer

    with SimServer.tcp(Keithley2450Sim()) as tcp, SimServer.pty(Keithley2450Sim()) as pty:
        print(f"TCP {tcp.port}", flush=True)
        print(f"PTY {pty.path}", flush=True)
        sys.stdin.read()


def stats(lat: list[float], wall_s: float) -> dict[str, float]:
    lat_sorted = sorted(lat)
    return {
        "per_s": len(lat) / wall_s,
        "p50_ms": statistics.median(lat_sorted) * 1e3,
        "p99_ms": lat_sorted[int(0.99 * (len(lat_sorted) - 1))] * 1e3,
    }


def timed(fn, duration_s: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    lat: list[float] = []
    t_end = time.perf_counter() + duration_s
    t0 = time.perf_counter()
    while True:
        t1 = time.perf_counter()
        if t1 > t_end:
            break
        fn()
        lat.append(time.perf_counter() - t1)
    return stats(lat, time.perf_counter() - t0)


def raw_tcp(port: int, duration_s: float) -> dict[str, float]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg = (QUERY + "\n").encode()

        def once() -> None:
            sock.sendall(msg)
            buf = b""
            while not buf.endswith(b"\n"):
                buf += sock.recv(4096)

        return timed(once, duration_s)


def raw_pty(path: str, duration_s: float) -> dict[str, float]:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    msg = (QUERY + "\n").encode()

    def once() -> None:
        os.write(fd, msg)
        buf = b""
        while not buf.endswith(b"\n"):
            buf += os.read(fd, 4096)

    try:
        return timed(once, duration_s)
    finally:
        os.close(fd)


def ours(resource: str, duration_s: float) -> dict[str, float]:
    from labdaq.drivers.transport import open_transport

    transport = open_transport(resource, timeout_s=2.0)
    try:
        return timed(lambda: transport.query(QUERY), duration_s)
    finally:
        transport.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve()
        return
    duration_s = 2.0 if args.quick else 2.5
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline().split()[1])
        pty_path = child.stdout.readline().split()[1]
        raw_t = raw_tcp(port, duration_s)
        visa_t = ours(f"TCPIP::127.0.0.1::{port}::SOCKET", duration_s)
        raw_p = raw_pty(pty_path, duration_s)
        visa_p = ours(f"ASRL{pty_path}::INSTR", duration_s)
        serial_p = ours(pty_path, duration_s)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)
    for name, got, base in (
        ("roundtrip_pty_pyvisa_asrl", visa_p, raw_p),
        ("roundtrip_pty_pyserial", serial_p, raw_p),
        ("roundtrip_tcp_pyvisa_socket", visa_t, raw_t),
    ):
        result(
            name,
            got["per_s"],
            "queries/s",
            base["per_s"],
            p50_ms=round(got["p50_ms"], 4),
            p99_ms=round(got["p99_ms"], 4),
            baseline_p50_ms=round(base["p50_ms"], 4),
            baseline_p99_ms=round(base["p99_ms"], 4),
            note="*IDN? vs raw client",
        )


if __name__ == "__main__":
    main()
