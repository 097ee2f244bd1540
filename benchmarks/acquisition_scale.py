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
   the simulator process serves at most, and its CPU. With ``buffered=1`` also the
   logging ceiling (``acq_bare.trace_main``): every cabinet logging on its own clock and a
   raw client per cabinet fetching ``TRAC:DATA?`` blocks, once at the engine's pattern
   (every ``period_s``, fetched every ``fetch_s``: readings per simulator CPU-second) and
   once at most (logging every ``ceiling_period_s``, fetched back to back: readings/s the
   simulator logs and serves with its core saturated).
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
   as asked and the writer dropped and rejected nothing; in buffered mode also only
   when the engine kept up (``acq_trial.kept_up``: the writer's backlog never reached its
   bound, and neither that backlog nor the fetch lateness grew through the window), since
   the cabinets' rings hide a falling-behind engine only until they overflow. The search
   starts at ``start_cabinets`` (8 in the full form; the same every run, so two runs
   take the same path while their verdicts agree), goes up by doubling while lossless
   and bisects between the largest lossless and the smallest lossy count; a trial whose
   estimated end is past
   ``budget_s`` is not started. When not even one cabinet is lossless, one cabinet's
   channels are halved down to ``min_channels``.
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

This file is the entry point and the report (the phases in order, the headline, the JSON
line); the parts live in modules of their own, one job each: ``acq_common`` (wire format,
helpers), ``acq_api_load`` (the load child), ``acq_bare`` (bare loop and simulator
ceiling), ``acq_counts`` (stored and lost, from the database), ``acq_trial`` (one cabinet
count), ``acq_search`` (the plan and the search).

Options: ``--quick`` (about a minute, 8 channels per cabinet), ``--set FIELD=VALUE`` to explore
another plan (see :class:`Plan`), ``--keep`` keeps the database.

The last stdout line is one JSON object (benchmarks/_common.py); human-readable lines go to
stderr. Everything uses 127.0.0.1, every loop is bounded and every child is stopped in a
``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import result  # noqa: E402

# The parts, by job; re-exported here, where the tests and benchmarks/api_latency.py
# find them.
from acq_api_load import API_MIX, api_load_main  # noqa: E402, F401
from acq_bare import bare_loop, bare_main, sim_ceiling, sim_log_ceiling  # noqa: E402
from acq_common import (  # noqa: E402, F401
    CHANNELS,
    free_port,
    loadavg,
    log,
    machine_busy_s,
    pct,
)
from acq_counts import final_check, window_losses  # noqa: E402, F401
from acq_search import FULL, QUICK, Plan, apply_overrides, search  # noqa: E402
from acq_trial import Lab, Step, Trial  # noqa: E402, F401

from labdaq import processes  # noqa: E402
from labdaq.processes import Children  # noqa: E402


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
    ceiling = await sim_ceiling(lab, plan, top)
    log(f"simulator ceiling, {top} cabinets x 64 ch asked back to back: "
        f"{ceiling['acquired_per_s']:,.0f} channel-readings/s served (client cpu "
        f"{ceiling['cpu_pct']:.0f} %, simulator >= {ceiling['sim_cpu_pct']:.0f} %: "
        f"{(ceiling['per_sim_cpu_s'] or 0):,.0f} readings per simulator CPU-second)")
    log_ceiling = await _log_ceiling(lab, plan, top) if plan.buffered else None
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
    # 3. The bare loop over the headline's cabinets (the smallest tried if none was
    # lossless), same wire format.
    bare_k = head.cabinets if head else min((s.cabinets for s in steps), default=1)
    bare = await bare_loop(lab, plan, bare_k)
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
    beside = (f"; not lossless: {lossy.stored_per_s:,.0f}/s at {lossy.channels} ch "
              + (f"with {lossy.lost:,} lost" if lossy.lost else
                 "with none lost but falling behind") if lossy else "")
    if in_window is not None and not in_window.lossless:
        beside += (f"; none lost inside the window only: {in_window.stored_per_s:,.0f}/s at "
                   f"{in_window.channels} ch (with {in_window.lost:,} lost over the runs' "
                   f"lives)")
    trials = ", ".join(f"{s.channels} ch " + ("lossless" if s.lossless
                                               else f"with {s.lost:,} lost" if s.lost
                                               else "fell behind")
                       for s in steps)
    lateness_of = "fetch" if plan.buffered else "loop"
    headline = (
        f"[{'buffered' if plan.buffered else 'per-tick'} acquisition] "
        f"largest rate stored with ZERO missed periods at {hz:g} Hz: {value:,.0f} "
        f"channel-samples/s ({head.channels if head else 0} channels, "
        f"{head.cabinets if head else 0} cabinets; every channel cycling CC-CV, "
        f"{plan.breach_per_cab} breach channels per cabinet, standard API load "
        f"{plan.api_rate_hz:g} req/s open loop, got {api.get('req_per_s', 'n/a')} req/s, "
        f"p99 {api.get('p99_ms', 'n/a')} ms) = {ratio:.2f}x the bare loop "
        f"{bare['stored_per_s']:,.0f}/s "
        f"({bare_k} cabinets, {plan.bare_s:g} s); that window: max {lateness_of} lateness "
        f"{ms(lat_max)}, breach-to-acknowledgement p99 {ms(ack99)} over "
        f"{len(head.breach_to_ack_s) if head else 0} breaches{beside}; simulator ceiling "
        f"{ceiling['acquired_per_s']:,.0f} readings/s served back to back "
        f"({(ceiling['per_sim_cpu_s'] or 0):,.0f} per simulator CPU-second; the simulator "
        f"used {head.cpu_pct.get('sim') if head else 'n/a'} % of a core in the headline "
        f"window){_log_ceiling_text(log_ceiling)}; trials: {trials}; load average "
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
        f"writer thread. Acquisition: {plan.mode}"
        + ("; lossless also requires that the engine kept up (the writer's backlog "
           "never at its bound, neither it nor the fetch lateness growing through the "
           "window by more than 2 % of the stored rate / 0.02 s a second)"
           if plan.buffered else "")
        + ("; lateness is the fetch loop's against its fetch deadlines, and a breach is "
           "cut off up to a fetch period plus the exchange after its reading was taken "
           "(breach-to-ack counts from the block's arrival)" if plan.buffered else "")
        + f". Total {time.perf_counter() - t_start:.0f} s."
    )
    result(
        "engine_lossless_channel_samples",
        value,
        "channel-samples/s",
        bare["stored_per_s"],
        hz=hz,
        acquisition="buffered" if plan.buffered else "tick",
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
        sim_log_ceiling=log_ceiling,
        trials=[s.summary() for s in steps],
        background_cpu_pct=round(background, 1),
        loadavg_before=load0,
        loadavg_after=load1,
        quick=args.quick,
        note=note,
        headline=headline,
    )


async def _log_ceiling(lab: Lab, plan: Plan, cabinets: int) -> dict[str, Any]:
    """Buffered mode: what the simulator logs and serves as ``TRAC:DATA?`` blocks, at the
    engine's pattern (every cabinet logging every period, fetched every fetch period:
    its CPU per reading) and at most (logging every ``ceiling_period_s``, fetched back to
    back: readings served/s with the simulator saturated)."""
    paced = await sim_log_ceiling(lab, plan, cabinets, plan.period_s, plan.fetch_s,
                                  plan.sim_ceiling_s)
    most = await sim_log_ceiling(lab, plan, cabinets, plan.ceiling_period_s, 0.0,
                                 plan.sim_ceiling_s)
    # Served about every reading the timers took (a short window's backlog aside): it kept
    # up, so the figure is what was asked of it, a lower bound of its ceiling.
    most["kept_up"] = most["readings_per_s"] >= 0.9 * cabinets / plan.ceiling_period_s
    log(f"simulator logging ceiling, {cabinets} cabinets x 64 ch: at the engine's pattern "
        f"(every {plan.period_s * 1e3:g} ms, fetched every {plan.fetch_s * 1e3:g} ms) "
        f"{paced['readings_per_s']:,.0f} readings/s served with the simulator at "
        f">= {paced['sim_cpu_pct']:.0f} % of a core = "
        f"{(paced['readings_per_sim_cpu_s'] or 0):,.0f} readings per simulator "
        f"CPU-second; at most (logging every {plan.ceiling_period_s * 1e3:g} ms, fetched "
        f"back to back) {most['readings_per_s']:,.0f} readings/s = "
        f"{most['channel_readings_per_s']:,.0f} channel-readings/s logged and served "
        f"(simulator {most['sim_cpu_pct']:.0f} %, {most['lost']:,} overwritten unfetched"
        + ("; it kept up with every timer: a lower bound)" if most["kept_up"] else ")"))
    return {"paced": paced, "at_most": most}


def _log_ceiling_text(c: dict[str, Any] | None) -> str:
    if c is None:
        return ""
    return (f"; simulator logging ceiling {c['at_most']['channel_readings_per_s']:,.0f} "
            f"channel-readings/s logged and served via TRAC:DATA? "
            f"{'at least (it kept up)' if c['at_most']['kept_up'] else 'at most'} "
            f"({(c['paced']['readings_per_sim_cpu_s'] or 0) * CHANNELS:,.0f} per simulator "
            f"CPU-second at the engine's pattern)")


async def main_async(args: argparse.Namespace, plan: Plan, lab: Lab, t_start: float) -> None:
    from labdaq.storage.db import create_engine, sessionmaker

    lab.engine = create_engine(lab.url)
    lab.maker = sessionmaker(lab.engine)
    try:
        await _phases(args, plan, lab, t_start)
    finally:
        await lab.engine.dispose()


def start_lab(children: Children, tmp: Path, cabinets: int, plan: Plan | None = None) -> Lab:
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
    if plan is not None and plan.buffered:
        # The cabinets' acquisition option (drivers/cabinet.py), as an instruments file
        # would set it.
        for inst in desc["instruments"]:
            if inst["driver"] == "cabinet":
                inst["options"] = {**(inst.get("options") or {}), "acquisition": "buffered",
                                   "buffer_points": plan.ring_points,
                                   "fetch_period_s": plan.fetch_s}
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
        lab = start_lab(children, tmp, cabinets, plan)
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
