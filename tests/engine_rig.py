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
import threading
import time
from collections.abc import Awaitable, Callable
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

    def __init__(self, sim_clock: SimClock | LockstepClock) -> None:
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


class HoldClock(WarpClock):
    """A paced instrument loop's clock (:class:`SpeedGovernor`): its loop wakes for a tick
    only once simulated time has reached the loop's hold, so the tick reads the
    instrument at the hold, and the clock stays there until the tick is done.

    Without it the loop woke as soon as the clock passed its deadline (a loop period after
    the last reading) while the clock was still running at up to 10^6× towards the hold:
    the engine stamped the reading with the time its query went out, and the simulator
    took it whenever the query arrived, up to the hold — on a busy machine tens of
    simulated seconds later (70 s seen in a CC discharge, 4,000 s in a rest). The stamps,
    and the voltage rates the governor computes from them, then depended on how fast this
    process was scheduled."""

    def __init__(self, sim_clock: LockstepClock, key: str) -> None:
        super().__init__(sim_clock)
        self.lockstep = sim_clock
        self.key = key

    async def sleep_until(self, t_s: float) -> None:
        if self.lockstep.held(self.key) is None:
            # A loop's first tick (its runs have just joined): it reads at its deadline too.
            self.lockstep.hold(self.key, max(t_s, self.now()))
        while True:
            hold = self.lockstep.held(self.key)
            target = t_s if hold is None else max(t_s, hold)
            delay = (target - self.now()) / self.speed
            if delay <= 0:
                return
            # Short naps, as WarpClock: a change of speed or of hold takes effect soon.
            await asyncio.sleep(min(delay, 0.02))


class LockstepClock:
    """Simulated time for a lab and for the engine reading it (pass it to ``SimLab(clock=)``,
    then wrap it in :class:`WarpClock` for the node).

    It runs at ``speed`` like :class:`labdaq.sims.clock.SimClock`, but never past the
    lowest *hold* (``hold(key, t)``; :class:`SpeedGovernor` sets one per instrument loop
    after each of its ticks): simulated time waits for the engine. Time the engine does not
    use while it is held is dropped, not caught up later. At 10,000× a stall of 50 ms —
    a garbage collection, another process on the CPU — would otherwise be eight simulated
    minutes between two readings, enough to carry a cell through its cut-off.
    """

    def __init__(self, speed: float = 1.0) -> None:
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._offset = 0.0
        self._speed = float(speed)
        self._holds: dict[str, float] = {}

    @property
    def speed(self) -> float:
        return self._speed

    @speed.setter
    def speed(self, value: float) -> None:
        with self._lock:
            now = time.monotonic()
            self._offset += (now - self._t0) * self._speed
            self._t0 = now
            self._speed = float(value)

    def hold(self, key: str, t_s: float) -> None:
        with self._lock:
            self._holds[key] = t_s

    def release(self, key: str) -> None:
        with self._lock:
            self._holds.pop(key, None)

    def held(self, key: str) -> float | None:
        """The hold ``key`` set (None: none)."""
        with self._lock:
            return self._holds.get(key)

    def now(self) -> float:
        with self._lock:
            t = self._offset + (time.monotonic() - self._t0) * self._speed
            limit = min(self._holds.values(), default=math.inf)
            if t > limit:
                self._offset -= t - limit  # drop what the engine did not use
                t = limit
            return t


class SpeedGovernor:
    """Paces a lab on a :class:`LockstepClock` from what its runs do (a test-harness
    device: the engine only ever sees its readings).

    After each tick of an instrument loop it lets simulated time run at most a *gap* past
    that tick's reading, and the loop's next tick reads the instrument exactly there
    (:class:`HoldClock`), so readings are a gap apart in simulated time however busy the
    machine is; the gap is what the loop's runs need from the next reading:

    * ``tick_s`` normally (a CV taper, a chamber settling, the middle of a CC step);
    * a tenth of the time left until the next event (a phase's deadline, a CC step
      reaching its end voltage — from the voltage's rate of change — or its capacity),
      so that the step ends close to it and the current step of the next phase is
      measured within a fraction of a second of simulated time;
    * a fiftieth of the time until the cell is empty while it discharges (read from the
      simulated cell): the last half per cent of a discharge holds a volt of OCV, and the
      simulators step their cells by the time between two commands;
    * 1 s in a pulse (an HPPC pulse lasts 10 s) and during an impedance sweep;
    * in a rest, a tenth of what is left of it, at most ``max_gap_s``: the simulators
      catch up on simulated time when asked (an idle SMU in 30 s steps, the chamber's air
      in 2 s steps), and one reply must stay well within the driver's 2 s timeout.

    Never less than the loop's own period (it would wait for a deadline the clock never
    reaches). Between holds the clock runs at ``fast`` — except ``eis`` during an impedance
    sweep, which takes wall time (one exchange per point with the meter, about a second
    here) that must not become half a day of rest — and at ``idle`` while no run measures.
    """

    def __init__(
        self,
        lab: SimLab,
        node: AcquisitionNode,
        fast: float = 1e6,
        tick_s: float = 120.0,
        eis: float = 100.0,
        idle: float = 1000.0,
        period_s: float = 0.01,
        max_gap_s: float = 20_000.0,
    ) -> None:
        assert isinstance(lab.clock, LockstepClock), "the lab needs a LockstepClock"
        self.lab, self.node = lab, node
        self.clock: LockstepClock = lab.clock
        self.fast = fast
        self.tick_s = tick_s
        self.eis = eis
        self.idle = idle
        self.period_s = period_s
        self.max_gap_s = max_gap_s
        self.history: list[float] = []
        self._caps: dict[str, float] = {}
        self._seen: dict[int, tuple[float, float, float]] = {}  # run -> t, v, |dV/dt|
        original = node._group_for

        async def group_for(instrument_id: int) -> Any:
            g = await original(instrument_id)
            if not getattr(g, "_paced", False):
                self._pace(g)
            return g

        node._group_for = group_for  # type: ignore[method-assign]

    def _pace(self, g: Any) -> None:
        tick = g._tick
        g.clock = HoldClock(self.clock, g.name)

        async def paced(*args: Any) -> None:
            # The tick's reading time: the clock waits here, at the loop's hold (HoldClock).
            t_read = self.clock.now()
            try:
                await tick(*args)
            finally:
                self._after_tick(g, t_read)

        g._tick = paced
        g._paced = True

    def _after_tick(self, g: Any, t_read: float) -> None:
        if not g.runs:
            self.clock.release(g.name)
            self._caps.pop(g.name, None)
            return
        now = self.clock.now()
        cap, gap = math.inf, math.inf
        for k, (r, p) in enumerate(zip(list(g.runs), list(g.phases), strict=False)):
            if k >= len(g.state.t0_clock_s):
                break
            run_cap, run_gap = self._run(g, k, r, p, now - float(g.state.t0_clock_s[k]))
            cap, gap = min(cap, run_cap), min(gap, run_gap)
        self._caps[g.name] = cap
        # Never less than the loop's own period: it sleeps until then for its next tick
        # (its next deadline is at most a period past this tick's start). The gap counts
        # from the reading: the next reading is then at most a gap after it. Never before
        # now: simulated time does not go back.
        period = min(float(g.state.period_s.min()), g.control_period_s)
        self.clock.hold(g.name, max(now, t_read + max(gap, period)))

    def _run(self, g: Any, k: int, r: Any, p: Any, t: float) -> tuple[float, float]:
        """(speed cap, simulated seconds to the next reading) for run ``r`` in phase ``p``."""
        cap, gap = self.fast, self.tick_s
        if p.name.startswith("pulse"):
            gap = 1.0
        elif p.aux is not None and p.aux.step == "eis":
            cap, gap = self.eis, 1.0
        elif p.mode == "off" and p.aux is None:
            gap = math.inf  # a rest: only its end matters
        events: list[float] = []
        if math.isfinite(p.deadline_t_s):
            events.append(p.deadline_t_s - t)
        if p.mode == "cc" and p.name != "cccv.cc":  # cccv.cc → CV: no current step
            end = p.voltage_above_v if math.isfinite(p.voltage_above_v) else p.voltage_below_v
            if math.isfinite(end):
                events.append(self._approach(r.run_id, g, k, end))
            i_now = float(g.state.last_current_a[k])
            if math.isfinite(p.capacity_ah) and i_now:
                left_ah = p.capacity_ah - float(g.state.step_capacity_ah[k])
                events.append(left_ah * 3600 / abs(i_now))
        for left in events:
            gap = min(gap, max(0.5, left / 10))
        to_empty = self._to_empty(g.name, r.channel)
        if math.isfinite(to_empty):
            gap = min(gap, max(0.25, to_empty / 50))
        return cap, (min(gap, self.max_gap_s) if math.isfinite(gap) else self.tick_s)

    def _approach(self, run_id: int, g: Any, k: int, end: float) -> float:
        """Simulated seconds until the voltage reaches ``end`` at its present rate."""
        t, v = float(g.state.last_t_s[k]), float(g.state.last_voltage_v[k])
        prev = self._seen.get(run_id)
        rate = prev[2] if prev else 0.0
        if prev and t > prev[0] and math.isfinite(v) and math.isfinite(prev[1]):
            rate = abs(v - prev[1]) / (t - prev[0])
        if not prev or t > prev[0]:
            self._seen[run_id] = (t, v, rate)
        if not math.isfinite(v) or rate <= 0:
            return math.inf
        return abs(v - end) / rate

    def _to_empty(self, instrument: str, channel: int) -> float:
        """Simulated seconds until the channel's cell is empty at its present current
        (inf unless it discharges)."""
        sim = self.lab.by_name(instrument).sim
        bank = getattr(sim, "cell", None) or getattr(sim, "bank", None)
        if bank is None or not hasattr(bank, "soc"):
            return math.inf
        j = 0 if bank.n == 1 else channel - 1
        soc, i = float(bank.soc[j]), float(bank.current_a[j])
        if i >= 0:
            return math.inf
        return max(soc, 0.0) * float(bank.capacity_ah[j]) * 3600 / -i

    async def run(self) -> None:
        while True:
            # No run measuring: nothing holds the clock, keep the idle lab affordable.
            speed = min(self._caps.values(), default=self.idle)
            if speed != self.clock.speed:
                self.clock.speed = speed
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
    url: str, lab: SimLab, speed: float, control_period_s: float = 1.0, **node_kw: Any
) -> Rig:
    """Serve ``lab``, register it, start a node; returns once the node has made every
    instrument safe, with the lab then at ``speed``.

    Build the lab at 1× (SimLab's default) and say the speed here: a simulated SMU starts
    as a real one does after power-on (output off in NORMAL mode, which holds 0 V and so
    drains the cell at 10 % of range), and at 50,000× the cells would be empty before
    the node has switched it to high impedance — even the time spent building the lab
    would be hours of drain."""
    assert lab.clock.speed == 1.0, "build the SimLab at 1x and pass the speed to start_rig"
    desc = lab.start()
    engine = create_engine(url)
    maker = sessionmaker(engine)
    await register_lab(maker, desc)
    clock = WarpClock(lab.clock)
    # A wired sensor counts as lost only when a test says after how long: at 100x and
    # more, a busy machine's pause of a few hundred milliseconds is the engine's default
    # 15 s without a reading, and would stop runs with a temperature limit at random.
    kw: dict[str, Any] = {"poll_s": 0.25, "batch_age_s": 0.2, "temperature_lost_s": 1e9,
                          **node_kw}
    node = AcquisitionNode(engine, clock, control_period_s=control_period_s, **kw)
    task = asyncio.create_task(node.run_forever(), name="node")
    smus = [inst.sim for inst in lab.instruments if inst.kind == "smu"]
    await wait_for(
        lambda: len(node.instruments) == len(desc["instruments"])
        and all(sim.off_mode["CURR"] == "HIMP" for sim in smus),
        timeout_s=60,  # a condition poll: only a hang reaches it
        what="the node to open and make safe every instrument",
    )
    lab.clock.speed = speed
    return Rig(lab, desc, engine, maker, node, clock, task)


async def start_paced_rig(url: str, lab: SimLab, speed: float, *, tick_s: float = 120.0,
                          idle: float = 1000.0, **rig_kw: Any) -> Rig:
    """:func:`start_rig` on a lab whose :class:`LockstepClock` the engine's ticks pace: a
    :class:`SpeedGovernor` (``tick_s``, ``idle``) made before any run is claimed, so it
    paces each instrument group as the node creates it, and run as one of the rig's
    tasks."""
    rig = await start_rig(url, lab, speed, **rig_kw)
    gov = SpeedGovernor(lab, rig.node, tick_s=tick_s, idle=idle)
    rig.extra.append(asyncio.create_task(gov.run()))
    return rig


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


async def eventually(check: Callable[[], Awaitable[bool]], what: str,
                     timeout_s: float = 90.0) -> None:
    """Poll an async ``check`` (a database read) until it holds. A hang guard, not a
    timing check: below the 120 s a test may take, above what a loaded machine needs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


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
                    m.Sample.temperature_age_s,
                )
                .where(m.Sample.run_id == run_id)
                .order_by(m.Sample.seq)
            )
        ).all()
    names = ("seq", "t_s", "step_index", "cycle_index", "voltage_v", "current_a",
             "temperature_c", "step_capacity_ah", "flags", "temperature_age_s")
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
