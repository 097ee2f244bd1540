"""Acquisition at scale: the largest rate stored with no sample period missed, end to end.

One job: find the largest number of simulated 64-channel cabinets labdaq's acquisition
engine samples at 100 Hz with **zero** missed periods, through real sockets, storing into
SQLite, in a realistic window, and say what that rate is against a bare loop and the
simulator's own ceiling measured in the same run.

Process layout (what the engine gets of the 2 cores is what is measured)::

    this process ─ orchestration + AcquisitionNode (in-process: lateness and breach-to-ack
                   are read straight from InstrumentGroup.lateness_s / breach_to_ack_s)
    child        ─ labdaq sim   (K cabinets x 64 channels, TCP, speed 1)
    child        ─ labdaq api   (uvicorn, same SQLite file)
    child        ─ API load     (this file --api-load: the standard API load, below)
    child        ─ bare loop    (this file --bare: same wire format, same cabinets)

Definitions (docs/architecture.md): a period counts as **stored** only when a distinct
reading of it is committed to ``samples``; a period with no stored sample is **lost**.
Every count below comes from the database, never from the engine's counters.

Phases, all in one run:

1. Simulator ceiling: raw asyncio clients ask every cabinet ``MEAS:ALL? (@1:64)`` back to
   back (binary ``FORM:DATA REAL,32`` replies, parsed, nothing stored): channel-readings/s
   the simulator process serves at most, and its CPU.
2. Search (100 Hz, control period = sample period). Each tried cabinet count K is a fresh
   AcquisitionNode with fresh runs on every channel of K cabinets: every channel cycles
   CC-CV (a 1C CC-CV charge clamped ~80 mV above the cell's voltage, then a 1C discharge,
   ``cycle_s`` per cycle, looped: 20 s in the full form, a set-point change per channel
   every 10 s, far more often than any formation protocol), and ``breach_per_cab``
   channels per cabinet do a CC-CV charge and then a 2C discharge whose protocol
   ``safety.min_voltage_v`` sits 30 mV below the cell's rest voltage, so the software
   interlock trips inside the window.
   The standard API load runs from before the settle time to the window's end. After the
   window every run is stopped and its whole life checked in the database. A count is
   **lossless** when no period was lost inside the window, none from any run's start to
   the window's end, the database holds every seq the engine numbered, every run ended
   as asked and the writer dropped and rejected nothing. The search starts at
   ``start_cabinets`` (by default the last run's lossless count, kept in the temp dir; 4
   without one), goes up by doubling while lossless and bisects between the largest lossless and the
   smallest lossy count; a trial whose estimated end is past ``budget_s`` is not started.
   When not even one cabinet is lossless, one cabinet's channels are halved down to
   ``min_channels``.
3. Bare loop over the headline's cabinet count (``bare_s``, 30 s in the full form):
   asyncio streams in the engine's wire format, back to back, long rows into
   ``sqlite3.executemany`` in 10k batches in a writer thread (research/perf-anchors.md
   §2); stored/s = rows committed in the window / its length.

Standard API load (``--api-load``, its own process): an open-loop stream at
``api_rate_hz`` requests/s over ``api_conns`` keep-alive connections, each request to
the next of the trial's runs, cycling through the mix run status (``GET /runs/{id}``),
cycles, downsampled samples (``?points=500``) and one page of full samples
(``?limit=1000``); latency from the intended send time (no coordinated omission).

Headline: the largest 100 Hz stored rate with zero lost (window and whole life), that
window's maximum loop lateness and breach-to-acknowledgement p99 (breaching reading in ->
the cabinet's reply to the error-queue read after the off command), the ratio to the
bare loop, the simulator's ceiling; the largest rate of a trial with losses is printed
beside it as "with N lost".

Options: ``--quick`` (about a minute, 8 channels per cabinet), ``--set FIELD=VALUE`` to explore
another plan (see :class:`Plan`), ``--keep`` keeps the database.

The last stdout line is one JSON object (benchmarks/_common.py); human-readable lines go to
stderr. Everything uses 127.0.0.1, every loop is bounded and every child is stopped in a
``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import queue
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import result  # noqa: E402

from labdaq import processes  # noqa: E402
from labdaq.processes import Children  # noqa: E402

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
HERE = Path(__file__).resolve()
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
_CREATE_CHUNK = 32  # runs created per transaction (Session.grow)


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------------------------------
# child: the standard API load
# ---------------------------------------------------------------------------------------

# The mix of the standard API load (docs/architecture.md, Definitions), one request of
# each in turn: run status, cycles, downsampled samples, one page of full samples.
API_MIX = (
    ("status", "/api/v1/runs/{rid}"),
    ("cycles", "/api/v1/runs/{rid}/cycles"),
    ("points", "/api/v1/runs/{rid}/samples?points=500"),
    ("page", "/api/v1/runs/{rid}/samples?limit=1000"),
)


async def _api_load(port: int, token: str, ids: list[int], rate_hz: float,
                    duration_s: float, conns: int,
                    kinds: list[str] | None = None) -> dict[str, Any]:
    """Open-loop requests at ``rate_hz`` over ``conns`` keep-alive HTTP/1.1 connections
    (raw asyncio streams: httpx itself saturates a core at a few hundred requests/s here,
    perf-anchors §5, which would measure the client). Request ``i`` is due at
    ``t0 + i / rate_hz`` whether or not earlier ones have answered; its latency runs from
    that intended time, so a slow server shows as latency, not as a lower rate.
    ``kinds``: the part of the mix to send (default all of API_MIX)."""
    mix = [(k, p) for k, p in API_MIX if kinds is None or k in kinds]
    lat: dict[str, list[float]] = {kind: [] for kind, _ in mix}
    statuses: dict[int, int] = {}
    errors = 0
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(conns):
        pool.put_nowait(await asyncio.open_connection("127.0.0.1", port))

    async def one(i: int, intended: float) -> None:
        nonlocal errors
        kind, path = mix[i % len(mix)]
        # Consecutive requests of a kind go to distinct runs.
        rid = ids[(i // len(mix)) % len(ids)]
        reader, writer = await pool.get()
        try:
            writer.write((f"GET {path.format(rid=rid)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          f"Authorization: Bearer {token}\r\n\r\n").encode())
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            code = int(lines[0].split()[1])
            length = 0
            for line in lines[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            await reader.readexactly(length)
            lat[kind].append(time.perf_counter() - intended)
            statuses[code] = statuses.get(code, 0) + 1
            if code != 200:
                errors += 1
            pool.put_nowait((reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            errors += 1
            writer.close()
            pool.put_nowait(await asyncio.open_connection("127.0.0.1", port))

    cpu0 = time.process_time()
    t0 = time.perf_counter() + 0.05
    n = int(rate_hz * duration_s)
    # Only unanswered requests are kept: an hour's load is 360,000 of them.
    tasks: set[asyncio.Task[None]] = set()
    for i in range(n):
        intended = t0 + i / rate_hz
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, intended))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    # Requests still unanswered a few seconds after the last was due count as unfinished.
    done, pending = await asyncio.wait(tasks, timeout=5.0) if tasks else (set(), set())
    for t in pending:
        t.cancel()
    wall = time.perf_counter() - t0
    every = [x for v in lat.values() for x in v]
    return {
        "rate_hz": rate_hz, "mix": [k for k, _ in mix], "conns": conns,
        "cpu_pct": round(100 * (time.process_time() - cpu0) / wall, 1) if wall > 0 else 0.0,
        "sent": n, "requests": len(every), "errors": errors, "unfinished": len(pending),
        "req_per_s": round(len(every) / wall, 1) if wall > 0 else 0.0,
        "p50_ms": pct(every, 50), "p99_ms": pct(every, 99),
        "p99_ms_by_kind": {k: pct(v, 99) for k, v in lat.items()},
        "p50_ms_by_kind": {k: pct(v, 50) for k, v in lat.items()}, "statuses": statuses,
    }


def api_load_main(spec: str) -> None:
    a = json.loads(spec)
    out = asyncio.run(_api_load(a["port"], a["token"], a["ids"], a["rate_hz"],
                                a["duration_s"], a["conns"], a.get("kinds")))
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------
# child: bare ceiling
# ---------------------------------------------------------------------------------------


def bare_main(spec: str) -> None:
    """Minimal socket -> numpy -> sqlite3 loop (perf-anchors §2), rows committed/s; with
    ``store`` false only socket -> numpy (the simulator's ceiling: readings served/s)."""
    a = json.loads(spec)
    store: bool = a.get("store", True)
    ports: list[int] = a["ports"]
    duration_s: float = a["duration_s"]
    warmup_s: float = a["warmup_s"]
    q: queue.Queue[list[tuple[Any, ...]] | None] = queue.Queue(maxsize=1000)
    committed = [0]  # rows in committed transactions; read by the main thread

    def writer() -> None:
        con = sqlite3.connect(a["db"])
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("CREATE TABLE IF NOT EXISTS s (cab INTEGER, ch INTEGER, t REAL, v REAL, "
                    "i REAL, temp REAL, mode REAL, status REAL)")
        batch: list[tuple[Any, ...]] = []
        while True:
            item = q.get()
            if item is not None:
                batch.extend(item)
            if len(batch) >= 10_000 or (item is None and batch):
                con.executemany("INSERT INTO s VALUES (?,?,?,?,?,?,?,?)", batch)
                con.commit()
                committed[0] += len(batch)
                batch = []
            if item is None:
                break
        con.close()

    wt = threading.Thread(target=writer, name="bare-writer")
    if store:
        wt.start()
    queries = [0]

    async def poll(j: int, port: int, end: float) -> None:
        reader, w = await asyncio.open_connection("127.0.0.1", port)
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        w.write(FORM_CMD)
        size = len(MEAS_HEADER) + MEAS_BYTES + 1
        try:
            while time.perf_counter() < end:
                w.write(MEAS_CMD)
                arr = parse_meas_block(await reader.readexactly(size))
                t = time.time()
                if store:
                    # A blocking put is the back-pressure: acquisition slows to the writer.
                    q.put([(j, ch, t, *r) for ch, r in enumerate(arr.tolist())])
                queries[0] += 1
        finally:
            w.close()

    async def run() -> dict[str, Any]:
        t_start = time.perf_counter()
        end = t_start + warmup_s + duration_s
        tasks = [asyncio.create_task(poll(j, p, end)) for j, p in enumerate(ports)]
        await asyncio.sleep(warmup_s)
        c0, q0, t0, cpu0 = committed[0], queries[0], time.perf_counter(), time.process_time()
        await asyncio.sleep(duration_s)
        c1, q1, t1, cpu1 = committed[0], queries[0], time.perf_counter(), time.process_time()
        await asyncio.gather(*tasks)
        return {"stored_per_s": (c1 - c0) / (t1 - t0),
                "acquired_per_s": (q1 - q0) * CHANNELS / (t1 - t0),
                "cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0)}

    try:
        out = asyncio.run(run())
    finally:
        if store:
            q.put(None)
            wt.join(timeout=30)
    print(json.dumps(out), flush=True)


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


# ---------------------------------------------------------------------------------------
# parent: engine sessions
# ---------------------------------------------------------------------------------------


@dataclass
class Lab:
    url: str
    db_path: Path
    desc: dict[str, Any]
    ports: list[int]
    api_port: int
    token: str
    children: Children
    settings: Any
    engine: Any = None
    maker: Any = None


@dataclass
class Step:
    """One trial: a fresh node sampling ``cabinets`` x ``channels per cabinet`` runs."""

    hz: float
    period_s: float
    cabinets: int
    channels: int
    window: tuple[float, float] = (0.0, 0.0)  # time.time() bounds
    stored_per_s: float = 0.0  # due rows in the window (from the database) / its length
    window_rows: int = 0
    window_lost: int = 0
    life_lost: int = 0  # periods lost from each run's start to the window's end
    holes: int = 0
    lateness_s: list[float] = field(default_factory=list)
    ticks_over_period: int = 0
    breach_to_off_s: list[float] = field(default_factory=list)  # to the off command sent
    breach_to_ack_s: list[float] = field(default_factory=list)  # to the instrument's ack
    api: dict[str, Any] = field(default_factory=dict)
    cpu_pct: dict[str, float] = field(default_factory=dict)
    writer: dict[str, int] = field(default_factory=dict)
    loss_causes: dict[str, int] = field(default_factory=dict)
    phase_changes: int = 0  # set-point changes (edge rows) stored in the window
    new_runs: int = 0
    claim_s: float = 0.0
    trial_s: float = 0.0
    lossless: bool = False  # none lost in the window, nor in any run's life up to its end
    why: str = ""

    @property
    def lost(self) -> int:
        """Periods lost, window and whole life together (the window's are in both)."""
        return max(self.window_lost, self.life_lost) + self.holes

    def summary(self) -> dict[str, Any]:
        return {
            "hz": self.hz, "cabinets": self.cabinets, "channels": self.channels,
            "lossless": self.lossless, "stored_per_s": round(self.stored_per_s, 1),
            "window_rows": self.window_rows, "window_lost": self.window_lost,
            "life_lost": self.life_lost, "seq_holes": self.holes,
            "loss_causes": self.loss_causes, "phase_changes": self.phase_changes,
            "lateness_p50_ms": pct(self.lateness_s, 50),
            "lateness_p99_ms": pct(self.lateness_s, 99),
            "lateness_max_ms": pct(self.lateness_s, 100),
            "ticks_over_period": self.ticks_over_period,
            "breaches": len(self.breach_to_ack_s),
            "breach_to_off_p99_ms": pct(self.breach_to_off_s, 99),
            "breach_to_ack_p99_ms": pct(self.breach_to_ack_s, 99),
            "api": self.api,
            "claim_ms_per_run": round(1e3 * self.claim_s / self.new_runs, 1)
            if self.new_runs else None,
            "trial_s": round(self.trial_s, 1),
            "cpu_pct": self.cpu_pct,
            "writer": self.writer,
            **({"why": self.why.strip()} if self.why else {}),
        }

    def line(self) -> str:
        api = self.api
        api_txt = (f"; api {api.get('req_per_s')} req/s p99 {api.get('p99_ms')} ms "
                   f"{api.get('errors')} err {api.get('unfinished')} unfinished" if api else "")
        verdict = "LOSSLESS" if self.lossless else f"with {self.lost} lost"
        return (
            f"  {self.hz:g} Hz x {self.channels:5d} ch ({self.cabinets} cab): {verdict}; "
            f"stored {self.stored_per_s:8.0f}/s, window rows {self.window_rows} lost "
            f"{self.window_lost} {self.loss_causes}, whole life lost {self.life_lost}, seq "
            f"holes {self.holes}; {self.phase_changes} set-point changes; lateness p50 "
            f"{pct(self.lateness_s, 50)} p99 {pct(self.lateness_s, 99)} max "
            f"{pct(self.lateness_s, 100)} ms ({self.ticks_over_period} ticks later than a "
            f"period); breach->off n={len(self.breach_to_off_s)} p99 "
            f"{pct(self.breach_to_off_s, 99)} ms, ->ack p99 {pct(self.breach_to_ack_s, 99)} "
            f"ms; claim {self.claim_s:.1f} s for {self.new_runs} runs; trial "
            f"{self.trial_s:.0f} s; cpu% {self.cpu_pct}; writer {self.writer}{api_txt}"
            f"{' -- ' + self.why.strip() if self.why else ''}"
        )


def cycling_doc(cap_v: float, cycle_s: float) -> dict[str, Any]:
    """Every ordinary channel: CC-CV charge at 2C clamped at ``cap_v`` (a little above the
    cell's voltage, so the clamp engages within the step), then a 1C discharge, looped:
    the set point changes twice per cycle and the channel never rests."""
    half = round(cycle_s / 2, 3)
    return {
        "schema_version": 1, "name": f"bench-cccv-{cap_v:.2f}v-{cycle_s:g}s",
        "steps": [{"step": "loop", "count": 100_000, "body": [
            {"step": "cccv", "current_a": CYCLE_CHARGE_A, "voltage_v": round(cap_v, 3),
             "until": {"current_below_a": 0.2, "duration_s": half}},
            {"step": "cc", "current_a": CYCLE_DISCHARGE_A, "until": {"duration_s": half}},
        ]}],
    }


def breach_doc(charge_s: float, cap_v: float, floor_v: float) -> dict[str, Any]:
    """CC-CV charge, then a 2C discharge that the protocol's safety floor stops at its
    first tick."""
    return {
        "schema_version": 1, "name": f"bench-breach-{charge_s:.2f}s",
        "safety": {"min_voltage_v": round(floor_v, 4)},
        "steps": [
            {"step": "cccv", "current_a": CYCLE_CHARGE_A, "voltage_v": round(cap_v, 3),
             "until": {"current_below_a": 0.2, "duration_s": round(charge_s, 3)}},
            {"step": "cc", "current_a": BREACH_CURRENT_A, "until": {"duration_s": 600}},
        ],
    }


# Sample periods with no stored row, per run: the due samples (edge samples, flag 8, taken
# right after a set point changes, are extra) between its first and last one in a time
# range should be one per period. Counting rather than looking at single gaps keeps a late
# sample followed by an early one (jitter) from counting as a loss; a gap of two periods
# with no catch-up is one lost sample. Its blind spot: a row stored off the grid without
# the edge flag (the tick a phase ends or a limit breaches) is counted as due, so it can
# hide one missed period of the same run (docs/performance.md, 10 Hz).
_COUNT_SQL = (
    "SELECT run_id, COUNT(*), MIN(t_s), MAX(t_s) FROM samples "
    "WHERE run_id BETWEEN :lo AND :hi AND (flags & 8) = 0 AND ts_utc BETWEEN :w0 AND :w1 "
    "GROUP BY run_id"
)


def _lost(rows: list[tuple[int, int, float, float]], period: float) -> int:
    return sum(max(0, round((t1 - t0) / period) - (n - 1)) for _, n, t0, t1 in rows)


# Gaps that lost a period: at least 1.5 periods, and not a late sample that the next one
# makes up for (the two gaps together span at least 2.5 periods).
_GAPS_SQL = """
WITH g AS (
  SELECT run_id, ts_utc, t_s - LAG(t_s) OVER w AS gap, LEAD(t_s) OVER w - t_s AS next_gap
  FROM samples WHERE run_id BETWEEN :lo AND :hi AND (flags & 8) = 0
  WINDOW w AS (PARTITION BY run_id ORDER BY seq)
)
SELECT c.instrument_id, g.ts_utc FROM g JOIN runs r ON r.id = g.run_id
JOIN channels c ON c.id = r.channel_id
WHERE g.gap >= 1.5 * :p AND (g.next_gap IS NULL OR g.gap + g.next_gap >= 2.5 * :p)
  AND g.ts_utc BETWEEN :w0 AND :w1
"""
# Phase changes (edge samples after the first of a run) and active runs, per cabinet.
_EDGES_SQL = """
SELECT c.instrument_id, s.ts_utc FROM samples s JOIN runs r ON r.id = s.run_id
JOIN channels c ON c.id = r.channel_id
WHERE s.run_id BETWEEN :lo AND :hi AND (s.flags & 8) != 0 AND s.seq > 1
  AND s.ts_utc BETWEEN :w0 - 3 * :p AND :w1
"""
_ACTIVE_SQL = """
SELECT c.instrument_id, COUNT(DISTINCT s.run_id) FROM samples s JOIN runs r ON r.id = s.run_id
JOIN channels c ON c.id = r.channel_id
WHERE s.run_id BETWEEN :lo AND :hi AND s.ts_utc BETWEEN :w0 AND :w1 GROUP BY c.instrument_id
"""


def window_losses(db_path: Path, lo: int, hi: int, period: float, w0: float, w1: float
                  ) -> dict[str, int]:
    """Due rows measured in [w0, w1] and sample periods lost in it, plus where the losses
    come from: ``cabinet_wide`` counts ticks that at least half of a cabinet's runs missed
    together (the loop or the instrument stalled for a period or more;
    ``cabinet_wide_at_phase_change`` when a set point changed on that cabinet just
    before); ``partial`` counts gaps of runs missing a period that most runs of their
    cabinet did not miss (runs whose due time sits within a few ms of the tick time lose
    a sample on small lateness or jitter). The scans run inside SQLite, which releases the
    GIL the engine in this process needs."""
    args = {"lo": lo, "hi": hi, "p": period, "w0": w0, "w1": w1}
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = con.execute(_COUNT_SQL, args).fetchall()
        gaps = con.execute(_GAPS_SQL, args).fetchall()
        edges = con.execute(_EDGES_SQL, args).fetchall()
        active = dict(con.execute(_ACTIVE_SQL, args).fetchall())
    finally:
        con.close()
    wide = at_change = partial = 0
    for inst in {i for i, _ in gaps}:
        ts = sorted(t for i, t in gaps if i == inst)
        changes = [t for i, t in edges if i == inst]
        clusters: list[list[float]] = []
        for t in ts:
            if clusters and t - clusters[-1][-1] <= period / 2:
                clusters[-1].append(t)
            else:
                clusters.append([t])
        for c in clusters:
            if len(c) >= 0.5 * active.get(inst, 1):
                wide += 1
                at_change += any(c[0] - 3 * period <= e <= c[-1] for e in changes)
            else:
                partial += len(c)
    return {"rows": sum(r[1] for r in rows), "lost": _lost(rows, period),
            "cabinet_wide": wide, "cabinet_wide_at_phase_change": at_change,
            "partial": partial, "phase_changes": len(edges)}


def final_check(db_path: Path, lo: int, hi: int, period: float, breach_ids: set[int],
                ends: list[float]) -> dict[str, Any]:
    """Whole-life check of a session's runs after they ended: sample periods lost from
    each run's start up to each of ``ends``, seq holes against the engine's own last_seq,
    end states."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        lost = [_lost(con.execute(_COUNT_SQL, {"lo": lo, "hi": hi, "w0": 0.0, "w1": w1}
                                  ).fetchall(), period) for w1 in ends]
        per_run = con.execute(
            "SELECT r.id, r.state, r.last_seq, r.ended_at, r.end_reason, "
            "COUNT(s.seq), MIN(s.seq), MAX(s.seq) FROM runs r "
            "LEFT JOIN samples s ON s.run_id = r.id WHERE r.id BETWEEN ? AND ? "
            "GROUP BY r.id", (lo, hi)).fetchall()
        safety = con.execute(
            "SELECT COUNT(*) FROM events WHERE kind = 'safety' AND run_id BETWEEN ? AND ?",
            (lo, hi)).fetchone()[0]
    finally:
        con.close()
    holes = 0
    bad: list[tuple[float, str]] = []  # (when, why) for runs that did not end as asked
    untripped = 0
    rows = 0
    for rid, state, last_seq, ended_at, reason, n, smin, smax in per_run:
        rows += int(n)
        # Rows the engine numbered (its own last_seq) that the database does not hold.
        h = max(int(last_seq or 0), int(smax or 0)) - int(n)
        if n and int(smin) != 1:
            h = max(h, 1)
        holes += h
        if rid in breach_ids and state == "stopped":
            untripped += 1  # stopped before its planned breach: a plan miss, not a loss
        elif state != ("aborted_safety" if rid in breach_ids else "stopped"):
            when = (datetime.fromisoformat(ended_at).replace(tzinfo=UTC).timestamp()
                    if ended_at else 0.0)
            bad.append((when, f"run {rid} ended {state}: {reason}"))
    return {"lost": lost, "holes": holes, "bad": bad, "untripped": untripped,
            "safety_events": int(safety), "rows": rows}


class Trial:
    """One cabinet count: a fresh AcquisitionNode and fresh runs on every channel of
    ``cabinets`` cabinets, one measured window under the standard API load, then every run
    stopped and its whole life checked in the database.

    Fresh runs per count keep the whole-life verdict honest: runs that lived through a
    lossy window at a larger count never count for a smaller one."""

    def __init__(self, lab: Lab, plan: Plan, cabinets: int, cpc: int | None = None) -> None:
        from labdaq.engine.clock import EngineClock
        from labdaq.engine.node import AcquisitionNode

        s = lab.settings
        self.lab = lab
        self.plan = plan
        self.period = plan.period_s
        self.cabinets = cabinets
        self.cpc = cpc or plan.cpc
        self.node = AcquisitionNode(
            lab.engine, EngineClock(1.0), poll_s=s.engine_poll_s,
            batch_rows=s.writer_batch_rows, batch_age_s=s.writer_batch_age_s,
            control_period_s=self.period, max_resume_gap_s=s.max_resume_gap_s,
            writer_process=s.writer_process,
        )
        self.ids: list[int] = []
        self.breach_ids: set[int] = set()
        self.final: dict[str, Any] = {}

    def _cabinet_channels(self, c: int) -> list[dict[str, Any]]:
        insts = {inst["name"]: inst for inst in self.lab.desc["instruments"]}
        return list(insts[f"cabinet{c}"]["channels"][: self.cpc])

    async def _create_runs(self) -> None:
        from labdaq.runs import RunCreate, create_run
        from labdaq.storage.db import session_scope

        plan = self.plan
        todo: list[tuple[dict[str, Any], bool, float]] = []
        for c in range(1, self.cabinets + 1):
            volts = await asyncio.to_thread(read_voltages, self.lab.ports[c - 1])
            for ch in self._cabinet_channels(c):
                brk = ch["index"] > self.cpc - plan.breach_per_cab
                todo.append((ch, brk, float(volts[ch["index"] - 1])))
        todo.sort(key=lambda x: x[1])  # breach runs last: claimed last
        nb = sum(1 for _, b, _ in todo if b)
        j = 0
        # A few dozen runs per transaction: all of them in one held SQLite's write lock
        # (and the sample writer's commits with it) past the writer's 5 s timeout.
        for c0 in range(0, len(todo), _CREATE_CHUNK):
            async with session_scope(self.lab.maker) as s:
                for ch, b, v0 in todo[c0: c0 + _CREATE_CHUNK]:
                    # A few distinct documents (caps on a 20 mV grid), not one per channel.
                    cap_v = min(CAP_MAX_V, round((v0 + CAP_ABOVE_V) / 0.02) * 0.02)
                    if b:
                        # The breach runs' clocks start about when the last run joins,
                        # i.e. settle_s before the window: spread their breaches over the
                        # window, two periods spare at its end.
                        span = max(0.0, plan.window_s - 2 * self.period)
                        doc = breach_doc(plan.settle_s + span * (j + 0.5) / nb, cap_v,
                                         v0 - BREACH_MARGIN_V)
                        j += 1
                    else:
                        doc = cycling_doc(cap_v, plan.cycle_s)
                    run = await create_run(
                        s, RunCreate(channel=ch["name"], cell_serial=ch["cell"]["serial"],
                                     protocol_document=doc, sample_period_s=self.period),
                        actor="acquisition_scale",
                        voltage_margin_v=self.lab.settings.safety_voltage_margin_v)
                    self.ids.append(run.id)
                    if b:
                        self.breach_ids.add(run.id)

    async def run(self) -> Step:
        t_trial = time.perf_counter()
        node = self.node
        plan = self.plan
        step = Step(hz=round(1 / self.period, 3), period_s=self.period,
                    cabinets=self.cabinets, channels=self.cabinets * self.cpc)
        task = asyncio.create_task(node.run_forever(), name="node")
        load: subprocess.Popen[str] | None = None
        w0 = w1 = 0.0
        try:
            await self._create_runs()
            step.new_runs = len(self.ids)
            log(f"  {self.cabinets} cab x {self.cpc} ch: {len(self.ids)} runs created in "
                f"{time.perf_counter() - t_trial:.1f} s")
            t_claim = time.perf_counter()
            deadline = t_claim + max(60.0, 1.0 * len(self.ids))
            # Every run claimed once: under load the first breach runs may have tripped
            # (and left node.active) before the last run joins.
            waiting = set(self.ids)
            while waiting:
                waiting -= node.active.keys()
                if time.perf_counter() > deadline or task.done():
                    raise RuntimeError(f"{len(waiting)} runs not started within "
                                       f"{deadline - t_claim:.0f} s")
                await asyncio.sleep(0.02)
            step.claim_s = time.perf_counter() - t_claim
            log(f"  all sampling after {time.perf_counter() - t_trial:.1f} s")
            spec = {"port": self.lab.api_port, "token": self.lab.token, "ids": self.ids,
                    "rate_hz": plan.api_rate_hz, "conns": plan.api_conns,
                    "kinds": plan.api_kinds,
                    "duration_s": plan.settle_s + plan.window_s + 0.5}
            load = self.lab.children.spawn(
                "api-load", [sys.executable, str(HERE), "--api-load", json.dumps(spec)],
                stdout=subprocess.PIPE, text=True)
            await asyncio.sleep(plan.settle_s)
            groups = list(node.groups.values())
            l0 = [len(g.lateness_s) for g in groups]
            b0 = [len(g.breach_to_ack_s) for g in groups]
            o0 = [len(g.breach_to_off_s) for g in groups]
            pids = {"engine": os.getpid(), "sim": self.lab.children.procs[0][1].pid,
                    "api": self.lab.children.procs[1][1].pid}
            cpu0 = {n: cpu_seconds(p) for n, p in pids.items()}
            m0 = machine_busy_s()
            wr = node.writer
            t0, w0 = time.perf_counter(), time.time()
            # Watch the writer's backlog through the window (cheap: attribute reads).
            pending_max = 0
            while time.perf_counter() - t0 < plan.window_s:
                pending_max = max(pending_max, wr.pending_rows)
                await asyncio.sleep(min(0.2, max(0.0, plan.window_s
                                                 - (time.perf_counter() - t0))))
            t1, w1 = time.perf_counter(), time.time()
            step.writer = {"pending_max": pending_max, "pending_end": wr.pending_rows,
                           "bound": wr.max_pending_rows}
            cpu1 = {n: cpu_seconds(p) for n, p in pids.items()}
            m1 = machine_busy_s()
            step.window = (w0, w1)
            step.cpu_pct = {n: round(100 * (cpu1[n] - cpu0[n]) / (t1 - t0), 1) for n in pids}
            # 200 % = both cores busy; "others" = CPU not charged to this run's processes
            # (other work on the machine, loopback softirq); the load client is
            # subtracted once it has reported.
            step.cpu_pct["machine"] = round(100 * (m1 - m0) / (t1 - t0), 1)
            for g, i0, j0, k0 in zip(groups, l0, b0, o0, strict=True):
                lat = g.lateness_s[i0:]
                step.lateness_s.extend(lat)
                step.ticks_over_period += sum(1 for x in lat if x > self.period)
                step.breach_to_ack_s.extend(g.breach_to_ack_s[j0:])
                step.breach_to_off_s.extend(g.breach_to_off_s[k0:])
            out, _ = await asyncio.to_thread(load.communicate, None, 30)
            lines = [x for x in (out or "").splitlines() if x.startswith("{")]
            step.api = (json.loads(lines[-1]) if lines
                        else {"error": self.lab.children.tail("api-load")})
            step.cpu_pct["api_load"] = float(step.api.get("cpu_pct", 0.0))
            ours = sum(v for n, v in step.cpu_pct.items() if n != "machine")
            step.cpu_pct["others"] = round(max(0.0, step.cpu_pct["machine"] - ours), 1)
            # Rows of the window are committed by now (flush), then counted in SQL.
            await node.writer.flush()
            wl = await asyncio.to_thread(window_losses, self.lab.db_path, min(self.ids),
                                         max(self.ids), self.period, w0, w1)
            step.window_rows, step.window_lost = wl.pop("rows"), wl.pop("lost")
            step.phase_changes = wl.pop("phase_changes")
            step.loss_causes = wl
            # Stored = due rows committed for the window's periods, counted in the
            # database (edge rows after a set-point change are extra readings).
            step.stored_per_s = step.window_rows / (w1 - w0)
            log(f"  window counted after {time.perf_counter() - t_trial:.1f} s")
        finally:
            if load is not None:
                self.lab.children.stop(load)
            await self._close(task)
            log(f"  runs and node stopped after {time.perf_counter() - t_trial:.1f} s")
        f = await asyncio.to_thread(final_check, self.lab.db_path, min(self.ids),
                                    max(self.ids), self.period, self.breach_ids, [w1])
        self.final = f
        w = node.writer
        step.life_lost = f["lost"][0]
        step.holes = f["holes"]
        bad = [why for _, why in f["bad"]]
        if step.window_lost:
            step.why += f" {step.window_lost} sample periods lost in the window;"
        if step.life_lost:
            step.why += f" {step.life_lost} sample periods lost since the runs started;"
        if step.holes:
            step.why += f" {step.holes} seq holes;"
        if bad:
            step.why += f" {len(bad)} runs ended badly ({bad[0]});"
        if f["untripped"]:
            step.why += f" {f['untripped']} breach runs stopped before their breach;"
        if w.rows_dropped or w.rows_rejected:
            step.why += f" writer dropped {w.rows_dropped} rejected {w.rows_rejected};"
        step.lossless = (step.window_lost == 0 and step.life_lost == 0 and step.holes == 0
                         and not bad and not w.rows_dropped and not w.rows_rejected
                         and step.window_rows > 0)
        step.trial_s = time.perf_counter() - t_trial
        return step

    async def _close(self, task: asyncio.Task[None]) -> None:
        """Stop every run, then the node (its writer flushes and exits)."""
        node = self.node
        try:
            if self.ids:
                await stop_runs(self.lab, self.ids)
                end = time.monotonic() + 60
                while node.active and time.monotonic() < end:
                    await asyncio.sleep(0.05)
        finally:
            node.request_stop()
            try:
                await asyncio.wait_for(task, 60)
            except Exception as exc:  # noqa: BLE001 - report, carry on with the checks
                log(f"  node did not stop cleanly: {exc!r}")


async def stop_runs(lab: Lab, ids: list[int]) -> None:
    """What POST /runs/{id}/stop does to a running run, for all of them in one statement."""
    from sqlalchemy import update

    from labdaq.storage import models as m
    from labdaq.storage.db import session_scope

    async with session_scope(lab.maker) as s:
        await s.execute(
            update(m.Run)
            .where(m.Run.id.in_(ids), m.Run.state.in_(["running", "paused"]))
            .values(requested_action="stop")
        )


# ---------------------------------------------------------------------------------------
# parent: main
# ---------------------------------------------------------------------------------------


@dataclass
class Plan:
    cpc: int  # channels used per 64-channel cabinet
    period_s: float  # sample period = control period
    max_cabinets: int  # the simulated lab's size: the search's upper bound
    start_cabinets: int  # first count tried; 0 = the last run's lossless count
    window_s: float
    settle_s: float  # after the last run joined, before the window opens
    cycle_s: float  # one CC-CV charge + discharge cycle of an ordinary channel
    breach_per_cab: int
    api_rate_hz: float  # the standard API load: open-loop requests per second
    api_conns: int
    bare_s: float  # the bare loop's measured window (after 0.5 s warm-up)
    sim_ceiling_s: float
    budget_s: float  # for the search: no trial starts if its estimated end is past this
    min_channels: int = 8  # on one cabinet, when a whole one is not lossless
    api_kinds: tuple[str, ...] | None = None  # part of API_MIX to send; None: all of it


FULL = Plan(cpc=64, period_s=0.01, max_cabinets=20, start_cabinets=0, window_s=10.0,
            settle_s=2.0, cycle_s=20.0, breach_per_cab=2, api_rate_hz=50.0, api_conns=8,
            bare_s=30.0, sim_ceiling_s=4.0, budget_s=180.0)
QUICK = Plan(cpc=8, period_s=0.01, max_cabinets=2, start_cabinets=2, window_s=2.0,
             settle_s=1.0, cycle_s=2.0, breach_per_cab=1, api_rate_hz=20.0, api_conns=4,
             bare_s=1.5, sim_ceiling_s=1.0, budget_s=40.0, min_channels=4)
# The last lossless count of a full run on this machine: the next search starts there.
LAST_PATH = Path(tempfile.gettempdir()) / "labdaq-acquisition-scale-last.json"


def apply_overrides(plan: Plan, items: list[str]) -> Plan:
    """``--set field=value`` for exploring other configurations."""
    for item in items:
        key, _, text = item.partition("=")
        current = getattr(plan, key)  # AttributeError names an unknown field
        plan = replace(plan, **{key: type(current)(text)})
    return plan


def next_count(lo: int, hi: int, top: int) -> int | None:
    """The next cabinet count to try, knowing ``lo`` lossless (0: none yet) and ``hi``
    lossy (``top + 1``: none yet); None when they meet. Doubles up while nothing was
    lossy, bisects once something was."""
    if lo + 1 >= hi:
        return None
    if hi > top:
        return min(top, max(lo + 1, 2 * lo))
    return (lo + hi) // 2


async def search(lab: Lab, plan: Plan, t_start: float) -> list[Step]:
    """Trials from ``start`` on: up while lossless, bisecting after the first loss."""
    top = min(plan.max_cabinets, len(lab.ports))
    start = plan.start_cabinets
    if not start:
        try:
            start = int(json.loads(LAST_PATH.read_text())["cabinets"])
        except (OSError, ValueError, KeyError, TypeError):
            # No earlier run here: a small count first (a large one under load takes
            # minutes just to start its runs); doubling reaches the top in a few trials.
            start = min(4, top)
    k: int | None = max(1, min(top, start))
    lo, hi = 0, top + 1
    steps: list[Step] = []
    t_phase = time.perf_counter()
    per_run_s = 0.05  # claim + stop per run, first guess; measured from then on
    while k is not None:
        est = k * plan.cpc * per_run_s + plan.settle_s + plan.window_s + 8
        if steps and time.perf_counter() - t_phase + est > plan.budget_s:
            log(f"search: {k} cabinets not tried (time budget {plan.budget_s:g} s)")
            break
        st = await Trial(lab, plan, k).run()
        steps.append(st)
        per_run_s = max(0.0, st.trial_s - plan.settle_s - plan.window_s) / max(1, st.new_runs)
        log(f"[{time.perf_counter() - t_start:5.1f} s]" + st.line())
        if st.lossless:
            lo = k
        else:
            hi = k
        k = next_count(lo, hi, top)
    # Not even one whole cabinet: halve the channels of one cabinet (a figure above zero
    # says how far off the target is) down to min_channels.
    cpc = plan.cpc // 2
    while lo == 0 and steps and cpc >= max(plan.min_channels, plan.breach_per_cab + 1):
        est = cpc * per_run_s + plan.settle_s + plan.window_s + 8
        if time.perf_counter() - t_phase + est > plan.budget_s:
            log(f"search: 1 cabinet x {cpc} ch not tried (time budget {plan.budget_s:g} s)")
            break
        st = await Trial(lab, plan, 1, cpc).run()
        steps.append(st)
        log(f"[{time.perf_counter() - t_start:5.1f} s]" + st.line())
        if st.lossless:
            break
        cpc //= 2
    return steps


async def _sim_ceiling(lab: Lab, plan: Plan, cabinets: int) -> dict[str, Any]:
    """Readings/s the simulator serves to raw clients asking back to back (nothing
    stored), and its CPU meanwhile."""
    sim_pid = lab.children.procs[0][1].pid
    c0, t0 = cpu_seconds(sim_pid), time.perf_counter()
    out = await asyncio.to_thread(
        run_child_json, lab.children, "sim-ceiling",
        ["--bare", json.dumps({"ports": lab.ports[:cabinets], "duration_s": plan.sim_ceiling_s,
                               "warmup_s": 0.5, "store": False,
                               "db": str(lab.db_path.parent / "none.db")})],
        plan.sim_ceiling_s + 60)
    # Over the child's whole life (its start-up included): a lower bound of the sim's share.
    out["sim_cpu_pct"] = 100 * (cpu_seconds(sim_pid) - c0) / (time.perf_counter() - t0)
    out["cabinets"] = cabinets
    # Readings per CPU-second of the simulator: on a shared machine the sim may not get a
    # whole core, so this says what one core of it would serve.
    out["per_sim_cpu_s"] = (out["acquired_per_s"] / (out["sim_cpu_pct"] / 100)
                            if out["sim_cpu_pct"] > 0 else None)
    return out


async def _bare(lab: Lab, plan: Plan, cabinets: int) -> dict[str, Any]:
    sim_pid = lab.children.procs[0][1].pid
    c0, t0 = cpu_seconds(sim_pid), time.perf_counter()
    b = await asyncio.to_thread(
        run_child_json, lab.children, "bare",
        ["--bare", json.dumps({"ports": lab.ports[:cabinets], "duration_s": plan.bare_s,
                               "warmup_s": 0.5, "db": str(lab.db_path.parent / "bare.db")})],
        plan.bare_s + 60)
    b["sim_cpu_pct"] = 100 * (cpu_seconds(sim_pid) - c0) / (time.perf_counter() - t0)
    b["cabinets"] = cabinets
    return b


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def _phases(args: argparse.Namespace, plan: Plan, lab: Lab, t_start: float) -> None:
    load0 = loadavg()
    # CPU the machine spends on other work before we start (our idle children included):
    # the 2 cores are shared, so a busy machine makes every number below worse.
    m0, t0 = machine_busy_s(), time.perf_counter()
    await asyncio.sleep(1.0)
    background = 100 * (machine_busy_s() - m0) / (time.perf_counter() - t0)
    log(f"background CPU before the run: {background:.0f} % of 200 %, load average "
        f"{load0}" + (" -- the machine is busy, expect worse numbers" if background > 20
                      else ""))
    top = min(plan.max_cabinets, len(lab.ports))
    # 1. The simulator's own ceiling (every cabinet of the lab, back to back).
    ceiling = await _sim_ceiling(lab, plan, top)
    log(f"simulator ceiling, {top} cabinets x 64 ch asked back to back: "
        f"{ceiling['acquired_per_s']:,.0f} channel-readings/s served (client cpu "
        f"{ceiling['cpu_pct']:.0f} %, simulator >= {ceiling['sim_cpu_pct']:.0f} %: "
        f"{(ceiling['per_sim_cpu_s'] or 0):,.0f} readings per simulator CPU-second)")
    # 2. The search.
    steps = await search(lab, plan, t_start)
    ok = [s for s in steps if s.lossless]
    head = max(ok, key=lambda s: s.stored_per_s, default=None)
    lossy = max((s for s in steps if not s.lossless), key=lambda s: s.stored_per_s,
                default=None)
    # Secondary: none lost inside the window (losses before it, e.g. while runs joined,
    # allowed). Never the headline.
    in_window = max((s for s in steps if s.window_lost == 0 and s.window_rows > 0),
                    key=lambda s: s.stored_per_s, default=None)
    if steps and not args.quick and not args.set:
        # Nothing lossless: the next search starts from one cabinet.
        LAST_PATH.write_text(json.dumps({"cabinets": head.cabinets if head else 1,
                                         "when": datetime.now(UTC).isoformat()}))
    # 3. The bare loop over the headline's cabinets (the smallest tried if none was
    # lossless), same wire format.
    bare_k = head.cabinets if head else min((s.cabinets for s in steps), default=1)
    bare = await _bare(lab, plan, bare_k)
    log(f"bare loop, {bare_k} cabinets x 64 ch, {plan.bare_s:g} s: stored "
        f"{bare['stored_per_s']:,.0f} channel-samples/s (acquired "
        f"{bare['acquired_per_s']:,.0f}/s, loop process cpu {bare['cpu_pct']:.0f} %, "
        f"simulator >= {bare['sim_cpu_pct']:.0f} %)")
    load1 = loadavg()

    value = head.stored_per_s if head else 0.0
    ratio = value / bare["stored_per_s"] if bare["stored_per_s"] else 0.0
    lat_max = pct(head.lateness_s, 100) if head else None
    ack99 = pct(head.breach_to_ack_s, 99) if head else None
    hz = round(1 / plan.period_s, 3)

    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1f} ms"

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    period_ms = plan.period_s * 1e3
    api = head.api if head else {}
    beside = (f"; with losses: {lossy.stored_per_s:,.0f}/s at {lossy.channels} ch "
              f"with {lossy.lost:,} lost" if lossy else "")
    if in_window is not None and not in_window.lossless:
        beside += (f"; none lost inside the window only: {in_window.stored_per_s:,.0f}/s at "
                   f"{in_window.channels} ch (with {in_window.lost:,} lost over the runs' "
                   f"lives)")
    trials = ", ".join(f"{s.channels} ch " + ("lossless" if s.lossless
                                               else f"with {s.lost:,} lost")
                       for s in steps)
    headline = (
        f"largest rate stored with ZERO missed periods at {hz:g} Hz: {value:,.0f} "
        f"channel-samples/s ({head.channels if head else 0} channels, "
        f"{head.cabinets if head else 0} cabinets; every channel cycling CC-CV, "
        f"{plan.breach_per_cab} breach channels per cabinet, standard API load "
        f"{plan.api_rate_hz:g} req/s open loop, got {api.get('req_per_s', 'n/a')} req/s, "
        f"p99 {api.get('p99_ms', 'n/a')} ms) = {ratio:.2f}x the bare loop "
        f"{bare['stored_per_s']:,.0f}/s "
        f"({bare_k} cabinets, {plan.bare_s:g} s); that window: max loop lateness "
        f"{ms(lat_max)}, breach-to-acknowledgement p99 {ms(ack99)} over "
        f"{len(head.breach_to_ack_s) if head else 0} breaches{beside}; simulator ceiling "
        f"{ceiling['acquired_per_s']:,.0f} readings/s served back to back "
        f"({(ceiling['per_sim_cpu_s'] or 0):,.0f} per simulator CPU-second; the simulator "
        f"used {head.cpu_pct.get('sim') if head else 'n/a'} % of a core in the headline "
        f"window); trials: {trials}; load average "
        f"{load0} -> {load1}. Targets: >=100k/s {met(value >= 1e5)}, >=0.3x bare "
        f"{met(ratio >= 0.3)}, max lateness < {period_ms:g} ms "
        f"{met(lat_max is not None and lat_max < period_ms)}, breach-to-ack p99 <= 2 ms "
        f"{met(ack99 is not None and ack99 <= 2)}."
    )
    note = (
        f"Engine in this benchmark process (AcquisitionNode; its sample writer in a child "
        f"process, as `labdaq engine` runs it); sim, API and API load in separate "
        f"processes; speed 1; SQLite; 2 cores shared by all. Stored = due rows committed "
        f"for the window's periods, counted in the database; lossless = no period lost in "
        f"the window nor in any run's life up to its end, no seq hole, every run ended as "
        f"asked. Each cabinet count is a fresh node with fresh runs ({plan.cpc} ch per "
        f"cabinet, {plan.window_s:g} s window after {plan.settle_s:g} s settle; CC-CV "
        f"cycles of {plan.cycle_s:g} s). API mix: {', '.join(k for k, _ in API_MIX)}. "
        f"Bare = asyncio streams + REAL,32 parse + 8-col sqlite3 executemany(10k) in a "
        f"writer thread. Total {time.perf_counter() - t_start:.0f} s."
    )
    result(
        "engine_lossless_channel_samples",
        value,
        "channel-samples/s",
        bare["stored_per_s"],
        hz=hz,
        lossless_channels=head.channels if head else 0,
        lossless_cabinets=head.cabinets if head else 0,
        lateness_max_ms=lat_max,
        lateness_p99_ms=pct(head.lateness_s, 99) if head else None,
        breach_to_ack_p99_ms=ack99,
        breach_to_off_p99_ms=pct(head.breach_to_off_s, 99) if head else None,
        breaches=len(head.breach_to_ack_s) if head else 0,
        api_load=api,
        with_losses={"stored_per_s": round(lossy.stored_per_s, 1),
                     "channels": lossy.channels, "lost": lossy.lost} if lossy else None,
        none_lost_in_window={"stored_per_s": round(in_window.stored_per_s, 1),
                             "channels": in_window.channels,
                             "lost_over_lives": in_window.lost} if in_window else None,
        bare=bare,
        sim_ceiling=ceiling,
        trials=[s.summary() for s in steps],
        background_cpu_pct=round(background, 1),
        loadavg_before=load0,
        loadavg_after=load1,
        quick=args.quick,
        note=note,
        headline=headline,
    )


async def main_async(args: argparse.Namespace, plan: Plan, lab: Lab, t_start: float) -> None:
    from labdaq.storage.db import create_engine, sessionmaker

    lab.engine = create_engine(lab.url)
    lab.maker = sessionmaker(lab.engine)
    try:
        await _phases(args, plan, lab, t_start)
    finally:
        await lab.engine.dispose()


def start_lab(children: Children, tmp: Path, cabinets: int) -> Lab:
    """Database, simulated lab (its own process), registration, token, API (its own
    process); returns when the API answers."""
    from labdaq.cli import _register_sim_lab
    from labdaq.config import load_settings
    from labdaq.storage.db import upgrade

    settings = load_settings(data_dir=tmp)
    url = settings.resolved_database_url
    desc_path = tmp / "simlab.json"
    # stdout is this program's result line: the children's goes nowhere.
    sim = children.spawn("sim", processes.sim_argv(
        desc_path, "--smus", "0", "--cabinets", str(cabinets), "--cabinet-channels",
        str(CHANNELS), "--speed", "1"), stdout=subprocess.DEVNULL)
    upgrade(url)
    api_port = free_port()
    api = children.spawn("api", processes.labdaq_argv(
        "api", "--port", str(api_port), "--data-dir", str(tmp)), stdout=subprocess.DEVNULL)
    try:
        desc = processes.read_sim_description(desc_path, sim, timeout_s=60)
    except processes.ChildFailed as exc:
        raise RuntimeError(f"simulator did not start ({exc}): {children.tail('sim')}") from None
    asyncio.run(_register_sim_lab(url, desc))
    token = asyncio.run(_make_token(url))
    processes.wait_for_http("127.0.0.1", api_port, "/health", 60, api)
    ports = [int(inst["resource"].split("::")[2]) for inst in desc["instruments"]]
    return Lab(url=url, db_path=Path(url.split("sqlite:///", 1)[1]), desc=desc, ports=ports,
               api_port=api_port, token=token, children=children, settings=settings)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (about a minute)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a plan field (see Plan), e.g. --set start_cabinets=8")
    ap.add_argument("--keep", action="store_true",
                    help="keep the data directory (database, child logs) for inspection")
    ap.add_argument("--api-load", help=argparse.SUPPRESS)
    ap.add_argument("--bare", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.api_load:
        api_load_main(args.api_load)
        return
    if args.bare:
        bare_main(args.bare)
        return
    t_start = time.perf_counter()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM (run_all's time limit): stop every child, then exit at once.
    def _terminated(signum: int, _frame: Any) -> None:
        # Not sys.exit: unwinding through the running loop waits for the node's tasks.
        log(f"terminated by signal {signum}: stopping the children, no result")
        children.stop_all(timeout_s=3.0)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        os._exit(128 + signum)

    plan = apply_overrides(QUICK if args.quick else FULL, args.set)
    cabinets = plan.max_cabinets
    tmp = Path(tempfile.mkdtemp(prefix="labdaq-acqscale-"))
    children = Children(tmp)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        lab = start_lab(children, tmp, cabinets)
        log(f"simulated lab: {len(lab.ports)} cabinets x {CHANNELS} channels; API on "
            f"127.0.0.1:{lab.api_port}; data in {tmp}; ready after "
            f"{time.perf_counter() - t_start:.1f} s")
        asyncio.run(main_async(args, plan, lab, t_start))
    finally:
        children.stop_all()
        if args.keep:
            log(f"data kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


async def _make_token(url: str) -> str:
    """An engineer token (read access) for the load client, via labdaq.auth."""
    from labdaq.auth import create_token
    from labdaq.storage.db import create_engine, session_scope, sessionmaker

    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            return await create_token(s, "acquisition-scale-load", "engineer")
    finally:
        await engine.dispose()


if __name__ == "__main__":
    main()
