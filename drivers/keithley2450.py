"""Keithley 2450 / 2460 SourceMeter driver (native SCPI command set) as a one-channel Cycler.

One job: map the SMU's SCPI properties and the Cycler role onto the exact commands a
2450/2460 understands, with model-dependent limits validated before anything is sent.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import numpy as np

from .base import (
    Instrument,
    control,
    measurement,
    register_driver,
    setting,
    strict_discrete_set,
    strict_range,
)
from .errors import GarbledReply, InstrumentError, InstrumentValueError
from .roles import Cycler
from .transport import Transport

# max |current| A, max |voltage| V per model (2460: 7 A DC range with 5 % overrange).
MODEL_LIMITS: dict[str, tuple[float, float]] = {
    "2450": (1.05, 210.0),
    "2460": (7.35, 105.0),
}

# Over-voltage protection levels of :SOUR:VOLT:PROT (volts).
OVP_LEVELS: list[tuple[float, str]] = [
    (2.0, "PROT2"), (5.0, "PROT5"), (10.0, "PROT10"), (20.0, "PROT20"), (40.0, "PROT40"),
    (60.0, "PROT60"), (80.0, "PROT80"), (100.0, "PROT100"), (120.0, "PROT120"),
    (140.0, "PROT140"), (160.0, "PROT160"), (180.0, "PROT180"),
]

log = logging.getLogger(__name__)

OVERRANGE_THRESHOLD = 9.0e37  # 9.9E+37 = over range, 9.91E+37 = NaN on Keithley SMUs


def _nan_if_overrange(value: float) -> float:
    return math.nan if abs(value) >= OVERRANGE_THRESHOLD else value


@register_driver("keithley2450")
class Keithley2450(Instrument, Cycler):
    """Keithley 2450/2460 SMU. Channel 1 only; positive current charges the cell.

    Call ``configure_protection`` at run start: besides over-voltage protection it sets
    the output-off state to HIMP, because the 2450's default (NORM) holds 0 V across the
    terminals with the output off and drains the cell.
    """

    idn_patterns = [r"KEITHLEY INSTRUMENTS.*MODEL 24(50|60)"]
    channels = [1]

    source_function = control(
        ":SOUR:FUNC?", ":SOUR:FUNC %s", "Source function: CURR or VOLT.",
        validator=strict_discrete_set(["CURR", "VOLT"]), cast=str,
    )
    source_current_a = control(
        ":SOUR:CURR?", ":SOUR:CURR %g", "Source current (A), positive = charge.",
        validator=strict_range(-1.05, 1.05),
    )
    voltage_limit_v = control(
        ":SOUR:CURR:VLIM?", ":SOUR:CURR:VLIM %g", "Voltage compliance of the current source.",
        validator=strict_range(0.02, 210.0),
    )
    source_voltage_v = control(
        ":SOUR:VOLT?", ":SOUR:VOLT %g", "Source voltage (V).",
        validator=strict_range(-210.0, 210.0),
    )
    current_limit_a = control(
        ":SOUR:VOLT:ILIM?", ":SOUR:VOLT:ILIM %g", "Current limit of the voltage source (A).",
        validator=strict_range(1e-9, 1.05),
    )
    output_enabled = control(
        ":OUTP?", ":OUTP %d", "Output relay on/off.",
        values={True: 1, False: 0}, map_values=True, cast=int,
    )
    current_off_mode = control(
        ":OUTP:CURR:SMOD?", ":OUTP:CURR:SMOD %s", "Output-off state of the current source.",
        validator=strict_discrete_set(["HIMP", "NORM", "ZERO", "GUAR"]), cast=str,
    )
    voltage_off_mode = control(
        ":OUTP:VOLT:SMOD?", ":OUTP:VOLT:SMOD %s", "Output-off state of the voltage source.",
        validator=strict_discrete_set(["HIMP", "NORM", "ZERO", "GUAR"]), cast=str,
    )
    over_voltage_protection = setting(
        ":SOUR:VOLT:PROT %s", "Over-voltage protection level (PROTn or NONE).",
        validator=strict_discrete_set([name for _, name in OVP_LEVELS] + ["NONE"]),
    )
    voltage_v = measurement(":MEAS:VOLT?", "Measured terminal voltage (V).")
    current_a = measurement(":MEAS:CURR?", "Measured current (A), positive = charge.")
    in_voltage_compliance = measurement(
        ":SOUR:CURR:VLIM:TRIP?", "True while the current source is clamped at VLIM.",
        values={True: 1, False: 0}, map_values=True, cast=int,
    )

    def __init__(self, transport: Transport, name: str | None = None, *,
                 idn: str | None = None, model: str | None = None) -> None:
        super().__init__(transport, name, idn=idn)
        if model is None:
            # The limits depend on the model, so ask the instrument when nobody said
            # (one *IDN? round trip at construction; pass model= or idn= to skip it).
            m = re.search(r"MODEL\s+(24\d\d)", self.idn, re.IGNORECASE)
            model = m.group(1) if m else None
            if model not in MODEL_LIMITS:
                log.warning("%s: unrecognised model in %r; using 2450 limits", self.name,
                            self.idn)
        # An unknown model gets the 2450 limits: they are the stricter ones.
        self.model = model if model in MODEL_LIMITS else "2450"
        i_max, v_max = MODEL_LIMITS[self.model]
        self.set_validator("source_current_a", strict_range(-i_max, i_max))
        self.set_validator("voltage_limit_v", strict_range(0.02, v_max))
        self.set_validator("source_voltage_v", strict_range(-v_max, v_max))
        self.set_validator("current_limit_a", strict_range(1e-9, i_max))
        self.protection: tuple[float, float] | None = None  # (voltage_max_v, current_max_a)

    # -- Cycler ----------------------------------------------------------------------
    def _check_channel(self, channel: int) -> None:
        if channel not in self.channels:
            raise InstrumentValueError(f"channel {channel!r} does not exist",
                                       instrument=self.name, expected="channel 1")

    def _check_protection(self, voltage_v: float, current_a: float, command: str) -> None:
        if self.protection is None:
            return
        v_max, i_max = self.protection
        if abs(current_a) > i_max or voltage_v > v_max:
            raise InstrumentValueError(
                f"{current_a:g} A / {voltage_v:g} V exceeds the run's protection limits; "
                "nothing was sent",
                instrument=self.name, command=command,
                expected=f"|I| <= {i_max:g} A and V <= {v_max:g} V",
            )

    def configure_protection(self, channel: int, voltage_max_v: float,
                             current_max_a: float) -> None:
        self._check_channel(channel)
        i_max, v_max = MODEL_LIMITS[self.model]
        if not 0 < current_max_a <= i_max:
            raise InstrumentValueError(f"current_max_a={current_max_a!r}",
                                       instrument=self.name, expected=f"0 < I <= {i_max:g} A")
        if not 0 < voltage_max_v <= v_max:
            raise InstrumentValueError(f"voltage_max_v={voltage_max_v!r}",
                                       instrument=self.name, expected=f"0 < V <= {v_max:g} V")
        # Levels above the model's own range are refused by it (-222: a 2460 takes no
        # PROT120); when no level within the range covers the limit, the range is the bound.
        level = next((name for limit, name in OVP_LEVELS
                      if voltage_max_v <= limit <= v_max), "NONE")
        commands = [
            self.command_for("current_off_mode", "HIMP"),
            self.command_for("voltage_off_mode", "HIMP"),
            self.command_for("over_voltage_protection", level),
        ]
        with self._lock:
            for command in commands:
                self.write(command)
            self.check_errors("; ".join(commands))
        self.protection = (float(voltage_max_v), float(current_max_a))

    def set_current(self, channel: int, current_a: float, voltage_limit_v: float) -> None:
        self._check_channel(channel)
        # Validate everything before sending anything: a rejected value changes nothing.
        commands = [
            ":SOUR:FUNC CURR",
            self.command_for("voltage_limit_v", voltage_limit_v),
            self.command_for("source_current_a", current_a),
        ]
        self._check_protection(voltage_limit_v, current_a, commands[-1])
        with self._lock:
            for command in commands:
                self.write(command)
            self.check_errors("; ".join(commands))

    def set_voltage(self, channel: int, voltage_v: float, current_limit_a: float) -> None:
        self._check_channel(channel)
        commands = [
            ":SOUR:FUNC VOLT",
            self.command_for("current_limit_a", current_limit_a),
            self.command_for("source_voltage_v", voltage_v),
        ]
        self._check_protection(voltage_v, current_limit_a, commands[-1])
        with self._lock:
            for command in commands:
                self.write(command)
            self.check_errors("; ".join(commands))

    def output(self, channel: int, on: bool) -> None:
        self._check_channel(channel)
        self.output_enabled = bool(on)

    def all_off(self) -> None:
        self.output_enabled = False

    def measure(self, channels: Sequence[int] | None = None) -> np.ndarray:
        for channel in channels if channels is not None else self.channels:
            self._check_channel(channel)
        # One line, one round trip: both queries are answered as "V;I".
        command = ":MEAS:VOLT?;:MEAS:CURR?"
        values = self.query_floats(command)
        if len(values) != 2:
            raise GarbledReply(f"expected 2 values, got {len(values)}", reply=str(values),
                               instrument=self.name, command=command,
                               expected="'<volts>;<amps>'")
        voltage, current = values
        row = [_nan_if_overrange(voltage), _nan_if_overrange(current), math.nan]
        n = 1 if channels is None else len(channels)
        return np.array([row] * n, dtype=float)

    def safe_shutdown(self) -> None:
        """Output off first (fastest way to stop current), then HIMP, then confirm."""
        problems: list[str] = []
        for command in (":OUTP 0", ":OUTP:CURR:SMOD HIMP", ":OUTP:VOLT:SMOD HIMP"):
            try:
                self.write(command)
            except InstrumentError as exc:
                problems.append(f"{command}: {exc}")
        try:
            state = self.query(":OUTP?").strip()
        except InstrumentError as exc:
            raise InstrumentError(
                f"could not confirm output off ({exc}); earlier: {problems}",
                instrument=self.name, command=":OUTP?", expected="0",
            ) from exc
        if state not in ("0", "OFF"):
            raise InstrumentError(f"output still reports {state!r}; earlier: {problems}",
                                  instrument=self.name, command=":OUTP?", expected="0")
