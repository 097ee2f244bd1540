"""The baselines of benchmarks/acquisition_scale.py: the bare loop (a child, ``--bare``:
asyncio streams in the engine's wire format, rows into sqlite3 from a writer thread)
and the simulator's own ceiling (raw clients asking back to back; in buffered mode the
cabinets logging and serving ``TRAC:DATA?`` blocks), each over the same cabinets the
engine is measured on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import socket
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from acq_common import (
    CHANNELS,
    FORM_CMD,
    MEAS_BYTES,
    MEAS_CMD,
    MEAS_HEADER,
    cpu_seconds,
    parse_meas_block,
    run_child_json,
)

if TYPE_CHECKING:
    from acq_search import Plan
    from acq_trial import Lab





def bare_main(spec: str) -> None:
    """Minimal socket -> numpy -> sqlite3 loop (perf-anchors §2), rows committed/s; with
    ``store`` false only socket -> numpy (the simulator's ceiling: readings served/s);
    with ``trace`` the buffered ceiling (:func:`trace_main`)."""
    a = json.loads(spec)
    if a.get("trace"):
        trace_main(a)
        return
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




def trace_main(a: dict[str, Any]) -> None:
    """The buffered simulator's ceiling: every cabinet logs every ``period_s`` into a
    ``points`` ring (``ABOR;TRAC:POIN;TRIG:TIM;INIT``, as the engine's driver starts it)
    and a raw client per cabinet fetches ``TRAC:DATA? <next>,(@1:64)`` every ``fetch_s``
    (0: back to back); readings served/s, and readings the ring overwrote before they
    were fetched (the simulator fell behind). Logging is stopped (``ABOR``, answered) at
    the end, so no cabinet goes on logging for nobody."""
    ports: list[int] = a["ports"]
    period_s: float = a["period_s"]
    fetch_s: float = a["fetch_s"]
    served = [0]
    fetches = [0]
    lost = [0]
    start = (f"ABOR;:TRAC:POIN {a['points']};:TRIG:TIM {period_s:g};:INIT\n").encode()

    async def fetch(port: int, end: float) -> None:
        reader, w = await asyncio.open_connection("127.0.0.1", port)
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        w.write(FORM_CMD + start)
        nxt = 1
        deadline = time.perf_counter()
        try:
            while time.perf_counter() < end:
                w.write(f"TRAC:DATA? {nxt},(@1:{CHANNELS})\n".encode())
                digits = int((await reader.readexactly(2))[1:])
                size = int(await reader.readexactly(digits))
                payload = (await reader.readexactly(size + 1))[:-1]
                first, n = (int(x) for x in np.frombuffer(payload[:16], ">f8"))
                if first > nxt:
                    lost[0] += first - nxt
                if n:
                    nxt = max(nxt, first) + n
                served[0] += n
                fetches[0] += 1
                if fetch_s:
                    deadline += fetch_s
                    await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
        finally:
            # Wait for the answer: ABOR takes the readings due until then, which a
            # saturated simulator may still owe; the next phase starts once it is idle.
            w.write(b"ABOR;*OPC?\n")
            await w.drain()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.IncompleteReadError):
                await asyncio.wait_for(reader.readline(), 60.0)
            w.close()

    async def run() -> dict[str, Any]:
        end = time.perf_counter() + a["warmup_s"] + a["duration_s"]
        tasks = [asyncio.create_task(fetch(p, end)) for p in ports]
        await asyncio.sleep(a["warmup_s"])
        s0, f0, l0, t0 = served[0], fetches[0], lost[0], time.perf_counter()
        await asyncio.sleep(a["duration_s"])
        s1, f1, l1, t1 = served[0], fetches[0], lost[0], time.perf_counter()
        await asyncio.gather(*tasks)
        return {"readings_per_s": (s1 - s0) / (t1 - t0),
                "fetches_per_s": (f1 - f0) / (t1 - t0), "lost": l1 - l0,
                "cpu_pct": 100 * time.process_time() / (time.perf_counter() - t_start)}

    t_start = time.perf_counter()
    print(json.dumps(asyncio.run(run())), flush=True)


async def sim_log_ceiling(lab: Lab, plan: Plan, cabinets: int, period_s: float,
                          fetch_s: float, duration_s: float) -> dict[str, Any]:
    """Readings/s the simulator logs and serves as ``TRAC:DATA?`` blocks to raw clients
    (:func:`trace_main`, nothing stored), and its CPU meanwhile (/proc, over the window
    and the client's start-up: a lower bound of its share)."""
    sim_pid = lab.children.procs[0][1].pid
    c0, t0 = cpu_seconds(sim_pid), time.perf_counter()
    out = await asyncio.to_thread(
        run_child_json, lab.children, "sim-log-ceiling",
        ["--bare", json.dumps({"trace": True, "ports": lab.ports[:cabinets],
                               "duration_s": duration_s, "warmup_s": 0.5,
                               "period_s": period_s, "fetch_s": fetch_s,
                               "points": plan.ring_points})],
        duration_s + 60)
    out["sim_cpu_pct"] = 100 * (cpu_seconds(sim_pid) - c0) / (time.perf_counter() - t0)
    out["cabinets"] = cabinets
    out["period_s"] = period_s
    out["fetch_s"] = fetch_s
    out["readings_per_sim_cpu_s"] = (out["readings_per_s"] / (out["sim_cpu_pct"] / 100)
                                     if out["sim_cpu_pct"] > 0 else None)
    out["channel_readings_per_s"] = out["readings_per_s"] * CHANNELS
    return out


async def sim_ceiling(lab: Lab, plan: Plan, cabinets: int) -> dict[str, Any]:
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


async def bare_loop(lab: Lab, plan: Plan, cabinets: int) -> dict[str, Any]:
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


