"""Auxiliary steps: protocol steps another instrument carries out while the cycler's output
is off — an EIS sweep on the impedance meter wired to the channel, a chamber set point.

A group that enters such a phase emits ``AuxRequested``; the node starts the step here as
a task of its own, and the step's end reaches the group through its inbox
(``Command.AUX_DONE``, or ``AUX_FAILED`` with the reason, which fails the run). A chamber
that misses its set point within the step's ``timeout_s`` pauses the run instead (state
paused, a ``chamber`` event saying why): the group's resume applies the phase again, which
starts the step afresh — set point and a new wait — and a stop ends the run.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from labdaq.engine.channel import ChannelRun, Phase
from labdaq.engine.clock import EngineClock
from labdaq.engine.events import Command, RunEvent
from labdaq.engine.group import InstrumentGroup
from labdaq.engine.instruments import OpenInstrument
from labdaq.engine.recorder import RunRecorder
from labdaq.storage import models as m

log = logging.getLogger(__name__)


class AuxSteps:
    def __init__(self, instruments: dict[int, OpenInstrument], recorder: RunRecorder,
                 clock: EngineClock) -> None:
        self.instruments = instruments
        self.recorder = recorder
        self.clock = clock
        self.tasks: dict[int, asyncio.Task[None]] = {}
        # Which instruments are wired to each active run's channel: the run's snapshot
        # (runs.wiring, see wiring_of), not the channel's wiring now.
        self.wiring: dict[int, dict[str, Any]] = {}

    def wire(self, run: m.Run) -> None:
        """Run ``run`` (starting or resuming) measures with its wiring snapshot."""
        self.wiring[run.id] = wiring_of(run)

    def start(self, cr: ChannelRun, phase: Phase, group: InstrumentGroup) -> None:
        self.cancel(cr.run_id)
        self.tasks[cr.run_id] = asyncio.create_task(
            self._run(cr, phase, group), name=f"aux-{cr.run_id}")

    def cancel(self, run_id: int) -> None:
        task = self.tasks.pop(run_id, None)
        if task is not None:
            task.cancel()

    def cancel_all(self) -> None:
        for run_id in list(self.tasks):
            self.cancel(run_id)

    def _instrument(self, run_id: int, role: str) -> OpenInstrument:
        name = (self.wiring.get(run_id) or {}).get(role)
        if isinstance(name, list):
            name = name[0]
        for inst in self.instruments.values():
            if inst.name == name:
                return inst
        raise LookupError(f"no {role} instrument is wired to this run's channel")

    async def _run(self, cr: ChannelRun, phase: Phase, group: InstrumentGroup) -> None:
        st = phase.aux
        try:
            if st.step == "eis":
                await self._eis(cr, st)
            elif st.step == "set_temperature":
                missed = await self.set_temperature(cr.run_id, st)
                if missed is not None:
                    await self._pause(cr, group, missed)
                    return  # no AUX_DONE: the step starts again when the run is resumed
            group.command(cr.run_id, Command.AUX_DONE)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the run fails with the reason, not the node
            log.exception("run %s: %s step failed", cr.run_id, st.step)
            group.command(cr.run_id, Command.AUX_FAILED,
                          f"{st.step} step {st.index} failed: {type(exc).__name__}: {exc}")

    async def _eis(self, cr: ChannelRun, st: Any) -> None:
        inst = self._instrument(cr.run_id, "impedance")
        decades = abs(np.log10(st.stop_frequency_hz / st.start_frequency_hz))
        n = max(2, int(round(decades * st.points_per_decade)) + 1)
        freqs = np.geomspace(st.start_frequency_hz, st.stop_frequency_hz, n)
        z = await inst.worker.call(inst.driver.sweep, freqs)
        v_dc = await inst.worker.call(inst.driver.dc_voltage_v)
        z = np.asarray(z, complex)
        self.recorder.row(
            "eis spectrum",
            m.EisSpectrum,
            run_id=cr.run_id,
            step_index=st.index,
            cycle_index=cr.cycle.cycle_index,
            t_s=cr.t_s,
            instrument=inst.name,
            dc_voltage_v=float(v_dc),
            frequency_hz=[float(f) for f in freqs],
            z_real_ohm=[float(x) for x in z.real],
            z_imag_ohm=[float(x) for x in z.imag],
        )

    async def set_temperature(self, run_id: int, st: Any) -> RunEvent | None:
        """Set the chamber and wait until it holds the set point; None once it does, or the
        event that pauses the run if it does not within ``timeout_s``. (Also the chamber
        steps a delegated run holds before its program starts: engine/delegated.py.)"""
        inst = self._instrument(run_id, "chamber")
        await inst.worker.call(inst.driver.set_point_c, st.temperature_c)
        t_start = self.clock.now()
        stable_since: float | None = None
        while True:
            actual = float(await inst.worker.call(inst.driver.actual_c))
            now = self.clock.now()
            if abs(actual - st.temperature_c) <= st.tolerance_c:
                stable_since = now if stable_since is None else stable_since
                if now - stable_since >= st.stable_for_s:
                    return None
            else:
                stable_since = None
            if now - t_start > st.timeout_s:
                return RunEvent(
                    run_id, "chamber", "warning",
                    f"run paused: chamber {inst.name} at {actual:.2f} °C did not hold "
                    f"{st.temperature_c:.2f} ± {st.tolerance_c} °C for {st.stable_for_s:.0f} s "
                    f"within {st.timeout_s:.0f} s; resume to wait again, or stop the run",
                    {"cause": "set_point_timeout", "chamber": inst.name,
                     "step_index": st.index, "set_point_c": st.temperature_c,
                     "reached_c": actual, "tolerance_c": st.tolerance_c,
                     "stable_for_s": st.stable_for_s, "timeout_s": st.timeout_s,
                     "state": m.RunState.paused.value},
                )
            await self.clock.sleep_until(now + max(1.0, min(30.0, st.stable_for_s / 10)))

    async def _pause(self, cr: ChannelRun, group: InstrumentGroup, why: RunEvent) -> None:
        """Pause the run for a technician: the state and its reason are recorded first (a
        database that cannot take them fails the step, so the run never sits paused
        without a record saying so), then the group turns the output off and pauses."""
        await self.recorder.paused_by_engine(why)
        group.command(cr.run_id, Command.PAUSE)


def wiring_of(run: m.Run) -> dict[str, Any]:
    """The wiring a run measures with: the snapshot of its channel's wiring taken when it
    was created (``runs.wiring``; NULL: the channel had none), which a later change to
    the channel does not touch."""
    return dict(run.wiring or {})
