"""What holds every request of the API back at once: full garbage collections and token
lookups, counted in CPU time (which the machine's load moves far less than latency).

One job: build the API in this process on a seeded SQLite file (64 runs of 600 samples),
start it as ``labdaq api`` does (``create_app(gc_freeze=...)``), send ``--requests``
cycles and ``samples?points=`` requests over 16 concurrent streams (httpx over ASGI,
distinct runs in turn) and print, as JSON lines: the full (generation 2) collections
during the load, their count, total and largest CPU (``gc.callbacks``), and how many token
lookups reached the database and how many of them ran at once. Not a benchmark
(``run_all`` skips files starting with ``_``); docs/performance.md, "API latency:
stalls"::

    python benchmarks/_api_stalls.py --requests 4000             # gc_freeze as labdaq api
    python benchmarks/_api_stalls.py --requests 4000 --no-freeze
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from _common import result  # noqa: E402

import labdaq.api.deps as deps  # noqa: E402
from labdaq.api.app import create_app  # noqa: E402
from labdaq.config import Settings  # noqa: E402
from labdaq.storage.db import upgrade  # noqa: E402
from tests.dataout_fixtures import insert_samples, make_lab  # noqa: E402

RUNS = 64
SAMPLES = 600
STREAMS = 16


async def _load(url: str, freeze: bool, n_requests: int) -> dict[str, Any]:
    info = await make_lab(url, runs=RUNS)
    for i, rid in enumerate(info["run_ids"]):
        insert_samples(url, rid, SAMPLES, seed=i + 1)
    lookups = {"calls": 0, "at_once": 0, "max_at_once": 0}
    real = deps.authenticate

    async def counted(session: Any, secret: str) -> Any:
        lookups["calls"] += 1
        lookups["at_once"] += 1
        lookups["max_at_once"] = max(lookups["max_at_once"], lookups["at_once"])
        try:
            return await real(session, secret)
        finally:
            lookups["at_once"] -= 1

    deps.authenticate = counted  # type: ignore[assignment]
    pauses: list[tuple[int, float]] = []
    began = [0.0]

    def on_gc(phase: str, gc_info: dict[str, Any]) -> None:
        if phase == "start":
            began[0] = time.thread_time()
        else:
            pauses.append((int(gc_info["generation"]), time.thread_time() - began[0]))

    app = create_app(Settings(database_url=url), gc_freeze=freeze)
    h = {"Authorization": f"Bearer {info['tokens']['engineer']}"}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            gc.callbacks.append(on_gc)
            cpu0 = time.process_time()
            todo = iter(range(n_requests))

            async def stream() -> None:
                for i in todo:
                    rid = info["run_ids"][(i // 2) % RUNS]
                    path = (f"/api/v1/runs/{rid}/cycles" if i % 2 == 0
                            else f"/api/v1/runs/{rid}/samples?points={500 + i % 7}")
                    r = await c.get(path, headers=h)
                    if r.status_code != 200:
                        raise RuntimeError(f"{path}: {r.status_code} {r.text[:200]}")

            await asyncio.gather(*(stream() for _ in range(STREAMS)))
            cpu_s = time.process_time() - cpu0
            gc.callbacks.remove(on_gc)
    full = [d for g, d in pauses if g == 2]
    return {"cpu_s": cpu_s, "full": full, "young_max_s": max(
        (d for g, d in pauses if g < 2), default=0.0), "lookups": lookups,
        "frozen": gc.get_freeze_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--no-freeze", action="store_true")
    args = ap.parse_args()
    freeze = not args.no_freeze
    url = f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='labdaq-stalls-')}/l.db"
    upgrade(url)
    out = asyncio.run(_load(url, freeze, args.requests))
    full = out["full"]
    who = (f"{args.requests} requests (cycles / samples?points in turn) over {STREAMS} "
           f"streams, in-process, gc_freeze={freeze} ({out['frozen']} objects frozen); "
           f"process CPU {out['cpu_s']:.2f} s")
    result("api_full_gc_max_cpu_ms", 1000 * max(full, default=0.0), "ms", None,
           note=f"{who}; {len(full)} full collections, {1000 * sum(full):.1f} ms CPU in all; "
           f"young collections at most {1000 * out['young_max_s']:.2f} ms")
    lk = out["lookups"]
    result("api_token_lookups", float(lk["calls"]), "lookups", None,
           note=f"{who}; at most {lk['max_at_once']} at once")


if __name__ == "__main__":
    main()
