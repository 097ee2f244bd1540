"""Keithley 2450/2460 SourceMeter emulator (native SCPI subset) driving one simulated cell.

One job: answer the 2450 command set the labdaq driver uses, with SMU behaviour that
matters for battery work — current source with voltage compliance (the SMU falls into
constant-voltage when the cell reaches VLIM), voltage source with current limit, the
output-off state (HIMP opens the relay; NORM holds 0 V and drains the cell), range
checks, and an output-off watchdog — by stepping a cell model lazily on simulated time.

Sign convention: positive current flows into the cell (charge).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from .clock import Clock, SimClock
from .scpi import (
    ScpiError,
    ScpiParser,
    expect_args,
    format_bool,
    format_nr3,
    parse_bool,
    parse_choice,
    parse_string,
)

MODEL_LIMITS: dict[str, dict[str, float]] = {
    # max |current| A, max |voltage| V
    "2450": {"i_max": 1.05, "v_max": 210.0},
    "2460": {"i_max": 7.35, "v_max": 105.0},
}

# :SOURce:VOLTage:PROTection levels (overvoltage protection), volts; NONE = no limit.
OVP_LEVELS: dict[str, float] = {
    "PROT2": 2.0, "PROT5": 5.0, "PROT10": 10.0, "PROT20": 20.0, "PROT40": 40.0,
    "PROT60": 60.0, "PROT80": 80.0, "PROT100": 100.0, "PROT120": 120.0, "PROT140": 140.0,
    "PROT160": 160.0, "PROT180": 180.0, "NONE": math.inf,
}

# Largest simulated step while current flows near a limit: keeps compliance clamping
# accurate (the current is recomputed at the start of every step and then held).
MAX_STEP_ACTIVE_S = 1.0
# Upper bound for adaptive steps far from any limit, and with no current flowing (then only
# relaxation and self-discharge happen).
MAX_STEP_ADAPTIVE_S = 30.0
MAX_STEP_IDLE_S = 30.0
# Adaptive stepping targets: use at most this fraction of the voltage margin to compliance,
# or change a clamped current by at most this fraction, per step.
MARGIN_FRACTION = 0.25
CURRENT_FRACTION = 0.01


class CellLike(Protocol):
    """The part of ``labdaq.sims.cell.CellBank`` the SMU needs (one cell, index 0)."""

    def step(self, current_a: Any, dt_s: float) -> Any: ...

    def terminal_voltage(self, current_a: Any) -> Any: ...

    def current_for_voltage(self, voltage_v: Any) -> Any: ...

    @property
    def voltage_v(self) -> Any: ...


def _scalar(value: Any) -> float:
    """Cell banks may answer with length-n arrays; this SMU owns cell 0."""
    return float(np.asarray(value, dtype=float).reshape(-1)[0])


class _IdealCell:
    """Fallback when no cell bank is wired: 3.7 V source, 50 mOhm, 1 Ah, linear OCV."""

    def __init__(self) -> None:
        self.soc = 0.5
        self.capacity_ah = 1.0
        self.r_ohm = 0.05
        self.temperature_c = 25.0

    @property
    def ocv_v(self) -> float:
        return 3.0 + 1.2 * self.soc

    @property
    def voltage_v(self) -> float:
        return self.ocv_v

    def terminal_voltage(self, current_a: float) -> float:
        return self.ocv_v + current_a * self.r_ohm

    def current_for_voltage(self, voltage_v: float) -> float:
        return (voltage_v - self.ocv_v) / self.r_ohm

    def step(self, current_a: float, dt_s: float) -> None:
        self.soc = min(1.0, max(0.0, self.soc + current_a * dt_s / 3600.0 / self.capacity_ah))


class Keithley2450Sim:
    """Stateful 2450/2460 emulator; serve it with :class:`labdaq.sims.server.SimServer`."""

    def __init__(
        self,
        cell_bank: CellLike | None = None,
        clock: Clock | None = None,
        model: str = "2450",
        serial: str = "04412345",
        firmware: str = "1.7.12b",
        *,
        max_step_s: float = MAX_STEP_ACTIVE_S,
        adaptive_steps: bool = True,
    ) -> None:
        if model not in MODEL_LIMITS:
            raise ValueError(f"unknown model {model!r}; expected one of {list(MODEL_LIMITS)}")
        self.model = model
        self.serial = serial
        self.firmware = firmware
        self.limits = MODEL_LIMITS[model]
        self.cell: CellLike = cell_bank if cell_bank is not None else _IdealCell()
        self.clock: Clock = clock if clock is not None else SimClock()
        self._t_last = self.clock.now()
        self.max_step_s = max_step_s
        # Far from compliance, steps up to MAX_STEP_ADAPTIVE_S keep fast clocks affordable
        # (a cell step costs ~0.1 ms; 1-s steps at 3600x would eat a CPU core per SMU).
        self.adaptive_steps = adaptive_steps
        # (regime, current after the step, dI/dt, dV/dt at constant I) of the last step
        self._prev_step: tuple[tuple[Any, ...], float, float, float] | None = None
        self.steps_taken = 0
        self.watchdog_tripped = False
        # Fault injection (labdaq.sims.faults): a frozen SMU keeps answering the last values
        # it measured while the cell moves on (a hung measurement loop). Not reset by *RST.
        self.frozen = False
        self._last_values: dict[str, float] = {}
        self.parser = ScpiParser(
            idn=f"KEITHLEY INSTRUMENTS INC.,MODEL {model},{serial},{firmware}",
            on_reset=self._reset,
        )
        self._reset()
        self._register()

    # -- state ------------------------------------------------------------------------
    def _reset(self) -> None:
        """``*RST`` defaults of a 2450 (relevant subset)."""
        self.source_function = "VOLT"
        self.source_current_a = 0.0
        self.voltage_limit_v = 21.0
        self.source_voltage_v = 0.0
        self.current_limit_a = 105e-6
        self.output_on = False
        self.off_mode = {"CURR": "NORM", "VOLT": "NORM"}
        self.ovp = "NONE"
        self.sense_function = "VOLT"
        self.settings: dict[str, str] = {}  # accept-and-store sense settings
        self.last_reading = math.nan

    # -- SCPI wiring -------------------------------------------------------------------
    def _register(self) -> None:
        p = self.parser
        i_max, v_max = self.limits["i_max"], self.limits["v_max"]
        p.register(":SOURce[1]:FUNCtion[:MODE]", on_set=self._set_func,
                   on_query=lambda a: self.source_function)
        p.register_value(":SOURce[1]:CURRent[:LEVel][:IMMediate][:AMPLitude]",
                         lambda: self.source_current_a, self._setter("source_current_a"),
                         minimum=-i_max, maximum=i_max, default=0.0)
        p.register_value(":SOURce[1]:CURRent:VLIMit[:LEVel]",
                         lambda: self.voltage_limit_v, self._setter("voltage_limit_v"),
                         minimum=0.02, maximum=v_max, default=21.0)
        p.register(":SOURce[1]:CURRent:VLIMit[:LEVel]:TRIPped?",
                   on_query=lambda a: format_bool(self._in_compliance()))
        p.register_value(":SOURce[1]:VOLTage[:LEVel][:IMMediate][:AMPLitude]",
                         lambda: self.source_voltage_v, self._setter("source_voltage_v"),
                         minimum=-v_max, maximum=v_max, default=0.0)
        p.register_value(":SOURce[1]:VOLTage:ILIMit[:LEVel]",
                         lambda: self.current_limit_a, self._setter("current_limit_a"),
                         minimum=1e-9, maximum=i_max, default=105e-6)
        p.register(":SOURce[1]:VOLTage:ILIMit[:LEVel]:TRIPped?",
                   on_query=lambda a: format_bool(self._in_compliance()))
        p.register(":SOURce[1]:VOLTage:PROTection[:LEVel]", on_set=self._set_ovp,
                   on_query=lambda a: self.ovp)
        p.register(":OUTPut[1][:STATe]", on_set=self._set_output,
                   on_query=lambda a: format_bool(self.output_on))
        p.register(":OUTPut[1]:CURRent:SMODe", on_set=self._smod_setter("CURR"),
                   on_query=lambda a: self.off_mode["CURR"])
        p.register(":OUTPut[1]:VOLTage:SMODe", on_set=self._smod_setter("VOLT"),
                   on_query=lambda a: self.off_mode["VOLT"])
        p.register(":OUTPut[1]:INTerlock:TRIPped?", on_query=lambda a: "1")
        p.register(":MEASure[1]:VOLTage[:DC]?", on_query=lambda a: self._measure("VOLT", a))
        p.register(":MEASure[1]:CURRent[:DC]?", on_query=lambda a: self._measure("CURR", a))
        p.register(":MEASure[1]?", on_query=lambda a: self._measure(self.sense_function, a))
        p.register(":READ[1]?", on_query=lambda a: self._measure(self.sense_function, []))
        p.register(":FETCh?", on_query=lambda a: format_nr3(self.last_reading))
        p.register("[:SENSe[1]]:FUNCtion[:ON]", on_set=self._set_sense_func,
                   on_query=lambda a: f'"{self.sense_function}:DC"')
        for pattern in (
            "[:SENSe[1]]:VOLTage[:DC]:RANGe[:UPPer]", "[:SENSe[1]]:CURRent[:DC]:RANGe[:UPPer]",
            "[:SENSe[1]]:VOLTage[:DC]:RANGe:AUTO", "[:SENSe[1]]:CURRent[:DC]:RANGe:AUTO",
            "[:SENSe[1]]:VOLTage[:DC]:NPLCycles", "[:SENSe[1]]:CURRent[:DC]:NPLCycles",
            "[:SENSe[1]]:VOLTage[:DC]:RSENse", "[:SENSe[1]]:CURRent[:DC]:RSENse",
        ):
            self._register_stored(pattern)
        p.register(":SYSTem:LANGuage?", on_query=lambda a: "SCPI")
        p.register("*LANG?", on_query=lambda a: "SCPI")

    def _register_stored(self, pattern: str) -> None:
        def on_set(args: list[str], key: str = pattern) -> None:
            expect_args(args, 1)
            self.settings[key] = args[0].upper()

        def on_query(args: list[str], key: str = pattern) -> str:
            return self.settings.get(key, "0")

        self.parser.register(pattern, on_set=on_set, on_query=on_query)

    def _setter(self, attr: str) -> Any:
        def put(value: float) -> None:
            setattr(self, attr, value)

        return put

    def _smod_setter(self, func: str) -> Any:
        def on_set(args: list[str]) -> None:
            expect_args(args, 1)
            self.off_mode[func] = parse_choice(args[0], ["HIMPedance", "NORMal", "ZERO",
                                                         "GUARd"])

        return on_set

    def _set_func(self, args: list[str]) -> None:
        expect_args(args, 1)
        self.source_function = parse_choice(args[0], ["CURRent", "VOLTage"])

    def _set_sense_func(self, args: list[str]) -> None:
        expect_args(args, 1)
        self.sense_function = parse_choice(parse_string(args[0]).split(":")[0],
                                           ["CURRent", "VOLTage"])

    def _set_ovp(self, args: list[str]) -> None:
        expect_args(args, 1)
        level = args[0].strip().upper()
        if level not in OVP_LEVELS:
            raise ScpiError(-224)
        if OVP_LEVELS[level] > self.limits["v_max"] and level != "NONE":
            raise ScpiError(-222)
        self.ovp = level

    def _set_output(self, args: list[str]) -> None:
        expect_args(args, 1)
        self.output_on = parse_bool(args[0])
        if self.output_on:
            self.watchdog_tripped = False

    # -- physics ---------------------------------------------------------------------
    def _compliance_voltage(self) -> float:
        return min(self.voltage_limit_v, OVP_LEVELS[self.ovp])

    def actual_current(self) -> float:
        """Current the SMU drives into the cell right now, after every limit."""
        cell = self.cell
        if not self.output_on:
            if self.off_mode[self.source_function] == "HIMP":
                return 0.0
            # NORM/ZERO off state: relay closed, 0 V source, limited to 10 % of range.
            i = _scalar(cell.current_for_voltage(0.0))
            return max(i, -0.1 * self.limits["i_max"])
        if self.source_function == "CURR":
            i = self.source_current_a
            if i > 0:
                v_lim = self._compliance_voltage()
                if _scalar(cell.terminal_voltage(i)) > v_lim:
                    i = min(i, max(0.0, _scalar(cell.current_for_voltage(v_lim))))
            elif i < 0 and _scalar(cell.terminal_voltage(i)) < 0.0:
                i = max(i, min(0.0, _scalar(cell.current_for_voltage(0.0))))
            return i
        v_set = min(self.source_voltage_v, OVP_LEVELS[self.ovp])
        i = _scalar(cell.current_for_voltage(v_set))
        return max(-self.current_limit_a, min(self.current_limit_a, i))

    def _in_compliance(self) -> bool:
        self.advance()
        if not self.output_on:
            return False
        i = self.actual_current()
        if self.source_function == "CURR":
            return not math.isclose(i, self.source_current_a, rel_tol=1e-9, abs_tol=1e-12)
        return math.isclose(abs(i), self.current_limit_a, rel_tol=1e-9)

    def _regime(self) -> tuple[Any, ...]:
        """Everything that decides the current; rates are only comparable within one."""
        return (self.output_on, self.source_function, self.source_current_a,
                self.voltage_limit_v, self.source_voltage_v, self.current_limit_a,
                self.off_mode[self.source_function], self.ovp)

    def _step_size(self, i: float, v: float) -> float:
        """Largest safe step for current ``i`` at terminal voltage ``v`` (>= max_step_s)."""
        if i == 0.0:
            return MAX_STEP_IDLE_S
        if not self.adaptive_steps:
            return self.max_step_s
        prev = self._prev_step
        if prev is None or prev[0] != self._regime():
            return self.max_step_s
        _, _, di_dt, dv_dt = prev
        clamped = self.source_function == "VOLT" or not math.isclose(
            i, self.source_current_a, rel_tol=1e-9, abs_tol=1e-12)
        if clamped:
            # Current follows the cell (CV or compliance): bound its change per step. Entering
            # the clamp shows up as a large dI/dt and so as a short step.
            rate = abs(di_dt)
            h = CURRENT_FRACTION * abs(i) / rate if rate > 0 else MAX_STEP_ADAPTIVE_S
        else:
            # Constant current: bound the share of the margin to compliance used per step.
            margin = (self._compliance_voltage() - v) if i > 0 else v
            rate = abs(dv_dt)
            h = MARGIN_FRACTION * margin / rate if rate > 0 else MAX_STEP_ADAPTIVE_S
        return min(MAX_STEP_ADAPTIVE_S, max(self.max_step_s, h))

    def advance(self) -> None:
        """Step the cell up to the clock's now with the current that was flowing."""
        now = self.clock.now()
        remaining = now - self._t_last
        self._t_last = now
        while remaining > 1e-9:
            i = self.actual_current()
            adaptive = self.adaptive_steps and i != 0.0
            v_before = _scalar(self.cell.terminal_voltage(i)) if adaptive else 0.0
            h = min(remaining, self._step_size(i, v_before))
            self.cell.step(i, h)
            self.steps_taken += 1
            remaining -= h
            if adaptive and h >= 1e-3:
                # Rates for the next step size; tiny steps between two close commands
                # would make them noisy, so those are skipped.
                v_after = _scalar(self.cell.terminal_voltage(i))
                i_next = self.actual_current()
                self._prev_step = (self._regime(), i_next, (i_next - i) / h,
                                   (v_after - v_before) / h)

    def terminal_voltage(self) -> float:
        return _scalar(self.cell.terminal_voltage(self.actual_current()))

    def _measure(self, what: str, args: list[str]) -> str:
        if args:
            raise ScpiError(-108)
        self.advance()
        # Real 2450: with the output off in HIMP the relay is open; the model still reports
        # the cell voltage so a controller can read OCV before switching on.
        value = self.terminal_voltage() if what == "VOLT" else self.actual_current()
        if self.frozen and what in self._last_values:
            value = self._last_values[what]
        self._last_values[what] = value
        self.last_reading = value
        return format_nr3(value)

    # -- simulator protocol ---------------------------------------------------------------
    def handle_line(self, line: str) -> str | None:
        self.advance()  # everything before this command ran with the previous settings
        return self.parser.handle_line(line)

    def on_idle(self) -> None:
        self.advance()

    def on_watchdog(self) -> None:
        self.advance()
        self.output_on = False
        self.watchdog_tripped = True

    def inject_error(self, code: int, text: str | None = None) -> None:
        """Fault injection: put an entry in the error queue as the instrument would."""
        self.parser.push_error(code, text)
