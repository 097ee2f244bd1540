"""Hioki BT4560 battery impedance meter driver: EIS sweeps (R + jX per frequency) and DC V.

One job: map the BT4560's command set (CR+LF framing, ``*TRG;*WAI;:FETCh?`` returning
``R,X,V``) onto the ImpedanceAnalyser role, with values validated before anything is sent
and errors read from ``*ESR?`` — the BT4560 has no SCPI error queue, so the base class's
``SYST:ERR?`` check is replaced by an ESR check (CME 32 = command error, EXE 16 =
execution error, QYE 4, DDE 8).

Special replies (see docs/instruments/hioki_bt4560.md): R/X of magnitude >= 1E+8 are the
meter's ±overflow values (impedance above the range's full scale); V > 1E+8 is the
measurement-fault value written when the probes do not touch the cell; V < 0 means the
leads are reversed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .base import (
    Instrument,
    control,
    register_driver,
    strict_discrete_set,
    strict_range,
)
from .errors import GarbledReply, InstrumentError, InstrumentReportedError
from .roles import ImpedanceAnalyser
from .transport import Transport

RANGES_OHM: tuple[float, ...] = (3e-3, 30e-3, 300e-3, 3.0)
# :RANGe arguments written the way Hioki's manual and public sweep scripts write them.
_RANGE_TEXT = {3e-3: "3E-3", 30e-3: "30E-3", 300e-3: "300E-3", 3.0: "3"}
FREQUENCY_MIN_HZ = 0.1
FREQUENCY_MAX_HZ = 1050.0
# Reply values at or beyond these are sentinels, not measurements.
OVERFLOW_THRESHOLD_OHM = 1.0e8
CONTACT_FAULT_THRESHOLD_V = 1.0e8

ESR_QYE = 4
ESR_DDE = 8
ESR_EXE = 16
ESR_CME = 32
_ESR_ERRORS: tuple[tuple[int, str], ...] = (
    (ESR_CME, "command error (CME: unknown command or bad syntax)"),
    (ESR_EXE, "execution error (EXE: parameter out of range or not allowed now)"),
    (ESR_DDE, "device-dependent error (DDE)"),
    (ESR_QYE, "query error (QYE)"),
)

# Waveform periods a measurement takes per speed setting, an envelope for the reply
# timeout only (the meter needs several periods per point: 10 s per period at 0.1 Hz).
_PERIODS_PER_SPEED = {"FAST": 2.0, "MED": 4.0, "SLOW": 8.0}


class LeadContactError(InstrumentError):
    """The meter reported a measurement fault: the probes are not in contact with a cell."""


class ImpedanceOverRange(InstrumentError):
    """|Z| exceeded the selected range's full scale (the meter replied ±1E+09)."""

    def __init__(self, detail: str = "", *, frequency_hz: float = math.nan,
                 range_ohm: float = math.nan, **kwargs: Any) -> None:
        self.frequency_hz = frequency_hz
        self.range_ohm = range_ohm
        super().__init__(detail, **kwargs)


@dataclass(frozen=True)
class ImpedanceReading:
    """One ``R,X,V`` reply, decoded. Overflowed components are NaN with ``overflow`` set."""

    frequency_hz: float
    r_ohm: float
    x_ohm: float
    voltage_v: float
    overflow: bool = False
    contact_fault: bool = False

    @property
    def z_ohm(self) -> complex:
        return complex(self.r_ohm, self.x_ohm)

    @property
    def reversed_polarity(self) -> bool:
        """V < 0: the leads are on the wrong terminals (the reading itself is valid)."""
        return not self.contact_fault and self.voltage_v < 0


def _read_bool(text: str) -> str:
    """The meter answers ON/OFF; accept 1/0 too."""
    t = text.strip().upper()
    return {"1": "ON", "0": "OFF"}.get(t, t)


_RANGE_ARGS: dict[str, Any] = {"validator": strict_discrete_set(RANGES_OHM),
                               "set_process": _RANGE_TEXT.__getitem__}
_SPEED_ARGS: dict[str, Any] = {"values": ["FAST", "MED", "SLOW"], "cast": str}
_DELAY_MODE_ARGS: dict[str, Any] = {"doc": "Delay unit: WAVE (periods) or TIME.",
                                    "values": ["WAVE", "TIME"], "cast": str}
_DELAY_WAVE_ARGS: dict[str, Any] = {"doc": "Settling delay before each point (periods).",
                                    "validator": strict_range(0.0, 10.0)}
_FREQUENCY_RANGE = strict_range(FREQUENCY_MIN_HZ, FREQUENCY_MAX_HZ)
_TRIGGER_ARGS: dict[str, Any] = {"doc": "IMM = free run, EXT = wait for *TRG.",
                                 "values": ["IMM", "EXT"], "cast": str}
_ON_OFF_ARGS: dict[str, Any] = {"doc": "Continuous measurement (needed for *TRG).",
                                "values": {True: "ON", False: "OFF"}, "map_values": True,
                                "cast": _read_bool}


@register_driver("hioki_bt4560")
class HiokiBT4560(Instrument, ImpedanceAnalyser):
    """Hioki BT4560. Call :meth:`configure` once (bus-triggered R-X-V measurement), then
    :meth:`sweep` / :meth:`dc_voltage_v`. Open it through drivers/opener.py, which applies
    the CR+LF framing declared here.
    """

    idn_patterns: ClassVar[list[str]] = [r"^HIOKI,BT4560"]
    read_termination: ClassVar[str] = "\r\n"
    write_termination: ClassVar[str] = "\r\n"
    error_query: ClassVar[str] = "*ESR?"

    # One line per property: (query, set command, doc, validation).
    function = control(":FUNCtion?", ":FUNCtion %s", "R, X and V.", values=["RV"], cast=str)
    impedance_range_ohm = control(":RANGe?", ":RANGe %s", "Range (ohm).", **_RANGE_ARGS)
    speed_z = control(":SAMPle:RATE? Z", ":SAMPle:RATE Z,%s", "Z speed.", **_SPEED_ARGS)
    speed_v = control(":SAMPle:RATE? V", ":SAMPle:RATE V,%s", "V speed.", **_SPEED_ARGS)
    delay_mode = control(":SAMPle:DELay:MODE?", ":SAMPle:DELay:MODE %s", **_DELAY_MODE_ARGS)
    delay_waves = control(":SAMPle:DELay:WAVE?", ":SAMPle:DELay:WAVE %g", **_DELAY_WAVE_ARGS)
    frequency_hz = control(":FREQuency?", ":FREQuency %.10g", "Hz.", validator=_FREQUENCY_RANGE)
    trigger_source = control(":TRIGger:SOURce?", ":TRIGger:SOURce %s", **_TRIGGER_ARGS)
    continuous = control(":INITiate:CONTinuous?", ":INITiate:CONTinuous %s", **_ON_OFF_ARGS)

    def __init__(self, transport: Transport, name: str | None = None, *,
                 idn: str | None = None) -> None:
        super().__init__(transport, name, idn=idn)
        self._bus_trigger_ready = False  # :TRIG:SOUR EXT + :INIT:CONT ON sent by us
        self._frequency_hz: float | None = None  # last frequency we set (None = unknown)
        self._range_ohm: float | None = None
        self._speed_z = "MED"
        self._delay_waves = 0.5
        self.last_sweep: list[ImpedanceReading] = []  # per-point detail of the last sweep

    # -- errors: ESR, not an error queue ---------------------------------------------
    def check_errors(self, command: str = "") -> None:
        """``*ESR?`` (read-and-clear); raise InstrumentReportedError for any error bit."""
        reply = self.query("*ESR?")
        try:
            esr = int(float(reply.strip()))
        except ValueError:
            raise GarbledReply(reply=reply, instrument=self.name, command="*ESR?",
                               expected="an NR1 event status register value") from None
        for bit, text in _ESR_ERRORS:
            if esr & bit:
                others = [(b, t) for b, t in _ESR_ERRORS if esr & b and b != bit]
                raise InstrumentReportedError(
                    f"*ESR? = {esr}: {text}", code=bit, text=text, instrument=self.name,
                    command=command, expected="*ESR? without error bits (CME/EXE/DDE/QYE)",
                    others=others,
                )

    def reset(self) -> None:
        """``*RST`` then ``*CLS``; forgets the trigger setup and frequency we had sent."""
        super().reset()
        self._bus_trigger_ready = False
        self._frequency_hz = None
        self._range_ohm = None

    # -- setup ------------------------------------------------------------------------
    def configure(self, range_ohm: float = 30e-3, speed: str = "MED",
                  delay_waves: float = 0.5) -> None:
        """R-X-V function, range, speed, wave-count delay and bus triggering; one ESR
        check at the end. Everything is validated before the first command is sent."""
        commands = [
            self.command_for("function", "RV"),
            self.command_for("impedance_range_ohm", range_ohm),
            self.command_for("speed_v", speed),
            self.command_for("speed_z", speed),
            self.command_for("delay_mode", "WAVE"),
            self.command_for("delay_waves", delay_waves),
            self.command_for("trigger_source", "EXT"),
            self.command_for("continuous", True),
        ]
        with self._lock:
            for command in commands:
                self.write(command)
            self.check_errors("; ".join(commands))
        self._bus_trigger_ready = True
        self._range_ohm = float(range_ohm)
        self._speed_z = self.validate("speed_z", speed)
        self._delay_waves = float(delay_waves)

    def _ensure_bus_trigger(self) -> None:
        if self._bus_trigger_ready:
            return
        commands = [self.command_for("trigger_source", "EXT"),
                    self.command_for("continuous", True)]
        with self._lock:
            for command in commands:
                self.write(command)
            self.check_errors("; ".join(commands))
        self._bus_trigger_ready = True

    # -- measuring --------------------------------------------------------------------
    def _parse_reading(self, reply: str, command: str, frequency_hz: float) -> ImpedanceReading:
        parts = [p.strip() for p in reply.split(",")]
        try:
            if len(parts) != 3:
                raise ValueError
            r, x, v = (float(p) for p in parts)
        except ValueError:
            raise GarbledReply(reply=reply, instrument=self.name, command=command,
                               expected="R,X,V as three numbers (ohm, ohm, V)") from None
        if v > CONTACT_FAULT_THRESHOLD_V:
            return ImpedanceReading(frequency_hz, math.nan, math.nan, math.nan,
                                    contact_fault=True)
        if abs(r) >= OVERFLOW_THRESHOLD_OHM or abs(x) >= OVERFLOW_THRESHOLD_OHM:
            return ImpedanceReading(frequency_hz, math.nan, math.nan, v, overflow=True)
        return ImpedanceReading(frequency_hz, r, x, v)

    def _reply_timeout_s(self, frequency_hz: float) -> float:
        periods = self._delay_waves + _PERIODS_PER_SPEED.get(self._speed_z, 8.0) + 1.0
        return self.transport.timeout_s + 1.5 * periods / frequency_hz

    def measure_point(self) -> ImpedanceReading:
        """Trigger one measurement at the present frequency and decode ``R,X,V``."""
        self._ensure_bus_trigger()
        command = "*TRG;*WAI;:FETCh?"
        if self._frequency_hz is None:
            # Ask once: the reading must say which frequency it belongs to, and the reply
            # timeout depends on it (10 s per period at 0.1 Hz).
            self._frequency_hz = float(self.frequency_hz)
        frequency = self._frequency_hz
        timeout_s = self._reply_timeout_s(max(frequency, FREQUENCY_MIN_HZ))
        with self._lock, _timeout_at_least(self.transport, timeout_s):
            reply = self.query(command)
        return self._parse_reading(reply, command, frequency)

    def set_frequency(self, frequency_hz: float) -> None:
        """Validate, send and ESR-check ``:FREQuency``."""
        self.set("frequency_hz", frequency_hz)
        self._frequency_hz = float(frequency_hz)

    def sweep(self, freqs_hz: Sequence[float] | np.ndarray, *,
              on_overflow: str = "raise") -> np.ndarray:
        """Complex Z = R + jX (ohm) at each frequency, in the order given.

        All frequencies are validated before anything is sent. Each point: ``:FREQuency``,
        ``*ESR?``, ``*TRG;*WAI;:FETCh?``; one ``*ESR?`` at the end catches trigger errors.
        A lead-contact fault raises LeadContactError; an overflow raises
        ImpedanceOverRange, or gives NaN+NaNj with ``on_overflow="nan"``.
        """
        if on_overflow not in ("raise", "nan"):
            raise ValueError("on_overflow must be 'raise' or 'nan'")
        freqs = [float(f) for f in np.asarray(freqs_hz, dtype=float).reshape(-1)]
        for f in freqs:
            self.validate("frequency_hz", f)
        self.last_sweep = []
        z = np.empty(len(freqs), dtype=np.complex128)
        with self._lock:
            for i, f in enumerate(freqs):
                self.set_frequency(f)
                reading = self.measure_point()
                self.last_sweep.append(reading)
                if reading.contact_fault:
                    raise LeadContactError(
                        f"measurement fault at {f:g} Hz (V reported > 1E+8)",
                        instrument=self.name, command="*TRG;*WAI;:FETCh?",
                        expected="probes in contact with the cell")
                if reading.overflow and on_overflow == "raise":
                    raise ImpedanceOverRange(
                        f"|Z| above the {self._range_text()} range at {f:g} Hz",
                        frequency_hz=f, range_ohm=self._range_ohm or math.nan,
                        instrument=self.name, command="*TRG;*WAI;:FETCh?",
                        expected="|Z| within the range's full scale (choose a larger range)")
                z[i] = reading.z_ohm
            self.check_errors("sweep")
        return z

    def _range_text(self) -> str:
        return f"{self._range_ohm:g} ohm" if self._range_ohm is not None else "selected"

    def dc_voltage_v(self) -> float:
        """DC voltage of the cell (V) from one R-X-V measurement; negative = reversed leads."""
        reading = self.measure_point()
        if reading.contact_fault:
            raise LeadContactError("measurement fault (V reported > 1E+8)",
                                   instrument=self.name, command="*TRG;*WAI;:FETCh?",
                                   expected="probes in contact with the cell")
        return reading.voltage_v


@contextlib.contextmanager
def _timeout_at_least(transport: Transport, timeout_s: float) -> Iterator[None]:
    """Stretch the reply timeout for one slow exchange (a 0.1 Hz point takes > 40 s);
    ``Transport.timeout_s`` applies to the open link at once and is restored after."""
    old_s = transport.timeout_s
    if timeout_s <= old_s:
        yield
        return
    transport.timeout_s = timeout_s
    try:
        yield
    finally:
        transport.timeout_s = old_s
