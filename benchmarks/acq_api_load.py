"""The standard API load (docs/architecture.md, Definitions), a child process of
benchmarks/acquisition_scale.py (``--api-load``): an open-loop stream of requests over
the trial's runs, latency from each request's intended send time.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from acq_common import pct

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
                    kinds: list[str] | None = None, ready_path: str | None = None,
                    go_path: str | None = None) -> dict[str, Any]:
    """Open-loop requests at ``rate_hz`` over ``conns`` keep-alive HTTP/1.1 connections
    (raw asyncio streams: httpx itself saturates a core at a few hundred requests/s here,
    perf-anchors §5, which would measure the client). Request ``i`` is due at
    ``t0 + i / rate_hz`` whether or not earlier ones have answered; its latency runs from
    that intended time, so a slow server shows as latency, not as a lower rate.
    ``kinds``: the part of the mix to send (default all of API_MIX). With ``ready_path``
    and ``go_path`` it creates the first once connected and starts when the second exists."""
    mix = [(k, p) for k, p in API_MIX if kinds is None or k in kinds]
    lat: dict[str, list[float]] = {kind: [] for kind, _ in mix}
    # When the slow ones were due (s after the start) and how long they took: a stall at
    # the start and a periodic one look alike in a percentile.
    slow: list[tuple[float, float]] = []
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
            took = time.perf_counter() - intended
            lat[kind].append(took)
            if took > 0.05 and len(slow) < 500:
                slow.append((round(intended - t0, 3), round(took * 1000, 1)))
            statuses[code] = statuses.get(code, 0) + 1
            if code != 200:
                errors += 1
            pool.put_nowait((reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            errors += 1
            writer.close()
            pool.put_nowait(await asyncio.open_connection("127.0.0.1", port))

    if ready_path is not None and go_path is not None:
        # Started before the trial's node: its start-up (imports, connections) is over
        # before the node samples, and the stream starts when the trial says so.
        Path(ready_path).touch()
        give_up = time.perf_counter() + 600
        while not Path(go_path).exists():
            if time.perf_counter() > give_up:
                raise TimeoutError("no go from the trial within 600 s")
            await asyncio.sleep(0.01)
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
        "slow_ms_at_s": slow,
    }


def api_load_main(spec: str) -> None:
    a = json.loads(spec)
    out = asyncio.run(_api_load(a["port"], a["token"], a["ids"], a["rate_hz"],
                                a["duration_s"], a["conns"], a.get("kinds"),
                                a.get("ready_path"), a.get("go_path")))
    print(json.dumps(out), flush=True)


