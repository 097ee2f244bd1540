"""Rig for engine tests: a simulated lab served over real TCP, the acquisition node in this
process on the lab's clock, and helpers to register the lab, start runs and read results.

The engine talks to the simulators only through their drivers and sockets, exactly as in a
lab; the one shortcut is the clock: :class:`WarpClock` lets the engine read the simulated
lab's own clock, so a test may change the lab's speed while runs go on (both sides always
agree on simulated time). :class:`SpeedGovernor` uses that to run fast through long rests
and slowly through short pulses.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from labdaq.channels import upsert_instrument
from labdaq.cli import sim_lab_aux
from labdaq.engine.clock import EngineClock
from labdaq.engine.node import AcquisitionNode
from labdaq.protocol import ResolvedProtocol
from labdaq.runs import RunCreate, create_run
from labdaq.sims.cell import load_cell_spec
from labdaq.sims.clock import SimClock
from labdaq.sims.lab import SimLab
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker

ACTIVE = ("queued", "running", "paused")


class WarpClock(EngineClock):
    """The engine's clock, reading the simulated lab's clock (whose speed may change)."""

    def __init__(self, sim_clock: SimClock) -> None:  # noqa: D107 - no EngineClock.__init__
        self.sim = sim_clock

    @property  # type: ignore[override]
    def speed(self) -> float:
        return self.sim.speed

    def now(self) -> float:
        return self.sim.now()

    async def sleep_until(self, t_s: float) -> None:
        # Short naps, so a change of speed takes effect within 20 ms.
        while (delay := (t_s - self.now()) / self.speed) > 0:
            await asyncio.sleep(min(delay, 0.02))


class SpeedGovernor:
    """Steers the lab's speed, every ``period_s`` wall seconds, from what the runs do and
    how fast the engine keeps up. A test-harness device: it paces the simulation, the
    engine only ever sees its readings.

    Why not one fixed speed: at 50,000× every millisecond of command latency is close to
    a simulated minute. The simulators step their cells by the time between two commands
    (a cell near a limit at 1 s, so their CPU grows with speed), a phase change takes a
    few round trips during which the engine cannot know when the current switched, and
    the last half per cent of a discharge holds a volt of OCV. So the governor aims at:

    * about ``tick_s`` simulated seconds per control tick (slowest instrument loop),
      less near an event: a tenth of the time left until it;
    * at an event where the current changes by ΔI (a rest or pulse ending, a CC step
      reaching its end voltage or capacity, the cell getting empty), a speed at which
      ``latency_s`` of command latency moves at most ``budget`` of the cell's capacity
      uncounted, reached by slowing down over the ``lead_s`` wall seconds before it;
    * at most ``slow`` in a pulse, ``eis`` during an impedance sweep (one exchange per
      point with the meter, about a second of wall time, which must not become half a
      day of rest), ``base`` while current flows, ``fast`` while every run rests;
    * half the speed at once when an instrument loop has not ticked for ``stall_s``:
      the simulators are falling behind.

    Events are anticipated from the phase (deadline, end voltage, end capacity) and the
    readings (rate of change of the voltage); the time to an empty cell is read from the
    simulated cell itself.
    """

    def __init__(
        self,
        lab: SimLab,
        node: AcquisitionNode,
        base: float,
        slow: float | None = None,
        fast: float | None = None,
        tick_s: float = 60.0,
        floor: float = 50.0,
        period_s: float = 0.01,
        eis: float = 100.0,
        lead_s: float = 0.05,
        latency_s: float = 0.01,
        budget: float = 0.001,
        stall_s: float = 0.05,
    ) -> None:
        self.lab, self.node = lab, node
        self.base = base
        self.slow = slow if slow is not None else base
        self.fast = fast if fast is not None else base
        self.tick_s = tick_s
        self.floor = floor
        self.period_s = period_s
        self.eis = eis
        self.lead_s = lead_s
        self.latency_s = latency_s
        self.budget = budget
        self.stall_s = stall_s
        self.history: list[float] = []
        self._ticks: dict[str, int] = {}
        self._last_tick: dict[str, float] = {}
        self._seen: dict[int, tuple[float, float, float]] = {}  # run -> t, v, |dV/dt|
        # Start slow and let the feedback raise the speed (×2 per period at most).
        lab.clock.speed = min(base, 1000.0)
        self._t_sim = lab.clock.now()

    # -- what the runs need -------------------------------------------------------------
    def _wants(self) -> tuple[float, dict[str, float]]:
        """(speed cap, simulated seconds per tick wanted by each group)."""
        now = self.lab.clock.now()
        cap = self.fast
        wants: dict[str, float] = {}
        for g in list(self.node.groups.values()):
            want = math.inf
            for k, (r, p) in enumerate(zip(list(g.runs), list(g.phases), strict=False)):
                if k >= len(g.a_t0):
                    break
                run_cap, tick = self._run(g, k, r, p, now - float(g.a_t0[k]))
                cap = min(cap, run_cap)
                want = min(want, tick)
            wants[g.name] = want
        return cap, wants

    def _run(self, g: Any, k: int, r: Any, p: Any, t: float) -> tuple[float, float]:
        """(speed cap, simulated seconds per tick) for run ``r`` in phase ``p`` at ``t``."""
        i_now = float(g.a_last_i[k]) if math.isfinite(float(g.a_last_v[k])) else 0.0
        if p.name.startswith("pulse"):
            cap = self.slow
        elif p.aux is not None and p.aux.step == "eis":
            cap = self.eis
        elif p.mode == "off" and p.aux is None:
            cap = self.fast
        else:
            cap = self.base
        tick = self.tick_s
        events: list[tuple[float, float]] = []  # (simulated s until, |ΔI| then)
        i_next = _next_current(r, p)
        if math.isfinite(p.deadline_t_s):
            events.append((p.deadline_t_s - t, abs(i_next - i_now)))
        if p.mode == "cc" and p.name != "cccv.cc":  # cccv.cc → CV: no current step
            end = p.voltage_above_v if math.isfinite(p.voltage_above_v) else p.voltage_below_v
            if math.isfinite(end):
                left_v = self._approach(r.run_id, g, k, end)
                events.append((left_v, abs(i_next - i_now)))
                tick = min(tick, max(0.5, 0.01 / max(self._seen[r.run_id][2], 1e-12)))
            if math.isfinite(p.capacity_ah) and i_now:
                left_q = (p.capacity_ah - float(g.a_step_cap[k])) * 3600 / abs(i_now)
                events.append((left_q, abs(i_next - i_now)))
        to_empty = self._to_empty(g.name, r.channel)
        if math.isfinite(to_empty):
            events.append((to_empty, abs(i_now)))
            tick = min(tick, max(0.25, to_empty / 50))
        capacity = self._capacity(g.name, r.channel)
        for left, di in events:
            left = max(left, 0.0)
            tick = min(tick, max(0.5, left / 10))
            if di > 1e-9:
                at_event = 2 * self.budget * capacity * 3600 / (di * self.latency_s)
                cap = min(cap, max(at_event, left / self.lead_s))
        return max(cap, self.floor), tick

    def _approach(self, run_id: int, g: Any, k: int, end: float) -> float:
        """Simulated seconds until the voltage reaches ``end`` at its present rate."""
        t, v = float(g.a_last_t[k]), float(g.a_last_v[k])
        prev = self._seen.get(run_id)
        rate = prev[2] if prev else 0.0
        if prev and t > prev[0] and math.isfinite(v) and math.isfinite(prev[1]):
            rate = abs(v - prev[1]) / (t - prev[0])
        if not prev or t > prev[0]:
            self._seen[run_id] = (t, v, rate)
        if not math.isfinite(v) or rate <= 0:
            return math.inf
        return abs(v - end) / rate

    def _bank(self, instrument: str, channel: int) -> tuple[Any, int] | None:
        sim = self.lab.by_name(instrument).sim
        bank = getattr(sim, "cell", None) or getattr(sim, "bank", None)
        if bank is None or not hasattr(bank, "soc"):
            return None
        return bank, (0 if bank.n == 1 else channel - 1)

    def _capacity(self, instrument: str, channel: int) -> float:
        found = self._bank(instrument, channel)
        return float(found[0].capacity_ah[found[1]]) if found else 1.0

    def _to_empty(self, instrument: str, channel: int) -> float:
        """Simulated seconds until the channel's cell is empty at its present current
        (inf unless it discharges)."""
        found = self._bank(instrument, channel)
        if found is None:
            return math.inf
        bank, j = found
        soc, i = float(bank.soc[j]), float(bank.current_a[j])
        if i >= 0:
            return math.inf
        return max(soc, 0.0) * float(bank.capacity_ah[j]) * 3600 / -i

    # -- control ------------------------------------------------------------------------
    def step(self) -> float:
        clock = self.lab.clock
        now, wall = clock.now(), time.monotonic()
        elapsed, self._t_sim = now - self._t_sim, now
        cap, wants = self._wants()
        ratio = math.inf
        for g in list(self.node.groups.values()):
            if not g.runs or g.name not in wants:
                continue
            done = g.ticks - self._ticks.get(g.name, g.ticks)
            self._ticks[g.name] = g.ticks
            if done or g.name not in self._last_tick:
                self._last_tick[g.name] = wall
            elif wall - self._last_tick[g.name] > self.stall_s:
                ratio = min(ratio, 0.5)
            observed = elapsed / max(done, 1)
            if observed > 0:
                ratio = min(ratio, wants[g.name] / observed)
        speed = clock.speed
        if math.isfinite(ratio):
            speed *= min(2.0, max(0.25, ratio))
        return min(cap, max(self.floor, speed))

    async def run(self) -> None:
        while True:
            speed = self.step()
            if speed != self.lab.clock.speed:
                self.lab.clock.speed = speed
            self.history.append(speed)
            await asyncio.sleep(self.period_s)


def _next_current(r: Any, p: Any) -> float:
    """The current (A, signed) the run's next phase will draw, as far as the plan says."""
    if p.name == "pulse.on":
        return 0.0
    if p.name == "pulse.rest":
        return float(r.step.current_a)
    for st in r.program[r.pc + 1 :]:
        if st.step in ("cc", "cccv", "pulse"):
            return float(st.current_a)
        if st.step == "cv":
            return float(st.current_limit_a)
        if st.step not in ("loop_start", "loop_end"):
            return 0.0
    return 0.0


def derived_cell_spec(path: Path, base: str = "nmc811", **changes: Any) -> str:
    """Write a cell spec YAML derived from a shipped one; nested keys as 'a.b'."""
    data = load_cell_spec(base).model_dump(mode="json")
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path.write_text(yaml.safe_dump(data))
    return str(path)


def nmc_18650_spec(tmp: Path, **changes: Any) -> str:
    """An 18650-size NMC cell: nmc811's tables, 2.4 Ah, 1C charge / 3C discharge, twice the
    resistance and about two thirds of the mass of the 21700. Every shipped template
    resolves for it (3C = 7.2 A) and a Keithley 2460 (7.35 A) can drive it."""
    res = load_cell_spec("nmc811").resistance
    values: dict[str, Any] = {
        "name": "nmc_18650",
        "capacity_ah": 2.4,
        "max_charge_current_a": 2.4,
        "max_discharge_current_a": 7.2,
        "resistance.r0_ohm": 2 * res.r0_ohm,
        "resistance.r1_ohm": 2 * res.r1_ohm,
        "resistance.r2_ohm": 2 * res.r2_ohm,
        "thermal.mass_kg": 0.046,
        "thermal.h_w_per_k": 0.035,
        **changes,
    }
    return derived_cell_spec(tmp / f"{values['name']}.yaml", **values)


async def register_lab(maker: async_sessionmaker[AsyncSession], desc: dict[str, Any]) -> None:
    """Instruments (with their options), channels (with aux wiring) and cells, as
    ``labdaq serve --sim`` registers them."""
    aux = sim_lab_aux(desc)
    async with session_scope(maker) as s:
        for inst in desc["instruments"]:
            await upsert_instrument(
                s,
                inst["name"],
                inst["driver"],
                inst["resource"],
                [
                    {
                        **{k: ch[k] for k in ("index", "name", "max_current_a", "max_voltage_v")},
                        "aux": aux.get(ch["cell"]["serial"]) or None,
                    }
                    for ch in inst["channels"]
                ],
                options=inst.get("options") or {},
            )
            for ch in inst["channels"]:
                cell = ch["cell"]
                if not await s.scalar(select(m.Cell.id).where(m.Cell.serial == cell["serial"])):
                    s.add(m.Cell(**cell))


def channel_cell(desc: dict[str, Any], channel: str) -> str:
    for inst in desc["instruments"]:
        for ch in inst["channels"]:
            if ch["name"] == channel:
                return str(ch["cell"]["serial"])
    raise KeyError(channel)


@dataclass
class Rig:
    lab: SimLab
    desc: dict[str, Any]
    engine: AsyncEngine
    maker: async_sessionmaker[AsyncSession]
    node: AcquisitionNode
    clock: WarpClock
    task: asyncio.Task[None]
    extra: list[asyncio.Task[None]] = field(default_factory=list)

    async def start_run(self, channel: str, sample_period_s: float = 1.0, **source: Any) -> int:
        """Queue a run (``template=``, ``protocol_document=`` or ``protocol=``)."""
        async with session_scope(self.maker) as s:
            run = await create_run(
                s,
                RunCreate(
                    channel=channel,
                    cell_serial=channel_cell(self.desc, channel),
                    sample_period_s=sample_period_s,
                    **source,
                ),
                actor="test",
            )
            await s.flush()
            return int(run.id)

    async def wait_end(self, run_id: int, timeout_s: float = 60.0) -> m.Run:
        return await wait_end(self.maker, run_id, timeout_s)

    async def stop(self) -> None:
        for t in self.extra:
            t.cancel()
        self.node.request_stop()
        await asyncio.wait_for(self.task, 30)
        await self.engine.dispose()
        self.lab.stop()


async def start_rig(
    url: str, lab: SimLab, control_period_s: float = 1.0, **node_kw: Any
) -> Rig:
    """Serve ``lab``, register it, start a node; returns once the node has made every
    instrument safe. Until then the lab runs at 1×: a simulated SMU starts as a real one
    does after power-on (output off in NORMAL mode, which holds 0 V and so drains the
    cell at 10 % of range) and at 20,000× the cells would be empty before the node has
    switched it to high impedance."""
    speed = lab.clock.speed
    lab.clock.speed = 1.0
    desc = lab.start()
    engine = create_engine(url)
    maker = sessionmaker(engine)
    await register_lab(maker, desc)
    clock = WarpClock(lab.clock)
    kw: dict[str, Any] = {"poll_s": 0.25, "batch_age_s": 0.2, **node_kw}
    node = AcquisitionNode(engine, clock, control_period_s=control_period_s, **kw)
    task = asyncio.create_task(node.run_forever(), name="node")
    smus = [inst.sim for inst in lab.instruments if inst.kind == "smu"]
    await wait_for(
        lambda: len(node.instruments) == len(desc["instruments"])
        and all(sim.off_mode["CURR"] == "HIMP" for sim in smus),
        timeout_s=20,
        what="the node to open and make safe every instrument",
    )
    lab.clock.speed = speed
    return Rig(lab, desc, engine, maker, node, clock, task)


async def wait_end(
    maker: async_sessionmaker[AsyncSession], run_id: int, timeout_s: float = 60.0
) -> m.Run:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        async with session_scope(maker) as s:
            run = await s.get(m.Run, run_id)
            assert run is not None
            if run.state not in ACTIVE:
                return run
        if loop.time() > deadline:
            raise AssertionError(f"run {run_id} still {run.state} after {timeout_s} s")
        await asyncio.sleep(0.25)


async def wait_for(
    pred: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition"
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# -- reading results ---------------------------------------------------------------------
SampleArrays = dict[str, np.ndarray]


async def samples(maker: async_sessionmaker[AsyncSession], run_id: int) -> SampleArrays:
    """Every stored sample of a run, ordered by seq, as numpy columns."""
    async with session_scope(maker) as s:
        rows = (
            await s.execute(
                select(
                    m.Sample.seq,
                    m.Sample.t_s,
                    m.Sample.step_index,
                    m.Sample.cycle_index,
                    m.Sample.voltage_v,
                    m.Sample.current_a,
                    m.Sample.temperature_c,
                    m.Sample.step_capacity_ah,
                    m.Sample.flags,
                )
                .where(m.Sample.run_id == run_id)
                .order_by(m.Sample.seq)
            )
        ).all()
    names = ("seq", "t_s", "step_index", "cycle_index", "voltage_v", "current_a",
             "temperature_c", "step_capacity_ah", "flags")
    cols = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    out = {n: np.asarray(c, dtype=float) for n, c in zip(names, cols, strict=True)}
    for n in ("seq", "step_index", "cycle_index", "flags"):
        out[n] = out[n].astype(np.int64)
    return out


async def rows_of(
    maker: async_sessionmaker[AsyncSession], model: Any, run_id: int, order: Any
) -> list[Any]:
    async with session_scope(maker) as s:
        return list(
            (await s.scalars(select(model).where(model.run_id == run_id).order_by(order))).all()
        )


def plan_of(run: m.Run) -> ResolvedProtocol:
    return ResolvedProtocol.model_validate(run.plan)


def assert_contiguous(seq: np.ndarray) -> None:
    """seq is 1..N: nothing lost, nothing duplicated."""
    assert seq.size > 0, "no samples stored"
    assert seq[0] == 1, f"first seq {seq[0]}"
    gaps = np.flatnonzero(np.diff(seq) != 1)
    assert gaps.size == 0, f"seq not contiguous at {[(seq[g], seq[g + 1]) for g in gaps[:5]]}"
