"""ChannelWorker: runs one run's plan on one cycler channel, sample by sample."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from labdaq.engine.clock import EngineClock
from labdaq.engine.plan import Plan, PlanStep
from labdaq.engine.safety import Breach, SafetyMonitor
from labdaq.engine.tracker import Integrator
from labdaq.engine.writer import SampleRow, SampleWriter

log = logging.getLogger(__name__)


class SafetyAbort(Exception):
    def __init__(self, breach: Breach, seq: int, t_s: float) -> None:
        super().__init__(breach.describe())
        self.breach = breach
        self.seq = seq
        self.t_s = t_s


class StopRequested(Exception):
    pass


@dataclass
class RunOutcome:
    state: str
    reason: str


@dataclass
class Progress:
    step_index: int = 0
    step_count: int = 0
    cycle_index: int = 0
    elapsed_s: float = 0.0
    last_seq: int = 0


@dataclass
class RunContext:
    """What a worker needs from the outside world (database writes go through callbacks)."""

    run_id: int
    channel: int
    plan: Plan
    cycler: Any  # labdaq.drivers.roles.Cycler
    call: Callable[..., Awaitable[Any]]  # runs a blocking driver call on the instrument's worker
    writer: SampleWriter
    clock: EngineClock
    on_step_end: Callable[[dict[str, Any]], Awaitable[None]]
    on_cycle_end: Callable[[dict[str, Any]], Awaitable[None]]
    on_event: Callable[[str, str, str, dict[str, Any]], Awaitable[None]]
    progress: Progress = field(default_factory=Progress)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    start_seq: int = 0


class ChannelWorker:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.safety = SafetyMonitor(ctx.plan.limits)
        self.integ = Integrator()
        self.seq = ctx.start_seq
        self.step_number = 0
        self.t0_s = 0.0
        self.breach_to_off_s: list[float] = []

    async def run(self) -> RunOutcome:
        ctx = self.ctx
        lim = ctx.plan.limits
        ctx.progress.step_count = len(ctx.plan.steps)
        self.t0_s = ctx.clock.now()
        # Layer one of safety: the instrument's own protection, so it trips even if we stall.
        await ctx.call(
            ctx.cycler.configure_protection, ctx.channel, lim.voltage_max_v, lim.current_max_a
        )
        current_cycle: int | None = None
        try:
            for index, step in enumerate(ctx.plan.steps):
                if current_cycle is None or step.cycle_index != current_cycle:
                    if current_cycle is not None:
                        await ctx.on_cycle_end(self.integ.cycle.summary())
                    current_cycle = step.cycle_index
                    self.integ.new_cycle(step.cycle_index, self._t())
                ctx.progress.step_index = index
                ctx.progress.cycle_index = step.cycle_index
                await self._run_step(index, step)
            if current_cycle is not None:
                await ctx.on_cycle_end(self.integ.cycle.summary())
            return RunOutcome("completed", "all steps done")
        except SafetyAbort as abort:
            return RunOutcome("aborted_safety", str(abort))
        except StopRequested:
            return RunOutcome("stopped", "stop requested")
        finally:
            # Whatever happened, leave the channel safe before anything else.
            try:
                await ctx.call(ctx.cycler.output, ctx.channel, False)
            except Exception as exc:  # noqa: BLE001
                log.error("run %s: could not turn output off at end: %s", ctx.run_id, exc)
            await ctx.writer.flush()

    def _t(self) -> float:
        return self.ctx.clock.now() - self.t0_s

    async def _apply(self, step: PlanStep) -> None:
        ctx, lim = self.ctx, self.ctx.plan.limits
        if step.kind == "rest":
            await ctx.call(ctx.cycler.output, ctx.channel, False)
            return
        if step.kind in ("cc", "cccv"):
            if step.kind == "cccv" or step.current_a > 0:
                # Charging: the compliance voltage is the CV target (cccv) or just above the
                # end voltage (cc), so the instrument itself never overshoots.
                vlim = step.voltage_v if step.voltage_v is not None else lim.voltage_max_v
            else:
                vlim = lim.voltage_max_v
            await ctx.call(ctx.cycler.set_current, ctx.channel, step.current_a, vlim)
        elif step.kind == "cv":
            assert step.voltage_v is not None
            ilim = step.current_limit_a or lim.current_max_a
            await ctx.call(ctx.cycler.set_voltage, ctx.channel, step.voltage_v, ilim)
        await ctx.call(ctx.cycler.output, ctx.channel, True)

    async def _run_step(self, index: int, step: PlanStep) -> None:
        ctx = self.ctx
        period_s = ctx.plan.sample_period_s
        await self._apply(step)
        t_start = self._t()
        self.integ.new_step(t_start)
        self.step_number += 1
        end = step.end
        next_t = t_start
        reason = ""
        v = i = 0.0
        while not reason:
            if ctx.stop.is_set():
                raise StopRequested
            next_t += period_s
            await ctx.clock.sleep_until(self.t0_s + next_t)
            if ctx.stop.is_set():
                raise StopRequested
            meas = await ctx.call(ctx.cycler.measure, [ctx.channel])
            t_s = self._t()
            v, i, temp = float(meas[0][0]), float(meas[0][1]), float(meas[0][2])
            self.seq += 1
            breach = self.safety.check(t_s, v, i, temp)
            if breach is not None:
                # Output off first; recording comes after the cell is safe.
                t_breach = time.perf_counter()
                await ctx.call(ctx.cycler.output, ctx.channel, False)
                self.breach_to_off_s.append(time.perf_counter() - t_breach)
                await ctx.on_event(
                    "safety",
                    "critical",
                    f"safety limit crossed, output turned off: {breach.describe()}",
                    {
                        "limit": breach.limit,
                        "value": breach.value,
                        "bound": breach.bound,
                        "seq": self.seq,
                        "t_s": t_s,
                        "step_index": index,
                        "breach_to_off_s": self.breach_to_off_s[-1],
                    },
                )
                self.integ.add(t_s, v, i)
                await self._store(t_s, index, step, v, i, temp, flags=1)
                raise SafetyAbort(breach, self.seq, t_s)
            self.integ.add(t_s, v, i)
            await self._store(t_s, index, step, v, i, temp, flags=0)
            step_t = t_s - t_start
            if end.voltage_above_v is not None and v >= end.voltage_above_v:
                reason = "voltage_above"
            elif end.voltage_below_v is not None and v <= end.voltage_below_v:
                reason = "voltage_below"
            elif (
                end.current_below_a is not None
                and step_t > period_s  # the first sample may still be settling
                and abs(i) <= end.current_below_a
            ):
                reason = "current_below"
            elif end.capacity_ah is not None and self.integ.step.capacity_ah >= end.capacity_ah:
                reason = "capacity"
            elif end.duration_s is not None and step_t >= end.duration_s - 1e-9:
                reason = "duration"
        await ctx.on_step_end(
            {
                "step_number": self.step_number,
                "step_index": index,
                "cycle_index": step.cycle_index,
                "kind": step.kind,
                "start_t_s": t_start,
                "end_t_s": self.integ.last_t_s or t_start,
                "end_reason": reason,
                "capacity_ah": self.integ.step.capacity_ah,
                "energy_wh": self.integ.step.energy_wh,
                "end_voltage_v": v,
            }
        )

    async def _store(
        self,
        t_s: float,
        index: int,
        step: PlanStep,
        v: float,
        i: float,
        temp: float,
        flags: int,
    ) -> None:
        ctx = self.ctx
        row: SampleRow = (
            ctx.run_id,
            self.seq,
            t_s,
            time.time(),
            index,
            step.cycle_index,
            v,
            i,
            None if math.isnan(temp) else temp,
            self.integ.step.capacity_ah,
            self.integ.step.energy_wh,
            flags,
        )
        ctx.progress.elapsed_s = t_s
        ctx.progress.last_seq = self.seq
        await ctx.writer.put([row])
