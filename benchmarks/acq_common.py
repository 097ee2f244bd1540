"""What every part of benchmarks/acquisition_scale.py shares: the cabinets' wire format
(REAL,32 MEAS:ALL? blocks), the simulated cell's currents, logging, percentiles, CPU
and load readings, free ports, and running a child of the benchmark for its JSON line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from labdaq.processes import Children

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import ports  # noqa: E402

CHANNELS = 64
MEAS_CMD = f"MEAS:ALL? (@1:{CHANNELS})\n".encode()
# The engine's cabinet driver asks for binary replies (a block of big-endian float32); the
# raw clients ask for the same, so the bare loop reads the engine's wire format and every
# client of a simulator agrees on it (the format is the instrument's, not a connection's).
FORM_CMD = b"FORM:DATA REAL,32;:FORM:BORD NORM\n"
MEAS_BYTES = CHANNELS * 5 * 4
MEAS_HEADER = f"#{len(str(MEAS_BYTES))}{MEAS_BYTES}".encode()


def parse_meas_block(message: bytes) -> np.ndarray:
    """``(64, 5)`` table of one binary MEAS:ALL? reply (header, payload, LF)."""
    if not message.startswith(MEAS_HEADER) or len(message) != len(MEAS_HEADER) + MEAS_BYTES + 1:
        raise ValueError(f"not a {CHANNELS}-channel REAL,32 block: {message[:16]!r}")
    payload = message[len(MEAS_HEADER): -1]
    return np.frombuffer(payload, ">f4").astype(float).reshape(CHANNELS, 5)
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# The script every child of the benchmark runs (--api-load, --bare).
HERE = Path(__file__).resolve().parent / "acquisition_scale.py"
# The simulated NMC811 cell: 4.9 Ah, R0 20 mOhm, charge at most 1C, discharge 2C. The
# cycling charge is 1C clamped CAP_ABOVE_V above the cell's voltage (the clamp engages
# within the step, so CC and CV both happen), the discharge 1C. The breach discharge at 2C
# pulls the terminal voltage ~0.2 V below its value at once; the safety floor sits
# BREACH_MARGIN_V below the rest voltage, so the charge never trips it and the first
# discharge tick does.
CYCLE_CHARGE_A = 4.9
CYCLE_DISCHARGE_A = -4.9
BREACH_CURRENT_A = -9.8
CAP_ABOVE_V = 0.08
CAP_MAX_V = 4.15
BREACH_MARGIN_V = 0.03
CREATE_CHUNK = 32  # runs created per transaction (Session.grow)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float] | np.ndarray, q: float, scale: float = 1e3) -> float | None:
    """Percentile ``q`` of ``values`` times ``scale`` (ms by default); None when empty."""
    if len(values) == 0:
        return None
    return round(float(np.percentile(np.asarray(values, float), q)) * scale, 3)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (works for children and for ourselves)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def machine_busy_s() -> float:
    """CPU-seconds all cores spent busy since boot (/proc/stat; idle and iowait excluded)."""
    vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(vals) - vals[3] - vals[4]) / CLOCK_TICKS_PER_S


def free_port() -> int:
    """A port for a service the benchmark starts: from the benchmarks' block below the
    kernel's ephemeral range, where the simulated cabinets' own ports cannot take it."""
    return ports.free_port("bench")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------
# parent: children
# ---------------------------------------------------------------------------------------


def run_child_json(children: Children, name: str, args: list[str], timeout_s: float
                   ) -> dict[str, Any]:
    """Run a child of this file to completion (bounded) and return its JSON line."""
    proc = children.spawn(name, [sys.executable, str(HERE), *args], stdout=subprocess.PIPE,
                          text=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        children.stop(proc)
    lines = [x for x in (out or "").splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed ({proc.returncode}): {children.tail(name)}")
    data: dict[str, Any] = json.loads(lines[-1])
    return data


def read_voltages(port: int) -> np.ndarray:
    """Present terminal voltage of the cabinet's 64 channels (one raw MEAS:ALL?)."""
    size = len(MEAS_HEADER) + MEAS_BYTES + 1
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(FORM_CMD + MEAS_CMD)
        buf = b""
        while len(buf) < size:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("simulator closed the connection")
            buf += chunk
    return parse_meas_block(buf)[:, 0]


