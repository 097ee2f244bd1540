"""Acquisition at scale: channels sustained, stored samples/s, loop lateness, breach-to-off.

One job: measure labdaq's acquisition engine end to end, through real sockets, against
simulated 64-channel cabinets served by a SEPARATE ``python -m labdaq.cli sim`` process at
speed 1 (real time), storing into SQLite, while the API (``python -m labdaq.cli api``, its
own process) is hammered by a load-client process doing a bounded number of
``GET /api/v1/runs/{id}`` requests.

Process layout (the engine's view of the 2 cores is what is measured)::

    this process ─ orchestration + AcquisitionNode (in-process: lateness and breach-to-off
                   are read straight from InstrumentGroup.lateness_s / breach_to_off_s)
    child        ─ labdaq sim   (K cabinets x 64 channels, TCP, speed 1)
    child        ─ labdaq api   (uvicorn, same SQLite file)
    child        ─ load client  (this file --hammer: raw keep-alive HTTP, bounded count)
    child        ─ bare loop    (this file --bare: the ceiling, see below)

Phases, all in one run:

1. Bare ceiling: asyncio streams send ``MEAS:ALL? (@1:64)`` to the same simulated
   cabinets back to back, ``np.array(reply.split(','), float).reshape(64, 5)``, long rows
   into ``sqlite3.executemany`` in 10k batches in a writer thread (research/perf-anchors.md
   §2). Stored/s = rows committed during a steady window / its length.
2. labdaq pushed as fast as it goes: K_push cabinets, every channel a ``rest`` run with a
   tiny sample period (= control period), no API load (same conditions as the bare loop).
   Stored/s = SampleWriter.rows_written during the window / its length.
3. Sustained search under API load, at 10 Hz and at 1 Hz sample period (control period set
   equal): K cabinets x 64 channels, one run per channel (long ``rest``), a few channels
   per cabinet run ``rest`` then a ``cc`` discharge whose protocol ``safety.min_voltage_v``
   sits just below the cell's present voltage, so the software interlock trips during the
   window. A configuration is *sustained* when, for every run, the stored rows equal the
   expected rows: seq contiguous from 1 to the engine's own last_seq (nothing lost between
   engine and database) and no missed sample period (no gap of two periods or more in
   ``t_s``), the run ended as asked (stopped, or aborted_safety for breach runs), and the
   writer dropped and rejected nothing.

The last stdout line is one JSON object (benchmarks/_common.py); human-readable lines go to
stderr. Everything uses 127.0.0.1, every loop is bounded and every child is stopped in a
``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import logging
import math
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import result  # noqa: E402

CHANNELS = 64
MEAS_CMD = f"MEAS:ALL? (@1:{CHANNELS})\n".encode()
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
HERE = Path(__file__).resolve()
# The breach discharge: 1C of the simulated NMC811 cell (4.9 Ah, R0 20 mOhm) pulls the
# terminal voltage ~0.1 V below its rest value at once; the safety floor sits 30 mV below
# the rest voltage, so the rest never trips it and the first discharge tick does.
BREACH_CURRENT_A = -4.9
BREACH_MARGIN_V = 0.03


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------------------------------
# child: API load client
# ---------------------------------------------------------------------------------------


async def _hammer(port: int, token: str, ids: list[int], max_requests: int,
                  duration_s: float, conns: int) -> dict[str, Any]:
    """Keep-alive HTTP/1.1 over raw asyncio streams: httpx itself saturates a core at a few
    hundred requests/s here (perf-anchors §5), which would measure the client."""
    lat: list[float] = []
    errors = 0
    statuses: dict[int, int] = {}
    sent = 0
    end = time.perf_counter() + duration_s

    async def worker(w: int) -> None:
        nonlocal sent, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            j = w
            while sent < max_requests and time.perf_counter() < end:
                sent += 1
                rid = ids[j % len(ids)]
                j += conns
                req = (f"GET /api/v1/runs/{rid} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       f"Authorization: Bearer {token}\r\n\r\n").encode()
                t0 = time.perf_counter()
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                code = int(lines[0].split()[1])
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                await reader.readexactly(length)
                lat.append(time.perf_counter() - t0)
                statuses[code] = statuses.get(code, 0) + 1
                if code != 200:
                    errors += 1
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(conns)))
    wall = time.perf_counter() - t0
    return {
        "requests": len(lat), "errors": errors, "wall_s": round(wall, 3),
        "req_per_s": round(len(lat) / wall, 1) if wall > 0 else 0.0,
        "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "statuses": statuses,
    }


def hammer_main(spec: str) -> None:
    a = json.loads(spec)
    out = asyncio.run(_hammer(a["port"], a["token"], a["ids"], a["max_requests"],
                              a["duration_s"], a["conns"]))
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------
# child: bare ceiling
# ---------------------------------------------------------------------------------------


def bare_main(spec: str) -> None:
    """Minimal socket -> numpy -> sqlite3 loop (perf-anchors §2), rows committed/s."""
    a = json.loads(spec)
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
    wt.start()
    queries = [0]

    async def poll(j: int, port: int, end: float) -> None:
        reader, w = await asyncio.open_connection("127.0.0.1", port)
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while time.perf_counter() < end:
                w.write(MEAS_CMD)
                line = await reader.readline()
                arr = np.array(line.split(b","), float).reshape(CHANNELS, 5)
                t = time.time()
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
        q.put(None)
        wt.join(timeout=30)
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------
# parent: children
# ---------------------------------------------------------------------------------------


class Children:
    """Every child process we start; all stopped in ``stop_all`` (SIGTERM, then kill)."""

    def __init__(self, log_dir: Path) -> None:
        self.procs: list[tuple[str, subprocess.Popen[str]]] = []
        self.log_dir = log_dir

    def spawn(self, name: str, args: list[str], stdout: Any = subprocess.DEVNULL
              ) -> subprocess.Popen[str]:
        err = (self.log_dir / f"{name}.stderr").open("w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, *args], stdout=stdout, stderr=err,
                                stdin=subprocess.DEVNULL, text=True, env=env)
        err.close()
        self.procs.append((name, proc))
        return proc

    def tail(self, name: str) -> str:
        path = self.log_dir / f"{name}.stderr"
        return path.read_text()[-2000:] if path.exists() else ""

    def stop(self, proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def stop_all(self) -> None:
        for _name, proc in reversed(self.procs):
            self.stop(proc)


def run_child_json(children: Children, name: str, args: list[str], timeout_s: float
                   ) -> dict[str, Any]:
    """Run a child of this file to completion (bounded) and return its JSON line."""
    proc = children.spawn(name, [str(HERE), *args], stdout=subprocess.PIPE)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        children.stop(proc)
    lines = [x for x in (out or "").splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed ({proc.returncode}): {children.tail(name)}")
    data: dict[str, Any] = json.loads(lines[-1])
    return data


def wait_for_http(port: int, path: str, deadline_s: float, proc: subprocess.Popen[str]) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"API exited with {proc.returncode}")
        try:
            con = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            con.request("GET", path)
            if con.getresponse().status == 200:
                con.close()
                return
            con.close()
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"API did not answer {path} within {deadline_s} s")


def read_voltages(port: int) -> np.ndarray:
    """Present terminal voltage of the cabinet's 64 channels (one raw MEAS:ALL?)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(MEAS_CMD)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("simulator closed the connection")
            buf += chunk
    return np.array(buf.split(b","), float).reshape(CHANNELS, 5)[:, 0]


# ---------------------------------------------------------------------------------------
# parent: one engine configuration
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
class ConfigResult:
    hz: float
    cabinets: int
    channels: int
    period_s: float
    load: bool
    ok: bool = False
    why: str = ""
    stored_per_s: float = 0.0
    window_s: float = 0.0
    stored_rows: int = 0
    expected_rows: int = 0
    lost_periods: int = 0
    seq_holes: int = 0
    lateness_s: list[float] = field(default_factory=list)
    ticks_late_over_period: int = 0
    breach_to_off_s: list[float] = field(default_factory=list)
    breach_runs: int = 0
    safety_events: int = 0
    api: dict[str, Any] = field(default_factory=dict)
    cpu_pct: dict[str, float] = field(default_factory=dict)
    claim_s: float = 0.0
    drain_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "hz": self.hz, "channels": self.channels, "ok": self.ok,
            "stored_per_s": round(self.stored_per_s, 1),
            "stored_rows": self.stored_rows, "expected_rows": self.expected_rows,
            "lateness_p99_ms": pct(self.lateness_s, 99),
            "breaches": len(self.breach_to_off_s),
            "api_req_per_s": self.api.get("req_per_s"),
            **({"why": self.why} if self.why else {}),
        }


def rest_doc(rest_s: float) -> dict[str, Any]:
    return {"schema_version": 1, "name": f"bench-rest-{rest_s:g}s",
            "steps": [{"step": "rest", "until": {"duration_s": rest_s}}]}


def breach_doc(rest_s: float, floor_v: float) -> dict[str, Any]:
    """Rest, then a 1C discharge that the protocol's safety floor stops at its first tick."""
    return {
        "schema_version": 1, "name": f"bench-breach-{rest_s:.2f}s",
        "safety": {"min_voltage_v": round(floor_v, 4)},
        "steps": [
            {"step": "rest", "until": {"duration_s": rest_s}},
            {"step": "cc", "current_a": BREACH_CURRENT_A, "until": {"duration_s": 600}},
        ],
    }


async def create_runs(lab: Lab, k: int, period: float, breach_per_cab: int,
                      breach_at_s: list[float]) -> tuple[list[int], set[int]]:
    """One run per channel of cabinets 1..k; breach runs last (claimed last, so their run
    clock starts when every other run is already sampling)."""
    from labdaq.runs import RunCreate, create_run
    from labdaq.storage.db import session_scope

    insts = {inst["name"]: inst for inst in lab.desc["instruments"]}
    normal: list[tuple[dict[str, Any], dict[str, Any]]] = []
    breach: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for c in range(1, k + 1):
        volts = await asyncio.to_thread(read_voltages, lab.ports[c - 1])
        chans = insts[f"cabinet{c}"]["channels"]
        for ch in chans:
            if ch["index"] > CHANNELS - breach_per_cab:
                floor_v = float(volts[ch["index"] - 1]) - BREACH_MARGIN_V
                breach.append((ch, breach_doc(breach_at_s[len(breach) % len(breach_at_s)],
                                              floor_v)))
            else:
                normal.append((ch, rest_doc(24 * 3600.0)))
    ids: list[int] = []
    breach_ids: set[int] = set()
    async with session_scope(lab.maker) as s:
        for is_breach, group in ((False, normal), (True, breach)):
            for ch, doc in group:
                run = await create_run(
                    s,
                    RunCreate(channel=ch["name"], cell_serial=ch["cell"]["serial"],
                              protocol_document=doc, sample_period_s=period),
                    actor="acquisition_scale",
                    voltage_margin_v=lab.settings.safety_voltage_margin_v,
                )
                ids.append(run.id)
                if is_breach:
                    breach_ids.add(run.id)
    return ids, breach_ids


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


def verify(db_path: Path, ids: list[int], breach_ids: set[int], period: float
           ) -> dict[str, Any]:
    """Stored rows vs expected rows per run (see module docstring, phase 3)."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        lo, hi = min(ids), max(ids)
        runs = {r[0]: r for r in con.execute(
            "SELECT id, state, last_seq, end_reason FROM runs WHERE id BETWEEN ? AND ?",
            (lo, hi))}
        data = np.array(con.execute(
            "SELECT run_id, seq, t_s FROM samples WHERE run_id BETWEEN ? AND ? "
            "ORDER BY run_id, seq", (lo, hi)).fetchall(), float).reshape(-1, 3)
        events = con.execute(
            "SELECT COUNT(*) FROM events WHERE kind = 'safety' AND run_id BETWEEN ? AND ?",
            (lo, hi)).fetchone()[0]
    finally:
        con.close()
    bounds = np.searchsorted(data[:, 0], np.asarray(ids, float), side="left")
    ends = np.searchsorted(data[:, 0], np.asarray(ids, float), side="right")
    stored = expected = lost_total = holes_total = 0
    problems: list[str] = []
    for rid, b, e in zip(ids, bounds.tolist(), ends.tolist(), strict=True):
        seq = data[b:e, 1].astype(np.int64)
        t = data[b:e, 2]
        state, last_seq = runs[rid][1], int(runs[rid][2] or 0)
        want_state = "aborted_safety" if rid in breach_ids else "stopped"
        if state != want_state:
            problems.append(f"run {rid} ended {state} ({runs[rid][3]}), expected {want_state}")
        # Rows the engine numbered but the database does not hold (or never got).
        holes = max(last_seq, int(seq.max()) if seq.size else 0) - seq.size
        if seq.size and (seq[0] != 1 or np.any(np.diff(seq) != 1)):
            holes = max(holes, 1)
        # Sample periods with no row: the first gap (edge sample at start -> first due
        # tick) may legitimately be up to two periods, later gaps one period.
        gaps = np.diff(t)
        lost = 0
        if gaps.size:
            lost += max(0, math.ceil(gaps[0] / period - 2.5))
            lost += int(np.maximum(np.rint(gaps[1:] / period) - 1, 0).sum())
        stored += seq.size
        expected += seq.size + holes + lost
        lost_total += lost
        holes_total += holes
    return {"stored": stored, "expected": expected, "lost": lost_total, "holes": holes_total,
            "problems": problems, "safety_events": int(events)}


async def run_config(lab: Lab, k: int, period: float, window_s: float, load: bool,
                     breach_per_cab: int, hammer_conns: int) -> ConfigResult:
    """Start a fresh node, run one run per channel on k cabinets, measure a steady window
    (with the API hammered if ``load``), stop, verify."""
    from labdaq.engine.clock import EngineClock
    from labdaq.engine.node import AcquisitionNode

    res = ConfigResult(hz=round(1 / period, 3), cabinets=k, channels=k * CHANNELS,
                       period_s=period, load=load)
    settle_s = 1.0
    nb = breach_per_cab * k
    # Breaches spread over the window (run clock of the breach runs starts ~settle_s
    # before the window, when the last run joins).
    breach_at = [settle_s + window_s * (j + 0.5) / nb for j in range(nb)] if nb else [0.0]
    ids, breach_ids = await create_runs(lab, k, period, breach_per_cab, breach_at)
    res.breach_runs = len(breach_ids)
    s = lab.settings
    node = AcquisitionNode(
        lab.engine, EngineClock(1.0), poll_s=s.engine_poll_s, batch_rows=s.writer_batch_rows,
        batch_age_s=s.writer_batch_age_s, control_period_s=period,
        max_resume_gap_s=s.max_resume_gap_s,
    )
    task = asyncio.create_task(node.run_forever(), name="node")
    hammer: subprocess.Popen[str] | None = None
    try:
        t_claim = time.perf_counter()
        deadline = t_claim + 120
        while len(node.active) < len(ids):
            if time.perf_counter() > deadline or task.done():
                raise RuntimeError(f"only {len(node.active)} of {len(ids)} runs started")
            await asyncio.sleep(0.02)
        res.claim_s = time.perf_counter() - t_claim
        if load:
            spec = {"port": lab.api_port, "token": lab.token, "ids": ids,
                    "max_requests": int(5000 * (settle_s + window_s + 1)),
                    "duration_s": settle_s + window_s + 0.5, "conns": hammer_conns}
            hammer = lab.children.spawn("hammer", [str(HERE), "--hammer", json.dumps(spec)],
                                        stdout=subprocess.PIPE)
        await asyncio.sleep(settle_s)
        groups = list(node.groups.values())
        late0 = [len(g.lateness_s) for g in groups]
        br0 = [len(g.breach_to_off_s) for g in groups]
        pids = {"engine": os.getpid(), "sim": lab.children.procs[0][1].pid,
                "api": lab.children.procs[1][1].pid}
        cpu0 = {n: cpu_seconds(p) for n, p in pids.items()}
        rows0, t0 = node.writer.rows_written, time.perf_counter()
        await asyncio.sleep(window_s)
        rows1, t1 = node.writer.rows_written, time.perf_counter()
        cpu1 = {n: cpu_seconds(p) for n, p in pids.items()}
        res.window_s = t1 - t0
        res.stored_per_s = (rows1 - rows0) / (t1 - t0)
        res.cpu_pct = {n: round(100 * (cpu1[n] - cpu0[n]) / (t1 - t0), 1) for n in pids}
        for g, i0 in zip(groups, late0, strict=True):
            lat = g.lateness_s[i0:]
            res.lateness_s.extend(lat)
            res.ticks_late_over_period += sum(1 for x in lat if x > period)
        for g, i0 in zip(groups, br0, strict=True):
            res.breach_to_off_s.extend(g.breach_to_off_s[i0:])
        # Breaches outside the window too (settle, stop): they are all under the same load.
        if hammer is not None:
            out, _ = await asyncio.to_thread(hammer.communicate, None, 30)
            lines = [x for x in (out or "").splitlines() if x.startswith("{")]
            res.api = json.loads(lines[-1]) if lines else {"error": lab.children.tail("hammer")}
        await stop_runs(lab, ids)
        t_stop = time.perf_counter()
        while node.active and time.perf_counter() - t_stop < 30:
            await asyncio.sleep(0.05)
        node.request_stop()
        await asyncio.wait_for(task, 60)
        res.drain_s = time.perf_counter() - t_stop
        w = node.writer
        if w.rows_dropped or w.rows_rejected:
            res.why = f"writer dropped {w.rows_dropped}, rejected {w.rows_rejected} rows; "
    finally:
        if hammer is not None:
            lab.children.stop(hammer)
        if not task.done():
            node.request_stop()
            try:
                await asyncio.wait_for(task, 30)
            except (TimeoutError, Exception) as exc:  # noqa: BLE001 - report, go on
                log(f"  node did not stop cleanly: {exc!r}")
        # AcquisitionNode.shutdown leaves the transports open; close them so the next
        # node's connections are the simulator's only ones.
        for inst in node.instruments.values():
            try:
                inst.driver.close()
            except Exception:  # noqa: BLE001, S110 - best effort cleanup
                pass
    v = await asyncio.to_thread(verify, lab.db_path, ids, breach_ids, period)
    res.stored_rows, res.expected_rows = v["stored"], v["expected"]
    res.lost_periods, res.seq_holes = v["lost"], v["holes"]
    res.safety_events = v["safety_events"]
    if v["problems"]:
        res.why += "; ".join(v["problems"][:3]) + (
            f" (+{len(v['problems']) - 3} more)" if len(v["problems"]) > 3 else "")
    if res.stored_rows != res.expected_rows:
        res.why += (f" lost {res.lost_periods} sample periods, {res.seq_holes} seq holes;")
    res.ok = not res.why
    return res


def describe(res: ConfigResult) -> str:
    api = res.api
    api_txt = (f" api {api.get('req_per_s')} req/s (p99 {api.get('p99_ms')} ms, "
               f"{api.get('errors')} err)" if api else "")
    return (f"  {res.hz:g} Hz x {res.channels:5d} ch ({res.cabinets} cab): "
            f"{'OK  ' if res.ok else 'FAIL'} stored {res.stored_per_s:9.0f}/s "
            f"rows {res.stored_rows}/{res.expected_rows} "
            f"late p50 {pct(res.lateness_s, 50)} p99 {pct(res.lateness_s, 99)} "
            f"max {pct(res.lateness_s, 100)} ms ({res.ticks_late_over_period} ticks > period) "
            f"breach->off n={len(res.breach_to_off_s)} p50 {pct(res.breach_to_off_s, 50)} "
            f"p99 {pct(res.breach_to_off_s, 99)} ms; claim {res.claim_s:.1f} s; "
            f"cpu% {res.cpu_pct}{api_txt}{' — ' + res.why if res.why else ''}")


# ---------------------------------------------------------------------------------------
# parent: main
# ---------------------------------------------------------------------------------------


@dataclass
class Plan:
    bare_cabinets: int
    bare_s: float
    push: list[tuple[int, float]]  # (cabinets, period)
    push_window_s: float
    search_10hz: list[int]
    window_10hz_s: float
    search_1hz: list[int]
    window_1hz_s: float
    breach_per_cab: int
    hammer_conns: int


FULL = Plan(bare_cabinets=8, bare_s=5.0, push=[(8, 0.01), (16, 0.01)], push_window_s=8.0,
            search_10hz=[1, 2, 4, 8, 16], window_10hz_s=10.0,
            search_1hz=[4, 8, 16, 24], window_1hz_s=15.0, breach_per_cab=2, hammer_conns=16)
QUICK = Plan(bare_cabinets=2, bare_s=2.0, push=[(2, 0.01)], push_window_s=3.0,
             search_10hz=[1, 2], window_10hz_s=3.0, search_1hz=[2], window_1hz_s=4.0,
             breach_per_cab=2, hammer_conns=8)


async def main_async(args: argparse.Namespace, plan: Plan, lab: Lab) -> None:
    from labdaq.storage.db import create_engine, sessionmaker

    lab.engine = create_engine(lab.url)
    lab.maker = sessionmaker(lab.engine)
    try:
        await _phases(args, plan, lab)
    finally:
        await lab.engine.dispose()


async def _phases(args: argparse.Namespace, plan: Plan, lab: Lab) -> None:
    t_all = time.perf_counter()
    # 1. Bare ceiling (its own process, like an engine process of its own).
    bare = await asyncio.to_thread(
        run_child_json, lab.children, "bare",
        ["--bare", json.dumps({"ports": lab.ports[:plan.bare_cabinets],
                               "duration_s": plan.bare_s, "warmup_s": 0.5,
                               "db": str(lab.db_path.parent / "bare.db")})],
        plan.bare_s + 60)
    log(f"bare ceiling, {plan.bare_cabinets} cabinets: stored {bare['stored_per_s']:.0f} "
        f"channel-samples/s (acquired {bare['acquired_per_s']:.0f}/s, "
        f"cpu {bare['cpu_pct']:.0f} %)")

    # 2. labdaq pushed as fast as it goes (no API load, like the bare loop).
    push: list[ConfigResult] = []
    for k, period in plan.push:
        r = await run_config(lab, k, period, plan.push_window_s, load=False,
                             breach_per_cab=0, hammer_conns=plan.hammer_conns)
        log("push" + describe(r)[1:])
        push.append(r)
    best_push = max(push, key=lambda r: r.stored_per_s)

    # 3. Sustained search under API load.
    sustained: dict[float, ConfigResult | None] = {}
    searched: list[ConfigResult] = []
    for hz, ks, window in ((10.0, plan.search_10hz, plan.window_10hz_s),
                           (1.0, plan.search_1hz, plan.window_1hz_s)):
        best: ConfigResult | None = None
        for k in ks:
            if k > len(lab.ports):
                break
            r = await run_config(lab, k, 1.0 / hz, window, load=True,
                                 breach_per_cab=plan.breach_per_cab,
                                 hammer_conns=plan.hammer_conns)
            log(describe(r))
            searched.append(r)
            if not r.ok:
                break
            best = r
        sustained[hz] = best

    loaded = [r for r in searched]
    b2o = [x for r in loaded for x in r.breach_to_off_s]
    s10, s1 = sustained[10.0], sustained[1.0]
    # Lateness "during the load": the largest sustained 10 Hz configuration, else the
    # largest 10 Hz one tried.
    ref = s10 or next((r for r in searched if r.hz == 10.0), None)
    req = [r.api.get("req_per_s") for r in loaded if r.api.get("req_per_s")]
    largest = max((r for r in (s10, s1) if r is not None),
                  key=lambda r: r.channels * r.hz, default=None)
    note = (
        f"engine in-process (AcquisitionNode in the benchmark process), sim/API/load client "
        f"in separate processes, speed 1, SQLite, 2 cores shared by all; bare = asyncio "
        f"streams+np parse+8-col sqlite3 executemany 10k in a writer thread over "
        f"{plan.bare_cabinets} of the same simulated cabinets; labdaq max = best of "
        f"{[(k * CHANNELS, p) for k, p in plan.push]} (channels, period s) without API load; "
        f"sustained search under API load (GET /api/v1/runs/{{id}}, {plan.hammer_conns} "
        f"keep-alive conns) with {plan.breach_per_cab} breach runs per cabinet; "
        f"lateness from the {ref.channels if ref else 0}-channel 10 Hz config; "
        f"breach-to-off over all {len(b2o)} breaches under load; "
        f"targets: >=100k stored/s {'met' if best_push.stored_per_s >= 1e5 else 'NOT met'}, "
        f"ratio>=0.3 "
        f"{'met' if bare['stored_per_s'] and best_push.stored_per_s / bare['stored_per_s'] >= 0.3 else 'NOT met'}"  # noqa: E501
        f", lateness p99<=20ms "
        f"{'met' if ref and (pct(ref.lateness_s, 99) or 0) <= 20 else 'NOT met'}"
        f", breach-to-off p99<=5ms "
        f"{'met' if b2o and (pct(b2o, 99) or 1e9) <= 5 else 'NOT met'}; "
        f"total {time.perf_counter() - t_all:.0f} s"
    )
    result(
        "engine_stored_channel_samples",
        best_push.stored_per_s,
        "channel-samples/s",
        bare["stored_per_s"],
        max_channels_1hz=s1.channels if s1 else 0,
        max_channels_10hz=s10.channels if s10 else 0,
        stored_per_s_at_largest_sustained=round(largest.stored_per_s, 1) if largest else None,
        lateness_p50_ms=pct(ref.lateness_s, 50) if ref else None,
        lateness_p99_ms=pct(ref.lateness_s, 99) if ref else None,
        breach_to_off_p50_ms=pct(b2o, 50),
        breach_to_off_p99_ms=pct(b2o, 99),
        breaches=len(b2o),
        api_req_per_s=round(float(np.median(req)), 1) if req else None,
        push_channels=best_push.channels,
        push_period_s=best_push.period_s,
        push_lost_periods=best_push.lost_periods,
        push_seq_holes=best_push.seq_holes,
        bare_acquired_per_s=round(bare["acquired_per_s"], 1),
        search=[r.summary() for r in searched],
        quick=args.quick,
        note=note,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (< 30 s)")
    ap.add_argument("--hammer", help=argparse.SUPPRESS)
    ap.add_argument("--bare", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hammer:
        hammer_main(args.hammer)
        return
    if args.bare:
        bare_main(args.bare)
        return
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM ends us through the finally blocks below, which stop every child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = QUICK if args.quick else FULL
    cabinets = max([plan.bare_cabinets, *[k for k, _ in plan.push], *plan.search_10hz,
                    *plan.search_1hz])
    tmp = Path(tempfile.mkdtemp(prefix="labdaq-acqscale-"))
    children = Children(tmp)
    try:
        from labdaq.cli import _register_sim_lab
        from labdaq.config import load_settings
        from labdaq.storage.db import upgrade

        settings = load_settings(data_dir=tmp)
        url = settings.resolved_database_url
        desc_path = tmp / "simlab.json"
        sim = children.spawn("sim", ["-m", "labdaq.cli", "sim", "--smus", "0",
                                     "--cabinets", str(cabinets), "--cabinet-channels",
                                     str(CHANNELS), "--speed", "1", "--describe",
                                     str(desc_path)])
        upgrade(url)
        api_port = free_port()
        api = children.spawn("api", ["-m", "labdaq.cli", "api", "--port", str(api_port),
                                     "--data-dir", str(tmp)])
        end = time.monotonic() + 60
        while not desc_path.exists():
            if sim.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"simulator did not start: {children.tail('sim')}")
            time.sleep(0.05)
        desc = json.loads(desc_path.read_text())
        asyncio.run(_register_sim_lab(url, desc))
        token = asyncio.run(_make_token(url))
        wait_for_http(api_port, "/health", 60, api)
        ports = [int(inst["resource"].split("::")[2]) for inst in desc["instruments"]]
        lab = Lab(url=url, db_path=Path(url.split("sqlite:///", 1)[1]), desc=desc,
                  ports=ports, api_port=api_port, token=token, children=children,
                  settings=settings)
        log(f"simulated lab: {len(ports)} cabinets x {CHANNELS} channels; API on "
            f"127.0.0.1:{api_port}; data in {tmp}")
        asyncio.run(main_async(args, plan, lab))
    finally:
        children.stop_all()
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
