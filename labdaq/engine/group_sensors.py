"""An instrument group's temperature sensors: wired thermocouples over its readings.

One job of :class:`~labdaq.engine.group.InstrumentGroup` (which inherits it): lay the
wired sensors' last readings (:mod:`.aux_temps`) over the temperatures a cycler reports,
treat a cabinet channel's NaN temperature as a lost sensor, and emit an event when a
run's sensor is lost or reads again. The state it reads (which slot each run's sensor
has, which are lost) is set up by the group as runs join and leave.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from labdaq.engine.aux_temps import FLAG_TEMP_LOST, Overlay, WiredTemperatures
from labdaq.engine.channel import ChannelRun
from labdaq.engine.events import Emit, RunEvent
from labdaq.engine.run_arrays import BoolArray, FloatArray, IntArray, RunArrays


class GroupSensors:
    """Temperature overlay and sensor events (the state is the group's, see group.py)."""

    name: str
    runs: list[ChannelRun]
    state: RunArrays
    emit: Emit
    temperatures: WiredTemperatures | None
    _tc_slot: IntArray  # per run: its sensor's slot, -1 none
    _tc_any: bool
    _sensor_lost: BoolArray  # per run: its sensor is lost
    _own_sensor: bool  # the cycler has a sensor per channel

    def _temperatures(self, sel: slice | IntArray, now_clock: float,
                      temp: FloatArray) -> Overlay | None:
        """The wired sensors' readings for runs ``sel``, and which runs' sensors are lost
        (None: no run has a wired sensor and none is or was lost)."""
        wired = None
        if self._tc_any and self.temperatures is not None:
            wired = self.temperatures.overlay(self._tc_slot[sel], now_clock, temp)
        if not self._own_sensor:
            return wired
        own = np.isnan(temp)
        if wired is not None:
            own &= self._tc_slot[sel] < 0
        if not own.any() and not self._sensor_lost[sel].any():
            return wired
        if wired is None:
            wired = Overlay(temp, temp, np.full(len(temp), np.nan),
                            np.zeros(len(temp), np.int64), np.zeros(len(temp), bool))
        return Overlay(wired.check_c, wired.stored_c, wired.age_s,
                       wired.flags | np.where(own, FLAG_TEMP_LOST, 0), wired.lost | own)

    def _reading_temperatures(self, now_clock: float, temp: FloatArray) -> tuple[
            Overlay | None, FloatArray, FloatArray, IntArray | None, FloatArray | None]:
        """For a reading of every run: (the overlay, the temperatures the limits check,
        those stored, their flags, their age); without wired sensors the cycler's own
        readings are checked and stored, with no flags and no age."""
        wired = self._temperatures(slice(None), now_clock, temp)
        if wired is None:
            return None, temp, temp, None, None
        return wired, wired.check_c, wired.stored_c, wired.flags, wired.age_s

    def _sensor_info(self, k: int) -> dict[str, Any]:
        """Run ``k``'s temperature sensor, for events: ``where`` names it."""
        slot = int(self._tc_slot[k]) if k < len(self._tc_slot) else -1
        if slot >= 0 and self.temperatures is not None:
            info = self.temperatures.describe(slot)
            return {**info, "where": f"{info['logger']} channel {info['channel']}"}
        ch = self.runs[k].channel
        return {"instrument": self.name, "channel": ch, "cause": "open",
                "error": "no reading (open or dropped out)",
                "where": f"{self.name} channel {ch} (the cycler's own sensor)"}

    async def _sensor_changes(self, sel: IntArray, lost: BoolArray) -> None:
        """An event for each run whose wired sensor was lost or came back (``lost`` for
        runs ``sel``, after their rows were stored)."""
        for j, k in enumerate(sel.tolist()):
            if bool(lost[j]) == bool(self._sensor_lost[k]):
                continue
            self._sensor_lost[k] = bool(lost[j])
            r = self.runs[k]
            info = self._sensor_info(k)
            data = {**info, "t_s": float(self.state.t_s[k]), "seq": int(self.state.seq[k])}
            where = info["where"]
            if lost[j]:
                await self.emit(RunEvent(
                    r.run_id, "sensor", "error",
                    f"temperature sensor lost: {where}: {info['error'] or info['cause']}",
                    data))
            else:
                await self.emit(RunEvent(r.run_id, "sensor", "info",
                                         f"temperature sensor reads again: {where}", data))
