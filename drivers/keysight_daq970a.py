"""Keysight DAQ970A (and 34970A/34972A) driver as a thermocouple TemperatureLogger.

One job: read many thermocouples in one exchange (``MEAS:TEMP? TC,K,(@101:110)``) and
report open thermocouples explicitly. The instrument answers ``+9.9E+37`` for an open
thermocouple; the driver turns that into NaN in the temperature array *and* into a boolean
``open_mask`` in :class:`TemperatureReadout` (``read_with_status``), logs a warning when a
channel opens, and with ``strict=True`` raises :class:`OpenThermocouple` instead — an open
sensor is never silently a number.

Channel numbers are slot*100 + channel (``101`` .. ``340``). The scanner visits channels in
ascending order regardless of the order in the list, so replies are mapped back to the
order the caller asked for.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .base import Instrument, control, measurement, register_driver, strict_discrete_set
from .errors import GarbledReply, InstrumentError, InstrumentValueError
from .roles import TemperatureLogger
from .transport import Transport

log = logging.getLogger(__name__)

# Readings at or above this are the instrument's overload / open-sensor value (+9.9E+37).
OPEN_THRESHOLD = 9.0e37
TC_TYPES = ("B", "E", "J", "K", "N", "R", "S", "T")
# Multiplexer modules -> number of channels usable for thermocouples.
MODULE_CHANNELS = {"DAQM901A": 20, "DAQM902A": 16, "DAQM908A": 40,
                   "34901A": 20, "34902A": 16, "34908A": 40}
MAX_CHANNELS_PER_SLOT = 40
SLOTS = (1, 2, 3)


class OpenThermocouple(InstrumentError):
    """One or more thermocouples read open (``+9.9E+37``); ``channels`` lists them."""

    def __init__(self, detail: str = "", *, channels: Sequence[int] = (), **kwargs: Any) -> None:
        self.channels = tuple(channels)
        super().__init__(detail or f"open thermocouple on channel(s) {list(self.channels)}",
                         **kwargs)


@dataclass(frozen=True)
class TemperatureReadout:
    """Temperatures (°C) in the caller's channel order; ``open_mask`` True where the
    thermocouple is open (its temperature is NaN)."""

    channels: tuple[int, ...]
    temperatures_c: np.ndarray
    open_mask: np.ndarray

    @property
    def open_channels(self) -> tuple[int, ...]:
        return tuple(ch for ch, is_open in zip(self.channels, self.open_mask, strict=True)
                     if is_open)

    @property
    def any_open(self) -> bool:
        return bool(self.open_mask.any())


def _read_bool(text: str) -> str:
    t = text.strip().upper()
    return {"1": "ON", "0": "OFF"}.get(t, t)


_ON_OFF_ARGS: dict[str, Any] = {"doc": "Channel number after each reading (READ?/FETC?).",
                                "values": {True: "ON", False: "OFF"}, "map_values": True,
                                "cast": _read_bool}


def channel_list(channels: Iterable[int]) -> str:
    """``[101, 102, 103, 105]`` -> ``(@101:103,105)`` (ascending, ranges compressed)."""
    ordered = sorted(set(channels))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if j == i else f"{ordered[i]}:{ordered[j]}")
        i = j + 1
    return "(@" + ",".join(parts) + ")"


@register_driver("keysight_daq970a")
class KeysightDAQ970A(Instrument, TemperatureLogger):
    """DAQ970A thermocouple scanner (LF framing; ``SYST:ERR?`` error queue).

    ``channels`` are the channels read when ``read_temperatures_c()`` gets None;
    ``tc_type`` the thermocouple type; ``strict=True`` raises OpenThermocouple instead of
    returning NaN.
    """

    idn_patterns: ClassVar[list[str]] = [r"Keysight Technologies,DAQ97[03]A",
                                         r"(HEWLETT-PACKARD|Agilent Technologies|Keysight "
                                         r"Technologies),3497[02]A"]
    read_termination: ClassVar[str] = "\n"
    write_termination: ClassVar[str] = "\n"

    reading_channel_field = control(":FORM:READ:CHAN?", ":FORM:READ:CHAN %s", **_ON_OFF_ARGS)
    scan_size = measurement(":ROUT:SCAN:SIZE?", "Channels in the scan list.", cast=int)

    def __init__(self, transport: Transport, name: str | None = None, *,
                 idn: str | None = None, channels: Sequence[int] = (101,),
                 tc_type: str = "K", strict: bool = False) -> None:
        super().__init__(transport, name, idn=idn)
        self._channel_limits = {slot: MAX_CHANNELS_PER_SLOT for slot in SLOTS}
        self.tc_type = str(strict_discrete_set(TC_TYPES)(tc_type))
        self.channels = self._check_channels(channels)
        self.strict = strict
        self._open_before: set[int] = set()
        self._scan_channels: tuple[int, ...] | None = None  # set by configure_scan
        self._celsius_channels: set[int] = set()  # UNIT:TEMP C already sent for these
        self._scan_ready = False  # MEAS? redefines the scan list and turns FORM fields off

    # -- channels ---------------------------------------------------------------------
    def _check_channels(self, channels: Iterable[int]) -> list[int]:
        result: list[int] = []
        for ch in channels:
            if isinstance(ch, bool) or not isinstance(ch, int | np.integer):
                raise InstrumentValueError(f"channel {ch!r} is not an integer; nothing sent",
                                           instrument=self.name,
                                           expected="slot*100 + channel, e.g. 101")
            slot, number = divmod(int(ch), 100)
            limit = self._channel_limits.get(slot, 0)
            if not 1 <= number <= limit:
                raise InstrumentValueError(
                    f"channel {ch} does not exist; nothing was sent", instrument=self.name,
                    expected=f"slot*100 + channel with slot in {list(self._slots())} and "
                             f"channel 1..{max(self._channel_limits.values(), default=0)}")
            result.append(int(ch))
        if not result:
            raise InstrumentValueError("no channels given", instrument=self.name,
                                       expected="at least one channel")
        return result

    def _slots(self) -> list[int]:
        return [slot for slot, limit in self._channel_limits.items() if limit > 0]

    def identify_modules(self) -> dict[int, str]:
        """``SYST:CTYP?`` per slot; narrows the valid channels to the installed muxes."""
        modules: dict[int, str] = {}
        for slot in SLOTS:
            reply = self.query(f"SYST:CTYP? {slot}00")
            fields = [f.strip() for f in reply.split(",")]
            model = fields[1] if len(fields) >= 2 and fields[1] not in ("0", "") else ""
            self._channel_limits[slot] = MODULE_CHANNELS.get(model, 0) if model else 0
            if model:
                modules[slot] = model
                if model not in MODULE_CHANNELS:
                    log.warning("%s: slot %d holds %s, not a thermocouple multiplexer",
                                self.name, slot, model)
        return modules

    # -- reading ----------------------------------------------------------------------
    def _decode(self, values: list[float], channels: list[int],
                command: str, reply: str) -> TemperatureReadout:
        """Map ascending-order readings back to ``channels`` order; flag open TCs."""
        scanned = sorted(set(channels))
        if len(values) != len(scanned):
            raise GarbledReply(reply=reply, instrument=self.name, command=command,
                               expected=f"{len(scanned)} readings, one per channel")
        by_channel = dict(zip(scanned, values, strict=True))
        raw = np.array([by_channel[ch] for ch in channels], dtype=float)
        open_mask = np.abs(raw) >= OPEN_THRESHOLD
        temps = np.where(open_mask, np.nan, raw)
        readout = TemperatureReadout(tuple(channels), temps, open_mask)
        self._note_open(readout)
        return readout

    def _note_open(self, readout: TemperatureReadout) -> None:
        now_open = set(readout.open_channels)
        newly = sorted(now_open - self._open_before)
        closed = sorted((self._open_before - now_open) & set(readout.channels))
        if newly:
            log.warning("%s: open thermocouple on channel(s) %s (reading +9.9E+37)",
                        self.name, newly)
        if closed:
            log.info("%s: thermocouple(s) %s read again", self.name, closed)
        self._open_before = (self._open_before - set(readout.channels)) | now_open

    def _ensure_celsius(self, chans: list[int]) -> None:
        """Once per new channel: configure it as a thermocouple and set °C (checked).

        Readings carry no unit, so a channel left in °F by someone at the front panel
        would be misread; MEAS? keeps the unit setting, so doing this once suffices.
        """
        missing = sorted(set(chans) - self._celsius_channels)
        if not missing:
            return
        clist = channel_list(missing)
        commands = [f"CONF:TEMP TC,{self.tc_type},{clist}", f"UNIT:TEMP C,{clist}"]
        with self._lock:
            for command in commands:
                self.write(command)
            self.check_errors("; ".join(commands))
        self._celsius_channels.update(missing)

    def read_with_status(self, channels: Sequence[int] | None = None) -> TemperatureReadout:
        """One ``MEAS:TEMP? TC,<type>,(@list)`` for all channels; NaN + ``open_mask`` for
        open thermocouples (never raises for them, whatever ``strict`` says)."""
        chans = self._check_channels(self.channels if channels is None else channels)
        command = f"MEAS:TEMP? TC,{self.tc_type},{channel_list(chans)}"
        with self._lock:
            self._ensure_celsius(chans)
            self._scan_ready = False
            reply = self.query(command)
        try:
            values = [float(p) for p in reply.split(",")]
        except ValueError:
            raise GarbledReply(reply=reply, instrument=self.name, command=command,
                               expected="comma-separated NR3 temperatures") from None
        return self._decode(values, chans, command, reply)

    def read_temperatures_c(self, channels: Sequence[int] | None = None) -> np.ndarray:
        """Temperatures (°C) in the order asked; NaN for an open thermocouple, or
        OpenThermocouple when the driver is ``strict``."""
        readout = self.read_with_status(channels)
        if self.strict and readout.any_open:
            raise OpenThermocouple(channels=readout.open_channels, instrument=self.name,
                                   command=f"MEAS:TEMP? TC,{self.tc_type},...",
                                   expected="closed thermocouple circuits")
        return readout.temperatures_c

    # -- configured scan with channel-tagged readings ---------------------------------------
    def configure_scan(self, channels: Sequence[int] | None = None) -> None:
        """``CONF:TEMP`` + ``UNIT:TEMP C`` + ``FORM:READ:CHAN ON`` for repeated
        :meth:`read_scan` calls; validated first, one error-queue check at the end."""
        chans = self._check_channels(self.channels if channels is None else channels)
        clist = channel_list(chans)
        commands = [f"CONF:TEMP TC,{self.tc_type},{clist}", f"UNIT:TEMP C,{clist}",
                    self.command_for("reading_channel_field", True)]
        with self._lock:
            for command in commands:
                self.write(command)
            self.check_errors("; ".join(commands))
        self._scan_channels = tuple(chans)
        self._celsius_channels.update(chans)
        self._scan_ready = True

    def reset(self) -> None:
        """``*RST`` then ``*CLS``; the instrument forgets channel setup, so do we."""
        super().reset()
        self._celsius_channels.clear()
        self._scan_channels = None

    def read_scan(self) -> TemperatureReadout:
        """``READ?`` on the configured scan; channel numbers in the reply are checked
        against the scan list, so a reading is never attributed to the wrong sensor.
        Re-sends the scan setup first if a ``MEAS?`` read has replaced it meanwhile."""
        if self._scan_channels is None:
            raise InstrumentError("configure_scan() first", instrument=self.name,
                                  command="READ?", expected="a configured scan")
        chans = list(self._scan_channels)
        command = "READ?"
        with self._lock:
            if not self._scan_ready:
                self.configure_scan(chans)
            reply = self.query(command)
        fields = [f.strip() for f in reply.split(",") if f.strip()]
        expected = sorted(set(chans))
        try:
            if len(fields) != 2 * len(expected):
                raise ValueError
            values = [float(re.sub(r"\s*[CFK]$", "", f)) for f in fields[0::2]]
            tagged = [int(f) for f in fields[1::2]]
        except ValueError:
            raise GarbledReply(reply=reply, instrument=self.name, command=command,
                               expected=f"{len(expected)} pairs of reading,channel") from None
        if tagged != expected:
            raise GarbledReply(f"reply is for channels {tagged}, scan list is {expected}",
                               reply=reply, instrument=self.name, command=command,
                               expected=f"readings for {expected}")
        return self._decode(values, chans, command, reply)


def is_open_reading(value: float) -> bool:
    """True for the instrument's open-thermocouple / overload value (+9.9E+37)."""
    return not math.isnan(value) and abs(value) >= OPEN_THRESHOLD
