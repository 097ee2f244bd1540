"""ChannelRun: one run's position in its protocol program and the set points it implies.

The per-sample arithmetic (integration, limits, end conditions) is vectorised across all
channels of an instrument in :mod:`labdaq.engine.group`; this module holds what changes
only at step and phase boundaries, in plain Python. ``(pc, loop counters, phase)`` plus the
accumulators is the run's whole position, which :meth:`position` serialises so a restarted
engine can resume the run where it was.
"""

from __future__ import annotations

import math
from typing import Any

from labdaq.engine.channel_records import CycleTotals, Phase, StepRecord, Transition
from labdaq.protocol import (
    EffectiveLimits,
    ResolvedCC,
    ResolvedCCCV,
    ResolvedCV,
    ResolvedEIS,
    ResolvedLoopEnd,
    ResolvedLoopStart,
    ResolvedProtocol,
    ResolvedPulse,
    ResolvedRest,
    ResolvedSetTemperature,
    ResolvedUntil,
)

__all__ = ["CLAMP_OVERSHOOT_V", "ChannelRun", "CycleTotals", "Phase", "StepRecord", "Transition"]

NAN = math.nan

#: How far past a voltage end condition the instrument's own voltage clamp sits. The
#: engine ends the step at the first tick at or past the end voltage; between ticks the
#: instrument holds the cell there (CV at the clamp) instead of letting it run on into the
#: steep end of the OCV curve and through the safety window. Small against the default
#: 0.1 V safety margin, large against reading noise so the end condition always fires.
CLAMP_OVERSHOOT_V = 0.01


class ChannelRun:
    def __init__(
        self,
        run_id: int,
        channel: int,
        resolved: ResolvedProtocol,
        sample_period_s: float,
    ) -> None:
        self.run_id = run_id
        self.channel = channel
        self.resolved = resolved
        self.program = resolved.program
        self.limits: EffectiveLimits = resolved.limits
        self.period_s = sample_period_s
        self.pc = 0
        self.loop_iters: dict[int, int] = {}
        self.loop_dis_ah: dict[int, float] = {}
        self.loop_first_dis_ah: dict[int, float] = {}
        self.cycle = CycleTotals(1, 0.0)
        self.step_number = 0
        # step_t0_s is what the step's duration counts from: shifted by pauses and by
        # the gap of a restart, which do not count. step_started_t_s is when it began.
        self.step_t0_s = 0.0
        self.step_started_t_s = 0.0
        self.phase_t0_s = 0.0
        self.phase_name = ""
        self.pulse_i = 0
        self.pulse_v_before: float | None = None
        self.pulse_i_before: float | None = None
        self.dcir: list[float] = []
        self.seq = 0
        self.t_s = 0.0
        self.step_cap_ah = 0.0
        self.step_en_wh = 0.0
        self.step_dis_ah = 0.0
        # Commands, as the run's instrument group took them from its inbox.
        self.stop_requested = False
        self.safety_stop: str | None = None  # why a safety stop was requested
        self.pause_requested = False
        self.paused = False
        self.outcome: tuple[str, str] | None = None
        # Sample periods missed so far (runs.missed_periods; engine/gaps.py), and, for a
        # run resumed after an outage, the time of its last stored sample before it.
        self.missed_periods = 0
        self.resumed_from_t_s: float | None = None
        self.pause_t_s = 0.0
        # The auxiliary step of the current phase (EIS, chamber) is done, or failed.
        self.aux_done = False
        self.aux_error: str | None = None
        # Transitions of the run's last tick whose records wait for its samples to be
        # committed (the node writes them with its final state).
        self.closing: list[Transition] = []

    # -- program -----------------------------------------------------------------------
    @property
    def step(self) -> Any:
        return self.program[self.pc] if self.pc < len(self.program) else None

    def start(self, t_s: float) -> Transition:
        """Enter the first measuring step."""
        self.cycle = CycleTotals(1, t_s)
        return self._enter(t_s, Transition())

    def _enter(self, t_s: float, tr: Transition) -> Transition:
        """Advance through loop markers to the next measuring step and its first phase."""
        while self.pc < len(self.program):
            st = self.program[self.pc]
            if isinstance(st, ResolvedLoopStart):
                if self.cycle.charge_ah or self.cycle.discharge_ah:
                    # What ran before the loop (a formation charge, a capacity check) is
                    # a cycle of its own, not part of the loop's first iteration.
                    self.cycle.end_t_s = t_s
                    tr.cycles.append(self.cycle.summary())
                    self.cycle = CycleTotals(self.cycle.cycle_index + 1, t_s)
                self.loop_iters[self.pc] = 0
                self.loop_dis_ah[self.pc] = 0.0
                self.loop_first_dis_ah.pop(self.pc, None)
                self.pc += 1
                continue
            if isinstance(st, ResolvedLoopEnd):
                start = st.start_index
                self.loop_iters[start] = self.loop_iters.get(start, 0) + 1
                dis = self.loop_dis_ah.get(start, 0.0)
                first = self.loop_first_dis_ah.setdefault(start, dis)
                # Each completed loop iteration closes a cycle.
                self.cycle.end_t_s = t_s
                tr.cycles.append(self.cycle.summary())
                self.cycle = CycleTotals(self.cycle.cycle_index + 1, t_s)
                if st.repeat(self.loop_iters[start], dis, first):
                    self.loop_dis_ah[start] = 0.0
                    self.pc = start + 1
                else:
                    self.pc += 1
                continue
            self.step_number += 1
            self.step_t0_s = t_s
            self.step_started_t_s = t_s
            self.step_cap_ah = self.step_en_wh = self.step_dis_ah = 0.0
            self.pulse_i = 0
            self.dcir = []
            tr.next_phase = self._first_phase(st, t_s)
            return tr
        # Past the end: close the open cycle if it saw any current; a cycle a final loop
        # end opened but nothing ran in is not a cycle.
        if self.cycle.charge_ah or self.cycle.discharge_ah:
            self.cycle.end_t_s = t_s
            tr.cycles.append(self.cycle.summary())
        elif tr.cycles or self.cycle.cycle_index > 1:
            self.cycle.cycle_index -= 1
        tr.done = True
        return tr

    def _until(self, p: Phase, u: ResolvedUntil, t_s: float) -> Phase:
        p.voltage_above_v = _f(u.voltage_above_v)
        p.voltage_below_v = _f(u.voltage_below_v)
        p.current_below_a = _f(u.current_below_a)
        p.capacity_ah = _f(u.capacity_ah)
        p.dvdt_below_v_per_s = _f(u.dvdt_below_v_per_s)
        p.temperature_above_c = _f(u.temperature_above_c)
        if u.duration_s is not None:
            p.deadline_t_s = self.step_t0_s + u.duration_s
        return p

    def _first_phase(self, st: Any, t_s: float) -> Phase:
        self.phase_t0_s = t_s
        lim = self.limits
        if isinstance(st, ResolvedRest):
            p = self._until(Phase("off", name="rest"), st.until, t_s)
        elif isinstance(st, ResolvedCC):
            p = self._until(
                Phase("cc", current_a=st.current_a, voltage_v=lim.max_voltage_v, name="cc"),
                st.until,
                t_s,
            )
        elif isinstance(st, ResolvedCV):
            p = self._until(
                Phase("cv", current_a=st.current_limit_a, voltage_v=st.voltage_v, name="cv"),
                st.until,
                t_s,
            )
        elif isinstance(st, ResolvedCCCV):
            # CC phase: compliance at the CV voltage (an SMU or cycler then holds it by
            # itself); the phase ends when the voltage reaches it and CV takes over.
            charging = st.current_a > 0
            p = Phase(
                "cc",
                current_a=st.current_a,
                voltage_v=st.voltage_v if charging else lim.max_voltage_v,
                name="cccv.cc",
            )
            if charging:
                p.voltage_above_v = st.voltage_v - 0.002
            else:
                p.voltage_below_v = st.voltage_v
            if st.until.duration_s is not None:
                p.deadline_t_s = self.step_t0_s + st.until.duration_s
            p.capacity_ah = _f(st.until.capacity_ah)
            p.temperature_above_c = _f(st.until.temperature_above_c)
        elif isinstance(st, ResolvedPulse):
            p = self._pulse_phase(st, t_s, on=True)
        elif isinstance(st, ResolvedEIS | ResolvedSetTemperature):
            p = Phase("off", name=st.step, aux=st)
        else:
            raise NotImplementedError(
                f"step {st.index} ({st.step}) needs an instrument this channel does not have"
            )
        self.phase_name = p.name
        return self._clamp(p)

    def _clamp(self, p: Phase) -> Phase:
        """Put the instrument's voltage compliance just past a CC phase's end voltage.

        Layer one of the step's end condition: a charge clamps to CV slightly above its
        end voltage (never above the safety maximum), a discharge slightly below it (never
        below the safety minimum; on instruments with a lower compliance). The step still
        ends in software at the first tick at or past the end voltage.
        """
        if p.mode != "cc":
            return p
        lim = self.limits
        if p.current_a > 0 and not math.isnan(p.voltage_above_v):
            clamp = p.voltage_above_v + CLAMP_OVERSHOOT_V
            gap = lim.max_voltage_v - p.voltage_above_v
            if gap > 0:
                clamp = min(clamp, p.voltage_above_v + gap / 2)
            p.voltage_v = min(p.voltage_v, clamp) if not math.isnan(p.voltage_v) else clamp
        elif p.current_a < 0 and not math.isnan(p.voltage_below_v):
            clamp = p.voltage_below_v - CLAMP_OVERSHOOT_V
            gap = p.voltage_below_v - lim.min_voltage_v
            if gap > 0:
                clamp = max(clamp, p.voltage_below_v - gap / 2)
            p.voltage_low_v = max(clamp, 0.0)
        return p

    def _pulse_phase(self, st: ResolvedPulse, t_s: float, on: bool) -> Phase:
        self.phase_t0_s = t_s
        if on:
            p = Phase(
                "cc", current_a=st.current_a, voltage_v=self.limits.max_voltage_v, name="pulse.on"
            )
            p = self._clamp(self._until(p, st.until, t_s))
            p.deadline_t_s = min(p.deadline_t_s, t_s + st.pulse_duration_s)
        else:
            p = Phase("off", name="pulse.rest")
            p = self._until(p, st.until, t_s)
            p.deadline_t_s = min(p.deadline_t_s, t_s + st.rest_duration_s)
        return p

    def phase_ended(
        self, reason: str, t_end_s: float, v: float, i: float,
        crossing_t_s: float | None = None,
    ) -> Transition:
        """A phase's end condition fired at ``t_end_s`` (crossed at ``crossing_t_s``,
        between the last two readings): next phase, next step, or done."""
        st = self.step
        tr = Transition()
        if (
            isinstance(st, ResolvedCCCV)
            and self.phase_name == "cccv.cc"
            and reason
            in (
                "voltage_above",
                "voltage_below",
            )
        ):
            self.phase_t0_s = t_end_s
            p = Phase("cv", current_a=abs(st.current_a), voltage_v=st.voltage_v, name="cccv.cv")
            p = self._until(p, st.until, t_end_s)
            self.phase_name = p.name
            tr.next_phase = p
            return tr
        if isinstance(st, ResolvedPulse) and reason == "duration":
            step_deadline = (
                self.step_t0_s + st.until.duration_s if st.until.duration_s else math.inf
            )
            if t_end_s < step_deadline - 1e-9:
                if self.phase_name == "pulse.on":
                    tr.next_phase = self._pulse_phase(st, t_end_s, on=False)
                    self.phase_name = "pulse.rest"
                    return tr
                self.pulse_i += 1
                if self.pulse_i < st.count:
                    tr.next_phase = self._pulse_phase(st, t_end_s, on=True)
                    self.phase_name = "pulse.on"
                    return tr
        # The step is over.
        for start in self.loop_dis_ah:
            self.loop_dis_ah[start] += self.step_dis_ah
        tr.step = StepRecord(
            step_number=self.step_number,
            step_index=st.index,
            cycle_index=self.cycle.cycle_index,
            kind=st.step,
            start_t_s=self.step_started_t_s,
            end_t_s=t_end_s,
            end_reason=reason,
            capacity_ah=self.step_cap_ah,
            energy_wh=self.step_en_wh,
            end_voltage_v=v,
            dcir_ohm=sum(self.dcir) / len(self.dcir) if self.dcir else None,
            end_crossing_t_s=crossing_t_s,
        )
        self.pc += 1
        return self._enter(t_end_s, tr)

    def pulse_edge(self, v_before: float, i_before: float, v_after: float, i_after: float) -> None:
        """DC internal resistance from the voltage step at a current step (HPPC style)."""
        di = i_after - i_before
        if abs(di) > 1e-6:
            self.dcir.append(abs((v_after - v_before) / di))

    # -- persistence -------------------------------------------------------------------
    def position(self) -> dict[str, Any]:
        c = self.cycle
        return {
            "pc": self.pc,
            "loop_iters": {str(k): v for k, v in self.loop_iters.items()},
            "loop_dis_ah": {str(k): v for k, v in self.loop_dis_ah.items()},
            "loop_first_dis_ah": {str(k): v for k, v in self.loop_first_dis_ah.items()},
            "cycle": c.__dict__.copy(),
            "step_number": self.step_number,
            "step_t0_s": self.step_t0_s,
            "step_started_t_s": self.step_started_t_s,
            "phase_t0_s": self.phase_t0_s,
            "phase_name": self.phase_name,
            "pulse_i": self.pulse_i,
            "seq": self.seq,
            "t_s": self.t_s,
            "step_cap_ah": self.step_cap_ah,
            "step_en_wh": self.step_en_wh,
            "step_dis_ah": self.step_dis_ah,
        }

    def restore(self, pos: dict[str, Any], shift_s: float) -> Phase:
        """Resume from a stored position; run times after the gap are shifted by shift_s."""
        self.pc = int(pos["pc"])
        self.loop_iters = {int(k): int(v) for k, v in pos["loop_iters"].items()}
        self.loop_dis_ah = {int(k): float(v) for k, v in pos["loop_dis_ah"].items()}
        self.loop_first_dis_ah = {int(k): float(v) for k, v in pos["loop_first_dis_ah"].items()}
        self.cycle = CycleTotals(**pos["cycle"])
        self.step_number = int(pos["step_number"])
        self.step_t0_s = float(pos["step_t0_s"])
        self.step_started_t_s = float(pos.get("step_started_t_s", self.step_t0_s))
        self.seq = int(pos["seq"])
        self.t_s = float(pos["t_s"])
        self.step_cap_ah = float(pos["step_cap_ah"])
        self.step_en_wh = float(pos["step_en_wh"])
        self.step_dis_ah = float(pos["step_dis_ah"])
        self.pulse_i = int(pos.get("pulse_i", 0))
        st = self.step
        # The time the channel was down does not count towards the step's duration, and
        # the open cycle now spans a gap.
        self.step_t0_s += shift_s
        self.cycle.gaps += 1
        phase_name = pos.get("phase_name", "")
        t_now = self.t_s + shift_s
        if isinstance(st, ResolvedCCCV) and phase_name == "cccv.cv":
            p = Phase("cv", current_a=abs(st.current_a), voltage_v=st.voltage_v, name="cccv.cv")
            p = self._until(p, st.until, t_now)
            self.phase_name = p.name
            self.phase_t0_s = t_now
            return p
        if isinstance(st, ResolvedPulse):
            # Restart the interrupted pulse: a half pulse would give a wrong DCIR.
            p = self._pulse_phase(st, t_now, on=True)
            self.phase_name = "pulse.on"
            return p
        return self._first_phase(st, t_now)


def _f(x: float | None) -> float:
    return NAN if x is None else float(x)
