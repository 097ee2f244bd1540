"""Several acquisition nodes on one PostgreSQL: the aggregate stored channel-samples/s of two
nodes against one, none lost, and each process's CPU.

Per layout (one node, then two), in a freshly migrated throwaway database on the server
of LABDAQ_BENCH_PG_URL or LABDAQ_TEST_PG_URL, every node is real processes as deployed
(docs/deploy.md, "Adding a node"): ``labdaq sim`` (one cabinet of ``channels`` channels
over TCP, speed 1) and ``labdaq engine --role node`` (with its writer process), its lab
registered as the node's own. A run with a CC step of ``run_s`` at ``period_s`` is queued
on every channel of every node at once; stored/s is the rows committed to ``samples``
between two counts ``window_s`` apart, once every run has started. After the runs end,
each run's samples are checked: seqs 1..n (none missing, none duplicated) and no missed
sample period (``runs.missed_periods``, docs/architecture.md: a period with no stored
sample is lost), counted inside the window and over the runs' whole lives. CPU:
user+system seconds per wall second of each process over the window, from /proc (the
PostgreSQL server, shared with other users, is not counted).

Ratio: two nodes' aggregate / one node's. Prints a JSON object per layout as its last
lines; without a PostgreSQL server the value is null.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import result  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from labdaq import processes  # noqa: E402
from labdaq.cli import _register_sim_lab, node_lab  # noqa: E402
from labdaq.runs import RunCreate, create_run  # noqa: E402
from labdaq.storage.db import create_engine, session_scope, sessionmaker, upgrade  # noqa: E402

NAME = "pg_two_nodes_stored_channel_samples"
TICK_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK_S


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(x) for x in (task / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


async def query(url: str, sql: str, **params: Any) -> list[Any]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(text(sql), params)).all())
    finally:
        await engine.dispose()


async def admin(server: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(make_url(server).set(drivername="postgresql")
                                 .render_as_string(hide_password=False))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def queue_runs(url: str, labs: list[dict[str, Any]], period_s: float,
                     run_s: float) -> int:
    doc = {"schema_version": 1, "name": f"cc {run_s:g} s",
           "steps": [{"step": "cc", "rate_c": 0.2, "until": {"duration_s": run_s}}]}
    engine = create_engine(url)
    n = 0
    try:
        async with session_scope(sessionmaker(engine)) as s:
            for lab in labs:
                for inst in lab["instruments"]:
                    if not inst["name"].split("-", 1)[1].startswith("cab"):
                        continue
                    for ch in inst["channels"]:
                        await create_run(s, RunCreate(
                            channel=ch["name"], cell_serial=ch["cell"]["serial"],
                            sample_period_s=period_s, protocol_document=doc), "bench")
                        n += 1
    finally:
        await engine.dispose()
    return n


def layout(server: str, nodes: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    db = f"labdaq_bench_nodes_{uuid.uuid4().hex[:8]}"
    asyncio.run(admin(server, f'CREATE DATABASE "{db}"'))
    url = make_url(server).set(database=db).render_as_string(hide_password=False)
    kids = processes.Children(tmp)
    env = processes.child_env(drop=("LABDAQ_CONFIG", "LABDAQ_DATABASE_URL"))
    try:
        upgrade(url)
        labs, engines, sims = [], [], []
        for k in range(nodes):
            name = f"n{k}"
            desc_path = tmp / f"{db}-{name}.json"
            sim = kids.spawn(f"{db}-sim-{name}", processes.sim_argv(
                desc_path, "--smus", "0", "--cabinets", "1",
                "--cabinet-channels", str(args.channels), "--watchdog", "0"),
                env=env, cwd=tmp, new_session=True)
            lab = node_lab(processes.read_sim_description(desc_path, sim), name)
            asyncio.run(_register_sim_lab(url, lab, node=name))
            data = tmp / f"{db}-{name}"
            data.mkdir()
            engines.append(kids.spawn(f"{db}-engine-{name}", processes.labdaq_argv(
                "engine", "--role", "node", "--node-name", name, "--database-url", url,
                "--data-dir", str(data)), env=env, cwd=tmp, new_session=True))
            labs.append(lab)
            sims.append(sim)
        runs = asyncio.run(queue_runs(url, labs, args.period_s, args.run_s))
        processes.wait_until(
            lambda: asyncio.run(query(url, "SELECT count(*) FROM runs WHERE state = "
                                      "'running'"))[0][0] == runs,
            120, "every run to start", poll_s=0.2)
        # Give writers a moment past the first batches, then the window.
        time.sleep(args.settle_s)
        procs = {f"sim {i}": p.pid for i, p in enumerate(sims)}
        for i, e in enumerate(engines):
            procs[f"engine {i}"] = e.pid
            for w in children(e.pid):
                procs[f"writer {i}"] = w
        w0 = datetime.now(UTC)
        c0 = {n: cpu_s(p) for n, p in procs.items()}
        n0 = asyncio.run(query(url, "SELECT count(*) FROM samples"))[0][0]
        t0 = time.perf_counter()
        time.sleep(args.window_s)
        n1 = asyncio.run(query(url, "SELECT count(*) FROM samples"))[0][0]
        wall = time.perf_counter() - t0
        w1 = datetime.now(UTC)
        cpu = {n: round((cpu_s(p) - c0[n]) / wall, 3) for n, p in procs.items()}
        processes.wait_until(
            lambda: asyncio.run(query(url, "SELECT count(*) FROM runs WHERE state IN "
                                      "('queued', 'running')"))[0][0] == 0,
            args.run_s * 3 + 60, "every run to end", poll_s=0.5)
        rows = asyncio.run(query(
            url, "SELECT r.state, r.missed_periods, count(s.seq), coalesce(min(s.seq), 0), "
            "coalesce(max(s.seq), 0) FROM runs r LEFT JOIN samples s ON s.run_id = r.id "
            "GROUP BY r.id"))
        bad = [r for r in rows if r[0] != "completed" or r[2] == 0 or (r[3], r[4]) != (1, r[2])]
        lost = sum(int(r[1] or 0) for r in rows)
        # Where the losses were: per node and cause, how many gaps, periods, when (run
        # time), and how many of those periods were recorded while the node's runs were
        # still joining (up to its last run's first sample, + 0.5 s).
        gaps = asyncio.run(query(
            url, "WITH j AS (SELECT r.node, min(s.ts_utc) AS first_join, "
            "max(s.ts_utc) AS last_join FROM runs r JOIN samples s ON s.run_id = r.id "
            "AND s.seq = 1 GROUP BY r.node) "
            "SELECT r.node, e.data->>'cause', count(*), sum((e.data->>'count')::int), "
            "min((e.data->>'t_from_s')::float), max((e.data->>'t_to_s')::float), "
            "sum(CASE WHEN extract(epoch FROM e.ts) <= j.last_join + 0.5 "
            "THEN (e.data->>'count')::int ELSE 0 END), "
            "round((max(j.last_join) - max(j.first_join))::numeric, 2) "
            "FROM events e JOIN runs r ON r.id = e.run_id JOIN j ON j.node = r.node "
            "WHERE e.kind = 'missed_periods' GROUP BY r.node, 2"))
        joins = asyncio.run(query(
            url, "SELECT r.node, round((max(s.ts_utc) - min(s.ts_utc))::numeric, 2) "
            "FROM runs r JOIN samples s ON s.run_id = r.id AND s.seq = 1 GROUP BY r.node"))
        # Lost inside the window: the gaps recorded while it lasted (an event's ts is when
        # the engine recorded it, with the first sample after the gap).
        ((lost_window,),) = asyncio.run(query(
            url, "SELECT coalesce(sum((data->>'count')::int), 0) FROM events "
            "WHERE kind = 'missed_periods' AND ts BETWEEN :a AND :b", a=w0, b=w1))
        return {"nodes": nodes, "runs": runs, "stored_per_s": (n1 - n0) / wall,
                "lost_window": int(lost_window), "lost": lost, "bad_runs": len(bad),
                "cpu_per_wall_s": cpu,
                # [node, cause, gaps, periods, first t_s, last t_s, periods while
                # joining, the node's join span (s)]
                "gaps": [[str(x) if x is not None and not isinstance(x, (int, float, str))
                          else x for x in g] for g in gaps],
                # node -> seconds from its first run's first sample to its last run's
                "join_span_s": {str(n): float(v) for n, v in joins}}
    finally:
        kids.stop_all(timeout_s=20)
        asyncio.run(admin(server, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--channels", type=int, default=None, help="channels per node")
    ap.add_argument("--period", type=float, default=0.1,
                    help="sample period in seconds (0.01: 100 Hz)")
    args = ap.parse_args()
    args.channels = args.channels or (16 if args.quick else 64)
    args.period_s = args.period
    args.window_s = 5.0 if args.quick else 10.0
    args.settle_s = 2.0
    args.run_s = args.window_s + args.settle_s + 8.0
    server = os.environ.get("LABDAQ_BENCH_PG_URL") or os.environ.get("LABDAQ_TEST_PG_URL")
    if not server:
        print(json.dumps({"name": NAME, "value": None, "unit": "channel-samples/s",
                          "baseline": None, "ratio": None,
                          "note": "no PostgreSQL (LABDAQ_BENCH_PG_URL)"}))
        return
    with tempfile.TemporaryDirectory(prefix="labdaq-nodes-bench-") as d:
        one = layout(server, 1, args, Path(d))
        print(json.dumps(one), file=sys.stderr, flush=True)
        two = layout(server, 2, args, Path(d))
        print(json.dumps(two), file=sys.stderr, flush=True)
    cpu = ", ".join(f"{k} {v:g}" for k, v in two["cpu_per_wall_s"].items())
    note = (f"{args.channels} ch/node at {1 / args.period_s:g} Hz; lost in the window "
            f"{one['lost_window']} / {two['lost_window']}, over the runs' lives "
            f"{one['lost']} / {two['lost']}, bad runs {one['bad_runs']} / {two['bad_runs']}; "
            "CPU s/s "
            f"(two nodes): {cpu}; one node: "
            + ", ".join(f"{k} {v:g}" for k, v in one["cpu_per_wall_s"].items()))
    result(NAME, two["stored_per_s"], "channel-samples/s", one["stored_per_s"], note=note)


if __name__ == "__main__":
    main()
