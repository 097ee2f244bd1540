"""A delegated run's records: the instrument's data records turned into labdaq's samples,
steps and cycles, and the safety check on every reading.

One job: the bookkeeping of a run whose cycler runs its own step program
(:mod:`labdaq.engine.delegated`). Each record the cycler kept becomes one sample whose
``seq`` is the record's index (so a harvest repeated after a crash or a lost link writes
nothing twice); its step and cycle come from the instrument's step id (mapped back to the
labdaq program by the translator, ``StepFile.step_map``) and cycle number. Steps and
cycles are summarised as for a direct run (labdaq/engine/channel.py): trapezoids between
consecutive readings (at the new current after a step change: ``_integrate``), each
interval counted for the step and cycle of its end reading and as charge or discharge by
the sign of its mean current; a pulse step's DCIR is the mean of
``|ΔV/ΔI|`` at its current edges. Plain Python: a delegated run sees one record per
sample period, not a tick of many channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from labdaq.engine.channel import CycleTotals, StepRecord
from labdaq.protocol import (
    EffectiveLimits,
    ResolvedLoopStart,
    ResolvedProtocol,
    ResolvedSetTemperature,
)

#: The state of a harvested run that a restart needs, besides the accumulators.
_POSITION_KEYS = ("test_id", "bts_channel", "t_offset_s", "start_wall_s", "step_number",
                  "cur_index", "cur_ncycle", "cur_nstep", "step_started_t_s",
                  "step_cap_ah", "step_en_wh", "dcir", "last", "segment", "test_segment",
                  "seq_base", "cycle_shift", "chamber_done")


def cycle_offset(resolved: ResolvedProtocol) -> dict[int, int]:
    """What to add to the instrument's cycle number, per program index.

    The cycler counts a cycle at each pass of a loop step, from 1. A direct run counts
    what ran before the first loop as a cycle of its own when current flowed in it
    (channel.py ``_enter``): the steps from that loop on are one cycle later then.
    """
    out: dict[int, int] = {}
    offset = 0
    before_loop = True
    for st in resolved.program:
        if isinstance(st, ResolvedLoopStart) and before_loop:
            before_loop = False
            measured = any(
                s.step not in ("rest", "set_temperature", "eis") for s in
                resolved.program[: st.index])
            offset = 1 if measured else 0
        out[st.index] = offset
    return out


@dataclass
class Harvest:
    """What one batch of records gave: sample rows, and the steps and cycles they
    completed (committed with the rows)."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    cycles: list[dict[str, Any]] = field(default_factory=list)


class RecordBook:
    """A delegated run's position in its records and the open step's and cycle's totals."""

    def __init__(self, run_id: int, resolved: ResolvedProtocol, step_map: dict[int, int]
                 ) -> None:
        self.run_id = run_id
        self.resolved = resolved
        self.step_map = step_map
        self.offsets = cycle_offset(resolved)
        self.test_id = 0
        self.bts_channel = ""
        self.t_offset_s = 0.0  # run time at which the cycler's program started
        self.start_wall_s = 0.0  # UTC seconds at the program's test time 0
        self.speed = 1.0
        self.seq = 0
        self.t_s = 0.0
        self.step_number = 0
        self.cur_index: int | None = None
        self.cur_ncycle = 0
        self.cur_nstep = 0
        self.step_started_t_s = 0.0
        self.step_cap_ah = 0.0
        self.step_en_wh = 0.0
        self.dcir: list[float] = []
        self.last: list[float] | None = None  # t_s, voltage_v, current_a of the last record
        self.cycle = CycleTotals(1, 0.0)
        # A protocol cut at its chamber steps runs as several programs (segments,
        # drivers/neware_steps.py), each a test of its own whose records count from 1 and
        # whose cycles count from 1: its samples follow on from the last one's (seq_base)
        # and its cycle numbers are shifted to go on from the open cycle (cycle_shift,
        # set at its first record), as a direct run's do across a chamber step.
        self.segment = 0  # the segment being held or run
        self.test_segment = 0  # the segment whose program test_id is
        self.seq_base = 0
        self.cycle_shift: int | None = 0
        self.chamber_done = 0  # chamber steps of ``segment`` already held

    # -- records ------------------------------------------------------------------------
    def absorb(self, records: list[dict[str, float]]) -> Harvest:
        """The records after ``seq`` as samples, with the steps and cycles they close;
        records at or before ``seq`` (a repeated download) are skipped."""
        out = Harvest()
        for rec in records:
            seq = self.seq_base + int(rec["seq"])
            if seq <= self.seq:
                continue
            t = self.t_offset_s + float(rec["testtime"])
            v, i = float(rec["volt"]), float(rec["curr"])
            temp = float(rec.get("temp", math.nan))
            nstep, ncycle = int(rec["step"]), int(rec["cycle"])
            index = self.step_map.get(nstep, self.cur_index if self.cur_index is not None else 0)
            if self.cycle_shift is None:  # a later segment's first record: go on
                self.cycle_shift = self.cycle.cycle_index - ncycle - self.offsets.get(index, 0)
            cycle_index = ncycle + self.offsets.get(index, 0) + self.cycle_shift
            # The program's first record (seq 1) precedes its first set point.
            switched = self.seq == self.seq_base + 1
            if self.cur_index is None:
                self._open_step(index, ncycle, nstep, t)
                if self.seq == 0:  # the run's first record opens its first cycle
                    self.cycle = CycleTotals(cycle_index, t)
            elif (index, ncycle) != (self.cur_index, self.cur_ncycle):
                assert self.last is not None
                out.steps.append(self._close_step(self.last))
                if cycle_index != self.cycle.cycle_index:
                    if self.cycle.charge_ah or self.cycle.discharge_ah:
                        self.cycle.end_t_s = self.last[0]
                        out.cycles.append({"run_id": self.run_id, **self.cycle.summary()})
                    self.cycle = CycleTotals(cycle_index, self.last[0])
                self._open_step(index, ncycle, nstep, self.last[0])
                self._edge(v, i)
                switched = True
            elif nstep != self.cur_nstep:  # the next Neware step of one labdaq step (pulse)
                self.cur_nstep = nstep
                self._edge(v, i)
                switched = True
            self._integrate(t, v, i, switched)
            ts_utc = self.start_wall_s + float(rec["testtime"]) / self.speed
            # The cycler's own temperature is part of its record: its age is 0.
            have_temp = not math.isnan(temp)
            out.rows.append((self.run_id, seq, t, ts_utc, index, self.cycle.cycle_index, v, i,
                             temp if have_temp else None, self.step_cap_ah,
                             self.step_en_wh, 0, 0.0 if have_temp else None))
            self.seq, self.t_s, self.last = seq, t, [t, v, i]
        return out

    def close(self) -> Harvest:
        """The run is over: its last step and the open cycle."""
        out = self.close_segment()
        if self.cycle.charge_ah or self.cycle.discharge_ah:
            self.cycle.end_t_s = self.t_s
            out.cycles.append({"run_id": self.run_id, **self.cycle.summary()})
            self.cycle = CycleTotals(self.cycle.cycle_index, self.t_s)  # never twice
        return out

    def close_segment(self) -> Harvest:
        """A segment's program is over: its last step (the cycle stays open: a chamber
        step does not end a cycle). The next program's first interval starts afresh —
        no current flowed while the chamber was held."""
        out = Harvest()
        if self.last is not None and self.cur_index is not None:
            out.steps.append(self._close_step(self.last))
        self.cur_index, self.last = None, None
        return out

    def begin_segment(self, segment: int) -> None:
        """Records from here on are the next segment's program's."""
        self.segment, self.chamber_done = segment, 0
        self.seq_base, self.cycle_shift = self.seq, None

    def chamber_step(self, st: ResolvedSetTemperature, start_t_s: float,
                     end_t_s: float) -> dict[str, Any]:
        """The steps row of a chamber step held before the program started."""
        self.step_number += 1
        return {"run_id": self.run_id, **StepRecord(
            self.step_number, st.index, 1, st.step, start_t_s, end_t_s, "aux_done", 0.0,
            0.0, None).__dict__}

    def _open_step(self, index: int, ncycle: int, nstep: int, t_s: float) -> None:
        self.step_number += 1
        self.cur_index, self.cur_ncycle, self.cur_nstep = index, ncycle, nstep
        self.step_started_t_s = t_s
        self.step_cap_ah = self.step_en_wh = 0.0
        self.dcir = []

    def _close_step(self, last: list[float]) -> dict[str, Any]:
        assert self.cur_index is not None
        st = self.resolved.program[self.cur_index]
        t_end, v, i = last
        rec = StepRecord(
            step_number=self.step_number, step_index=self.cur_index,
            cycle_index=self.cycle.cycle_index, kind=st.step,
            start_t_s=self.step_started_t_s, end_t_s=t_end,
            end_reason=end_reason(st, v, i, t_end - self.step_started_t_s, self.step_cap_ah),
            capacity_ah=self.step_cap_ah, energy_wh=self.step_en_wh, end_voltage_v=v,
            dcir_ohm=sum(self.dcir) / len(self.dcir) if self.dcir else None)
        return {"run_id": self.run_id, **rec.__dict__}

    def _edge(self, v: float, i: float) -> None:
        """DCIR at a current step inside a pulse step (as ChannelRun.pulse_edge)."""
        assert self.cur_index is not None and self.last is not None
        if self.resolved.program[self.cur_index].step != "pulse":
            return
        di = i - self.last[2]
        if abs(di) > 1e-6:
            self.dcir.append(abs((v - self.last[1]) / di))

    def _integrate(self, t: float, v: float, i: float, switched: bool) -> None:
        """One interval, counted for the step and cycle of its end reading.

        The cycler switches set points at a step's last record, so an interval that
        starts there (``switched``) ran at the new step's current throughout: it counts at
        the end reading's current and voltage, not the trapezoid (a direct run stores a
        reading right after each set point for the same reason)."""
        if self.last is None:
            return
        t0, v0, i0 = self.last
        dt = t - t0
        if dt <= 0:
            return
        if switched:
            i0, v0 = i, v
        dq = 0.5 * (i + i0) * dt / 3600.0
        de = abs(0.5 * (i * v + i0 * v0) * dt / 3600.0)
        v_dt = 0.5 * (v + v0) * dt
        self.step_cap_ah += abs(dq)
        self.step_en_wh += de
        c = self.cycle
        if dq > 0:
            c.charge_ah += dq
            c.charge_wh += de
            c.charge_v_s += v_dt
            c.charge_s += dt
        elif dq < 0:
            c.discharge_ah -= dq
            c.discharge_wh += de
            c.discharge_v_s += v_dt
            c.discharge_s += dt

    # -- position -----------------------------------------------------------------------
    def position(self) -> dict[str, Any]:
        """The run's position (``runs.position``): ``seq``/``t_s``/``cycle`` as a direct
        run's, and what following its test needs after a restart under ``delegated``."""
        return {"seq": self.seq, "t_s": self.t_s, "cycle": self.cycle.__dict__.copy(),
                "delegated": {k: getattr(self, k) for k in _POSITION_KEYS}}

    def restore(self, pos: dict[str, Any]) -> None:
        self.seq, self.t_s = int(pos["seq"]), float(pos["t_s"])
        self.cycle = CycleTotals(**pos["cycle"])
        for k, v in pos["delegated"].items():
            if k in _POSITION_KEYS:
                setattr(self, k, v)

    def full_position(self) -> dict[str, Any]:
        """A ledger position (labdaq/engine/ledger.py) for the rows up to ``seq``."""
        return {"run_id": self.run_id,
                "step_index": self.cur_index if self.cur_index is not None else 0,
                "step_count": len(self.resolved.program),
                "cycle_index": self.cycle.cycle_index, "position": self.position()}


def end_reason(st: Any, v: float, i: float, duration_s: float, cap_ah: float) -> str:
    """Which of the step's end conditions its last reading shows (the cycler does not
    say): the names a direct run records."""
    u = getattr(st, "until", None)
    if u is not None:
        if u.voltage_above_v is not None and v >= u.voltage_above_v - 1e-4:
            return "voltage_above"
        if u.voltage_below_v is not None and v <= u.voltage_below_v + 1e-4:
            return "voltage_below"
        if u.current_below_a is not None and abs(i) <= u.current_below_a + 1e-6:
            return "current_below"
        if u.capacity_ah is not None and cap_ah >= u.capacity_ah * 0.999:
            return "capacity"
    return "duration"


def breach(lim: EffectiveLimits, v: float, i: float, temp: float
           ) -> tuple[str, float, float] | None:
    """The limit a reading crosses, as ``(limit, value, bound)``, or None."""
    if v > lim.max_voltage_v:
        return "max_voltage_v", v, lim.max_voltage_v
    if v < lim.min_voltage_v:
        return "min_voltage_v", v, lim.min_voltage_v
    # The cycler holds its set point exactly: a hair of tolerance for its float text.
    if i > lim.max_charge_current_a * (1 + 1e-6):
        return "max_charge_current_a", i, lim.max_charge_current_a
    if -i > lim.max_discharge_current_a * (1 + 1e-6):
        return "max_discharge_current_a", -i, lim.max_discharge_current_a
    if not math.isnan(temp):
        if lim.max_temperature_c is not None and temp > lim.max_temperature_c:
            return "max_temperature_c", temp, lim.max_temperature_c
        if lim.min_temperature_c is not None and temp < lim.min_temperature_c:
            return "min_temperature_c", temp, lim.min_temperature_c
    return None
