"""The baselines of benchmarks/acquisition_scale.py: the bare loop (a child, ``--bare``:
asyncio streams in the engine's wire format, rows into sqlite3 from a writer thread)
and the simulator's own ceiling (raw clients asking back to back), each over the
same cabinets the engine is measured on.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any

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


