"""One trial of benchmarks/acquisition_scale.py: a fresh AcquisitionNode with fresh runs
on every channel of K cabinets (CC-CV cycling, breach channels), one measured window
under the standard API load, then every run stopped and its whole life checked in the
database; the lab it runs on (:class:`Lab`) and what it found (:class:`Step`).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acq_common import (
    BREACH_CURRENT_A,
    BREACH_MARGIN_V,
    CAP_ABOVE_V,
    CAP_MAX_V,
    CREATE_CHUNK,
    CYCLE_CHARGE_A,
    CYCLE_DISCHARGE_A,
    HERE,
    cpu_seconds,
    log,
    machine_busy_s,
    pct,
    read_voltages,
)
from acq_counts import final_check, window_losses

from labdaq.processes import Children

if TYPE_CHECKING:
    from acq_search import Plan


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
    # ... of which up to the moment the last run joined, and up to the window's start
    joining_lost: int = 0
    join_lateness_s: list[float] = field(default_factory=list)  # ticks until all joined
    gc_s: list[float] = field(default_factory=list)  # this process's collections, window
    before_window_lost: int = 0
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
    # Buffered mode: how fast the writer's backlog (rows/s) and the fetch loop's lateness
    # (s/s) grew through the window; a trial that fell behind is not lossless (kept_up).
    backlog_growth_per_s: float | None = None
    backlog_floor_end: float | None = None  # the backlog's minimum over the last third
    lateness_growth: float | None = None
    kept_up: bool = True
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
            "life_lost": self.life_lost, "joining_lost": self.joining_lost,
            "before_window_lost": self.before_window_lost, "seq_holes": self.holes,
            "join_lateness_max_ms": pct(self.join_lateness_s, 100),
            "gc_collections": len(self.gc_s), "gc_max_ms": pct(self.gc_s, 100),
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
            "kept_up": self.kept_up,
            "backlog_growth_rows_per_s": self.backlog_growth_per_s,
            "lateness_growth_s_per_s": self.lateness_growth,
            **({"why": self.why.strip()} if self.why else {}),
        }

    def line(self) -> str:
        api = self.api
        api_txt = (f"; api {api.get('req_per_s')} req/s p99 {api.get('p99_ms')} ms "
                   f"{api.get('errors')} err {api.get('unfinished')} unfinished" if api else "")
        verdict = ("LOSSLESS" if self.lossless else f"with {self.lost} lost" if self.lost
                   else "none lost but FELL BEHIND")
        growth = (f"; backlog floor {self.backlog_growth_per_s:+,.0f} rows/s (last third "
                  f"{self.backlog_floor_end or 0:,.0f}), lateness floor "
                  f"{self.lateness_growth or 0:+.4f} s/s"
                  if self.backlog_growth_per_s is not None else "")
        return (
            f"  {self.hz:g} Hz x {self.channels:5d} ch ({self.cabinets} cab): {verdict}; "
            f"stored {self.stored_per_s:8.0f}/s, window rows {self.window_rows} lost "
            f"{self.window_lost} {self.loss_causes}, whole life lost {self.life_lost} (while "
            f"joining {self.joining_lost}, max lateness then "
            f"{pct(self.join_lateness_s, 100)} ms, before the window "
            f"{self.before_window_lost}), gc {len(self.gc_s)} collections max "
            f"{pct(self.gc_s, 100)} ms, seq "
            f"holes {self.holes}; {self.phase_changes} set-point changes; lateness p50 "
            f"{pct(self.lateness_s, 50)} p99 {pct(self.lateness_s, 99)} max "
            f"{pct(self.lateness_s, 100)} ms ({self.ticks_over_period} ticks later than a "
            f"period); breach->off n={len(self.breach_to_off_s)} p99 "
            f"{pct(self.breach_to_off_s, 99)} ms, ->ack p99 {pct(self.breach_to_ack_s, 99)} "
            f"ms; claim {self.claim_s:.1f} s for {self.new_runs} runs; trial "
            f"{self.trial_s:.0f} s; cpu% {self.cpu_pct}; writer {self.writer}{growth}{api_txt}"
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


class GcTimer:
    """The garbage collector's pauses in this process (the engine's) while it runs: a
    full collection stalls every instrument loop."""

    def __init__(self) -> None:
        self.pauses_s: list[float] = []
        self._t0 = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses_s.append(time.perf_counter() - self._t0)

    def stop(self) -> list[float]:
        gc.callbacks.remove(self._cb)
        return self.pauses_s


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
            max_batch_rows=s.writer_max_batch_rows,
            commit_interval_s=s.writer_commit_interval_s,
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
        for c0 in range(0, len(todo), CREATE_CHUNK):
            async with session_scope(self.lab.maker) as s:
                for ch, b, v0 in todo[c0: c0 + CREATE_CHUNK]:
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
        # The runs are queued before the node starts, as the API would have queued them:
        # created in this process while the node sampled, their validation would stall
        # the node's loop (a cost of the benchmark, not of the engine).
        await self._create_runs()
        step.new_runs = len(self.ids)
        log(f"  {self.cabinets} cab x {self.cpc} ch: {len(self.ids)} runs created in "
            f"{time.perf_counter() - t_trial:.1f} s")
        # The API load's client starts now and waits: its start-up would compete with the
        # node for the CPU while its runs join and settle.
        sync = Path(tempfile.mkdtemp(prefix="api-load-", dir=self.lab.db_path.parent))
        spec = {"port": self.lab.api_port, "token": self.lab.token, "ids": self.ids,
                "rate_hz": plan.api_rate_hz, "conns": plan.api_conns,
                "kinds": plan.api_kinds, "duration_s": plan.settle_s + plan.window_s + 0.5,
                "ready_path": str(sync / "ready"), "go_path": str(sync / "go")}
        load: subprocess.Popen[str] | None = self.lab.children.spawn(
            "api-load", [sys.executable, str(HERE), "--api-load", json.dumps(spec)],
            stdout=subprocess.PIPE, text=True)
        give_up = time.perf_counter() + 120
        while not (sync / "ready").exists():
            if time.perf_counter() > give_up or load.poll() is not None:
                self.lab.children.stop(load)
                raise RuntimeError("API load client not ready: "
                                   + self.lab.children.tail("api-load"))
            await asyncio.sleep(0.02)
        task = asyncio.create_task(node.run_forever(), name="node")
        w0 = w1 = t_joined = 0.0
        try:
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
            t_joined = time.time()
            for g in node.groups.values():
                step.join_lateness_s.extend(g.lateness_s)
            log(f"  all sampling after {time.perf_counter() - t_trial:.1f} s")
            (sync / "go").touch()
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
            gc_timer = GcTimer()
            t0, w0 = time.perf_counter(), time.time()
            # Watch the writer's backlog through the window (cheap: attribute reads).
            backlog: list[tuple[float, float]] = []
            while time.perf_counter() - t0 < plan.window_s:
                backlog.append((time.perf_counter() - t0, wr.pending_rows))
                await asyncio.sleep(min(0.2, max(0.0, plan.window_s
                                                 - (time.perf_counter() - t0))))
            t1, w1 = time.perf_counter(), time.time()
            pending_max = int(max((v for _, v in backlog), default=0))
            step.gc_s = gc_timer.stop()
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
            lat_growth = []
            for g, i0, j0, k0 in zip(groups, l0, b0, o0, strict=True):
                lat = g.lateness_s[i0:]
                lat_growth.append(growth_per_s(lat, t1 - t0))
                step.lateness_s.extend(lat)
                step.ticks_over_period += sum(1 for x in lat if x > self.period)
                step.breach_to_ack_s.extend(g.breach_to_ack_s[j0:])
                step.breach_to_off_s.extend(g.breach_to_off_s[k0:])
            out, _ = await asyncio.to_thread(load.communicate, None, 30)
            lines = [x for x in (out or "").splitlines() if x.startswith("{")]
            step.api = (json.loads(lines[-1]) if lines
                        else {"error": self.lab.children.tail("api-load")})
            step.cpu_pct["api_load"] = float(step.api.get("cpu_pct", 0.0))
            if step.api.get("slow_ms_at_s"):
                log(f"api requests over 50 ms (s after the start, ms): {step.api['slow_ms_at_s']}")
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
            if plan.buffered:
                step.backlog_growth_per_s = round(growth_of(backlog), 1)
                step.backlog_floor_end = last_floor(backlog)
                step.lateness_growth = round(max(lat_growth, default=0.0), 4)
                step.kept_up = kept_up(step, pending_max >= wr.max_pending_rows,
                                       self.lab.settings.writer_batch_rows)
            log(f"  window counted after {time.perf_counter() - t_trial:.1f} s")
        finally:
            if load is not None:
                self.lab.children.stop(load)
            await self._close(task)
            log(f"  runs and node stopped after {time.perf_counter() - t_trial:.1f} s")
        f = await asyncio.to_thread(final_check, self.lab.db_path, min(self.ids),
                                    max(self.ids), self.period, self.breach_ids,
                                    [t_joined, w0, w1])
        self.final = f
        w = node.writer
        step.joining_lost, step.before_window_lost, step.life_lost = f["lost"]
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
                         and step.window_rows > 0 and step.kept_up)
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


# Buffered mode keeps readings in the cabinets' rings while the engine is behind, so a
# window can lose nothing and still not be sustainable: an engine or writer slower than
# the cabinets falls further behind every second until a ring overflows. A trial counts
# only if it kept up: the writer's backlog never reached its bound (the engine never
# waited for it), and the floor of neither the backlog nor the fetch lateness rose through
# the window by more than these (a backlog growing by 2 % of the rows stored per second
# fills a 200,000-row bound in minutes at 100,000/s; lateness growing by 0.02 s a second
# passes a 10 s ring in under 10 minutes).
BACKLOG_GROWTH_MAX = 0.02  # of the stored rate
LATENESS_GROWTH_MAX = 0.02  # seconds of lateness per second of window


def growth_of(points: list[tuple[float, float]]) -> float:
    """How fast the floor of (t, value) points rose, units per second: the minimum over
    the last third against the minimum over the first third, divided by the time between
    the thirds' middles (0 for fewer than 6 points). The floor, not a fit through every
    point: the writer's backlog is a sawtooth (it empties at each commit of up to
    ``writer_max_batch_rows``) and lateness has spikes, and either made a least-squares
    slope over a 10 s window swing by several percent of the rate with nothing falling
    behind; a writer or engine that falls behind raises the floor."""
    thirds = _thirds(points)
    if thirds is None:
        return 0.0
    first, last = thirds
    dt = (last[0][0] + last[-1][0]) / 2 - (first[0][0] + first[-1][0]) / 2
    if dt <= 0:
        return 0.0
    return (min(v for _, v in last) - min(v for _, v in first)) / dt


def last_floor(points: list[tuple[float, float]]) -> float | None:
    """The minimum over the last third of (t, value) points (None for fewer than 6), the
    floor :func:`growth_of` compares with the first third's."""
    thirds = _thirds(points)
    return None if thirds is None else min(v for _, v in thirds[1])


def _thirds(points: list[tuple[float, float]]
            ) -> tuple[list[tuple[float, float]], list[tuple[float, float]]] | None:
    """The first and the last third of ``points`` (None for fewer than 6)."""
    if len(points) < 6:
        return None
    k = len(points) // 3
    return points[:k], points[-k:]


def growth_per_s(lateness_s: list[float], span_s: float) -> float:
    """:func:`growth_of` a fetch loop's lateness over the window, its fetches taken as
    evenly spread over ``span_s`` (they are, give or take the lateness itself)."""
    n = len(lateness_s)
    return growth_of([(span_s * j / max(1, n - 1), x) for j, x in enumerate(lateness_s)])


def kept_up(step: Step, hit_bound: bool, batch_rows: int) -> bool:
    """Whether a buffered trial could have gone on (see BACKLOG_GROWTH_MAX); says why not
    in ``step.why``. A backlog whose floor stays within one writer batch (``batch_rows``)
    has not fallen behind, whatever its rise: the writer lets up to a batch wait for its
    age flush, and a short window's thirds can each miss a flush's trough."""
    why = []
    if hit_bound:
        why.append("the writer's backlog reached its bound")
    if ((step.backlog_growth_per_s or 0.0) > BACKLOG_GROWTH_MAX * max(step.stored_per_s, 1.0)
            and (step.backlog_floor_end or 0.0) > batch_rows):
        why.append(f"the floor of the writer's backlog rose by "
                   f"{step.backlog_growth_per_s:,.0f} rows/s")
    if (step.lateness_growth or 0.0) > LATENESS_GROWTH_MAX:
        why.append(f"the floor of the fetch lateness rose by {step.lateness_growth:.3f} s "
                   "a second")
    if why:
        step.why += " fell behind (" + "; ".join(why) + "): not sustainable;"
    return not why


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


