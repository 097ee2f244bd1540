"""Multi-channel cycler cabinet emulator (LABDAQ CYC-n, 8-64 channels) over one CellBank.

One job: answer the cabinet's channel-list SCPI dialect (docs/instruments/cabinet.md) —
per-channel source settings addressed as ``(@1:8)`` / ``(@1,3,5)``, hardware protection
trips, and ``MEAS:ALL? (@1:64)`` returning V, I, T, mode and status of every channel in
one line — while advancing all cells lazily in one vectorised ``CellBank.step`` per
simulated interval.

Physics per channel (numpy over all channels at once; positive current = charge):

* CURR function: the set current flows unless the terminal voltage would leave the
  window [VLIM:LOW, VLIM]; then the channel clamps to constant voltage at that limit
  (``bank.current_for_voltage``) and never reverses direction (compliance);
* VOLT function: the current that holds the set voltage, limited to +-ILIM;
* output off: relay open, no current; the voltage sense still reads the cell;
* protection: terminal voltage above VOLT:PROT or |I| above CURR:PROT switches that
  channel off and latches a status bit until ``OUTP:PROT:CLE``; the server watchdog turns
  every output off.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .cabinet_channels import (  # noqa: F401 - re-exported: tests import it from here
    CHANNELS_MAX,
    CHANNELS_MIN,
    parse_channel_list,
)
from .cabinet_format import (
    format_meas_all,
    format_meas_all_real32,
    format_nr1_list,
    format_nr3_list,
)
from .cabinet_log import ReadingLog
from .cabinet_trace import LoggingCommands
from .cell import CellBank, CellSpec
from .clock import Clock, SimClock
from .scpi import (
    ScpiError,
    ScpiParser,
    expect_args,
    format_nr1,
    format_nr3,
    parse_bool,
    parse_choice,
    parse_number,
)

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

DEFAULT_CURRENT_MAX_A = 10.0
VOLTAGE_MAX_V = 5.0
# Protection thresholds may be set a little above the source range so that a limit at
# full scale can still be programmed below the trip point.
PROTECTION_HEADROOM = 1.1

# Mode codes (4th field of MEAS:ALL?).
MODE_OFF = 0
MODE_CC = 1
MODE_CV = 2

# STAT:CHAN? bits (5th field of MEAS:ALL?).
STAT_OUTPUT = 1  # output relay closed
STAT_CC = 2  # regulating current
STAT_CV = 4  # regulating voltage
STAT_COMPLIANCE = 8  # set point not reached: clamped by VLIM / VLIM:LOW / ILIM
STAT_OVP = 16  # over-voltage protection tripped (latched)
STAT_OCP = 32  # over-current protection tripped (latched)
STAT_WATCHDOG = 64  # outputs switched off by the host watchdog (latched)
STAT_TEMP_FAULT = 128  # temperature sensor open / dropped out (T reads 9.91E+37)
_LATCHED = STAT_OVP | STAT_OCP | STAT_WATCHDOG

# Largest simulated step while any current flows (keeps clamping and trips accurate);
# with every output at zero only relaxation and self-discharge happen.
MAX_STEP_ACTIVE_S = 1.0
MAX_STEP_IDLE_S = 30.0
# Relative tolerance deciding "set point reached" for the compliance flag.
_COMPLIANCE_RTOL = 1e-9
_COMPLIANCE_ATOL_A = 1e-12
# Readings kept for tests that compare stored sample times with the simulator's clock.
READINGS_KEPT = 10_000


# ---------------------------------------------------------------------------------------
# Simulator
# ---------------------------------------------------------------------------------------


class CabinetSim(LoggingCommands):
    """Stateful CYC-n cabinet; serve it with :class:`labdaq.sims.server.SimServer`.

    ``cell_spec`` is a shipped spec name, a :class:`CellSpec` or a ready :class:`CellBank`
    with ``n == channels``. ``refresh_s`` (simulated seconds) is the measurement cycle:
    like a real cabinet, readings are refreshed at most this often, so queries arriving
    closer together read the same state (and the same cached reply) instead of stepping
    the bank. Set commands always advance exactly first, so no current/time pairing is
    lost.
    """

    def __init__(
        self,
        channels: int = 64,
        cell_spec: str | CellSpec | CellBank = "nmc811",
        clock: Clock | None = None,
        seed: int | None = None,
        *,
        soc: float = 0.5,
        ambient_c: float = 25.0,
        current_max_a: float = DEFAULT_CURRENT_MAX_A,
        serial: str = "CYC0000001",
        firmware: str = "1.0.0",
        refresh_s: float = 0.01,
    ) -> None:
        if not CHANNELS_MIN <= channels <= CHANNELS_MAX:
            raise ValueError(f"channels must be in 1..{CHANNELS_MAX}, got {channels!r}")
        if current_max_a <= 0:
            raise ValueError(f"current_max_a must be > 0, got {current_max_a!r}")
        self.channels = int(channels)
        self.current_max_a = float(current_max_a)
        self.voltage_max_v = VOLTAGE_MAX_V
        self.model = f"CYC-{self.channels}"
        self.serial = serial
        self.firmware = firmware
        if isinstance(cell_spec, CellBank):
            if cell_spec.n != self.channels:
                raise ValueError(f"cell bank has {cell_spec.n} cells, cabinet has "
                                 f"{self.channels} channels")
            self.bank = cell_spec
        else:
            self.bank = CellBank(cell_spec, n=self.channels, soc=soc, ambient_c=ambient_c,
                                 seed=seed)
        self.clock: Clock = clock if clock is not None else SimClock()
        self.refresh_s = float(refresh_s)
        self._t_last = self.clock.now()
        self._all = np.arange(self.channels, dtype=np.int64)
        self._list_cache: dict[str, IntArray] = {}
        self._snapshot: tuple[FloatArray, FloatArray, FloatArray, IntArray, IntArray] | None
        self._snapshot = None
        self._reply_cache: dict[str, str] = {}
        # FORM:DATA / FORM:BORD (MEAS:ALL? only; other queries always answer in ASCII).
        self.data_format = "ASC"
        self.byte_order = "NORM"
        # (clock time of the reading, voltages) of every distinct reading taken, oldest
        # first: when each reading a client was sent was measured, by this cabinet's clock.
        self.readings: deque[tuple[float, FloatArray]] = deque(maxlen=READINGS_KEPT)
        # The clock times of the readings the hardware timer took into the log (a subset
        # of ``readings``, which also holds the direct MEAS:ALL? ones).
        self.logged_t_s: deque[float] = deque(maxlen=READINGS_KEPT)
        # Fault injection (labdaq.sims.faults): a frozen cabinet keeps answering the last
        # snapshot it measured while the cells move on (a hung measurement loop).
        self.frozen = False
        self._last_snapshot: tuple[FloatArray, FloatArray, FloatArray, IntArray, IntArray] | None
        self._last_snapshot = None
        # Hardware-timed logging (TRIG:TIM, TRAC:POIN, INIT/ABOR, TRAC:DATA?): readings
        # on this cabinet's clock into a bounded ring (cabinet_log.py).
        self.log = ReadingLog(self.channels)
        self.parser = ScpiParser(
            idn=f"LABDAQ,{self.model},{serial},{firmware}", on_reset=self._reset,
        )
        self._reset()
        self._register()

    # -- state ------------------------------------------------------------------------
    def _reset(self) -> None:
        """``*RST``: every output off, CURR function at 0 A, limits at full scale."""
        n = self.channels
        self._flush()
        self.output_on = np.zeros(n, dtype=bool)
        self.volt_function = np.zeros(n, dtype=bool)  # False = CURR, True = VOLT
        self.current_set_a = np.zeros(n)
        self.voltage_limit_v = np.full(n, self.voltage_max_v)
        self.voltage_limit_low_v = np.zeros(n)
        self.voltage_set_v = np.zeros(n)
        self.current_limit_a = np.full(n, 1.0)
        self.ovp_v = np.full(n, self.voltage_max_v * PROTECTION_HEADROOM)
        self.ocp_a = np.full(n, self.current_max_a * PROTECTION_HEADROOM)
        self.latched = np.zeros(n, dtype=np.int64)  # STAT_OVP | STAT_OCP | STAT_WATCHDOG
        self.data_format = "ASC"  # *RST restores ASCII replies, as SCPI requires
        self.byte_order = "NORM"
        if getattr(self, "log", None) is not None:  # *RST stops logging, empties the ring
            self.log = ReadingLog(self.channels)
        self._changed()

    def _changed(self) -> None:
        """Settings or state moved on: cached measurements are stale."""
        self._snapshot = None
        self._reply_cache.clear()

    # -- SCPI wiring -------------------------------------------------------------------
    def _register(self) -> None:
        p = self.parser
        i_max, v_max = self.current_max_a, self.voltage_max_v
        # Hot queries first: the parser tries patterns in registration order.
        p.register(":MEASure:ALL?", on_query=self._q_meas_all)
        p.register(":TRACe:DATA?", on_query=self._q_trace_data)
        p.register(":MEASure:VOLTage[:DC]?", on_query=self._q_meas("v"))
        p.register(":MEASure:CURRent[:DC]?", on_query=self._q_meas("i"))
        p.register(":MEASure:TEMPerature?", on_query=self._q_meas("t"))
        p.register(":STATus:CHANnel[:CONDition]?", on_query=self._q_status)
        p.register(":OUTPut[:STATe]", on_set=self._set_output, on_query=self._q_output)
        p.register(":OUTPut:PROTection:CLEar", on_set=self._set_protection_clear)
        p.register(":OUTPut:PROTection:TRIPped?", on_query=self._q_tripped)
        p.register("[:SOURce]:FUNCtion[:MODE]", on_set=self._set_function,
                   on_query=self._q_function)
        self._register_array("[:SOURce]:CURRent[:LEVel][:IMMediate][:AMPLitude]",
                             "current_set_a", -i_max, i_max)
        self._register_array("[:SOURce]:CURRent:VLIMit[:HIGH]", "voltage_limit_v", 0.0, v_max)
        self._register_array("[:SOURce]:CURRent:VLIMit:LOW", "voltage_limit_low_v", 0.0,
                             v_max)
        self._register_array("[:SOURce]:CURRent:PROTection[:LEVel]", "ocp_a", 0.0,
                             i_max * PROTECTION_HEADROOM)
        self._register_array("[:SOURce]:VOLTage[:LEVel][:IMMediate][:AMPLitude]",
                             "voltage_set_v", 0.0, v_max)
        self._register_array("[:SOURce]:VOLTage:ILIMit[:LEVel]", "current_limit_a", 0.0, i_max)
        self._register_array("[:SOURce]:VOLTage:PROTection[:LEVel]", "ovp_v", 0.0,
                             v_max * PROTECTION_HEADROOM)
        p.register(":FORMat[:DATA]", on_set=self._set_format, on_query=self._q_format)
        p.register(":FORMat:BORDer", on_set=self._set_border, on_query=self._q_border)
        p.register(":TRACe:POINts", on_set=self._set_points, on_query=self._q_points)
        p.register(":TRACe:ACTual?", on_query=self._q_actual)
        p.register(":TRACe:ACTual:STARt?", on_query=self._q_actual_start)
        p.register(":TRACe:ACTual:END?", on_query=self._q_actual_end)
        p.register(":TRACe:CLEar", on_set=self._set_trace_clear)
        p.register(":TRIGger:TIMer", on_set=self._set_timer, on_query=self._q_timer)
        p.register(":INITiate[:IMMediate]", on_set=self._set_init)
        p.register(":ABORt", on_set=self._set_abort)
        p.register(":SYSTem:CHANnel:COUNt?", on_query=self._q_channel_count)
        p.register(":SYSTem:CHANnel:LIMits?", on_query=self._q_limits)

    def _channels_arg(self, text: str) -> IntArray:
        """Channel list text -> indexes, cached: controllers repeat the same lists."""
        idx = self._list_cache.get(text)
        if idx is None:
            idx = parse_channel_list(text, self.channels)
            if len(self._list_cache) < 256:
                self._list_cache[text] = idx
        return idx

    def _query_channels(self, args: list[str]) -> IntArray:
        """Queries take an optional channel list; omitted means every channel."""
        if not args:
            return self._all
        expect_args(args, 1)
        return self._channels_arg(args[0])

    def _set_args(self, args: list[str]) -> tuple[str, IntArray]:
        """Set commands need ``<value>,(@list)``; the list is never optional (safety)."""
        expect_args(args, 2)
        return args[0], self._channels_arg(args[1])

    def _register_array(self, pattern: str, attr: str, minimum: float,
                        maximum: float) -> None:
        def on_set(args: list[str]) -> None:
            text, idx = self._set_args(args)
            value = parse_number(text, minimum=minimum, maximum=maximum)
            self._flush()
            getattr(self, attr)[idx] = value
            self._changed()

        def on_query(args: list[str]) -> str:
            return format_nr3_list(getattr(self, attr)[self._query_channels(args)])

        self.parser.register(pattern, on_set=on_set, on_query=on_query)

    def _set_function(self, args: list[str]) -> None:
        text, idx = self._set_args(args)
        volt = parse_choice(text, ["CURRent", "VOLTage"]) == "VOLT"
        self._flush()
        self.volt_function[idx] = volt
        self._changed()

    def _q_function(self, args: list[str]) -> str:
        names = np.array(["CURR", "VOLT"])
        return ",".join(names[self.volt_function[self._query_channels(args)].astype(int)])

    def _set_output(self, args: list[str]) -> None:
        text, idx = self._set_args(args)
        on = parse_bool(text)
        if on:
            tripped = idx[(self.latched[idx] & (STAT_OVP | STAT_OCP)) != 0]
            if tripped.size:
                # All-or-nothing: a tripped channel must be cleared deliberately first.
                raise ScpiError(-221, "Settings conflict; protection tripped on channel "
                                      f"{int(tripped[0]) + 1}, send OUTP:PROT:CLE")
        self._flush()
        self.output_on[idx] = on
        if on:
            self.latched[idx] &= ~STAT_WATCHDOG
        self._changed()
        if on:
            self._drive()  # a set point beyond protection trips at once, like hardware

    def _q_output(self, args: list[str]) -> str:
        self._drive()
        return format_nr1_list(self.output_on[self._query_channels(args)].astype(np.int64))

    def _set_protection_clear(self, args: list[str]) -> None:
        expect_args(args, 1)
        idx = self._channels_arg(args[0])
        self._flush()
        self.latched[idx] &= ~(STAT_OVP | STAT_OCP)
        self._changed()

    def _q_tripped(self, args: list[str]) -> str:
        idx = self._query_channels(args)
        return format_nr1_list(((self.latched[idx] & (STAT_OVP | STAT_OCP)) != 0)
                               .astype(np.int64))

    def _set_format(self, args: list[str]) -> None:
        """``FORM:DATA ASC`` or ``FORM:DATA REAL[,32]`` (the only length this model has)."""
        if not 1 <= len(args) <= 2:
            raise ScpiError(-109 if not args else -108)
        kind = parse_choice(args[0], ["ASCii", "REAL"])
        if kind == "REAL" and len(args) == 2 and parse_number(args[1]) != 32:
            raise ScpiError(-222, "Data out of range; REAL length must be 32")
        if kind == "ASC" and len(args) == 2:
            raise ScpiError(-108)
        self.data_format = kind
        self._reply_cache.clear()

    def _q_format(self, args: list[str]) -> str:
        expect_args(args, 0)
        return "REAL,32" if self.data_format == "REAL" else "ASC,0"

    def _set_border(self, args: list[str]) -> None:
        expect_args(args, 1)
        self.byte_order = parse_choice(args[0], ["NORMal", "SWAPped"])
        self._reply_cache.clear()

    def _q_border(self, args: list[str]) -> str:
        expect_args(args, 0)
        return self.byte_order

    def _q_channel_count(self, args: list[str]) -> str:
        expect_args(args, 0)
        return format_nr1(self.channels)

    def _q_limits(self, args: list[str]) -> str:
        expect_args(args, 0)
        return f"{format_nr3(self.current_max_a)},{format_nr3(self.voltage_max_v)}"

    # -- physics ---------------------------------------------------------------------
    def _regulate(self) -> tuple[FloatArray, IntArray, NDArray[np.bool_]]:
        """(current that flows, mode code, compliance) per channel for the present state."""
        bank = self.bank
        on = self.output_on
        i_set = self.current_set_a
        # CURR function: the current source leaves its set point only to keep the
        # terminal voltage inside [VLIM:LOW, VLIM], and never reverses direction:
        # charging min(I, max(I_high, 0)), discharging max(I, min(I_low, 0)) — one
        # expression serves both signs.
        i_high = bank.current_for_voltage(self.voltage_limit_v)
        i_low = bank.current_for_voltage(self.voltage_limit_low_v)
        i_cc = np.maximum(np.minimum(i_set, np.maximum(i_high, 0.0)), np.minimum(i_low, 0.0))
        cc_clamped = np.abs(i_cc - i_set) > _COMPLIANCE_ATOL_A + _COMPLIANCE_RTOL * np.abs(i_set)
        volt = self.volt_function
        if volt.any():
            i_raw = bank.current_for_voltage(self.voltage_set_v)
            limit = self.current_limit_a
            i_cv = np.minimum(np.maximum(i_raw, -limit), limit)
            current = np.where(volt, i_cv, i_cc)
            compliance = np.where(volt, np.abs(i_raw) >= limit, cc_clamped)
            # CURR clamped at a voltage limit regulates voltage (CV); VOLT held at ILIM
            # regulates current (CC).
            regulating_v = volt ^ compliance
        else:
            current = i_cc
            compliance = cc_clamped
            regulating_v = compliance
        current = np.minimum(np.maximum(current, -self.current_max_a), self.current_max_a)
        current = np.where(on, current, 0.0)
        mode = (MODE_CC + regulating_v.astype(np.int64)) * on  # MODE_CV == MODE_CC + 1
        return current, mode, compliance & on

    def _drive(self) -> tuple[FloatArray, FloatArray, IntArray, NDArray[np.bool_]]:
        """Regulate, trip the protection where exceeded, and regulate again if it tripped.

        Returns (current_a, voltage_v, mode, compliance) after any trip.
        """
        current, mode, compliance = self._regulate()
        voltage = self.bank.terminal_voltage(current)
        on = self.output_on
        over_v = on & (voltage > self.ovp_v)
        over_i = on & (np.abs(current) > self.ocp_a * (1.0 + _COMPLIANCE_RTOL))
        tripped = over_v | over_i
        if tripped.any():
            self.latched[over_v] |= STAT_OVP
            self.latched[over_i] |= STAT_OCP
            self.output_on = on & ~tripped
            self._changed()
            current, mode, compliance = self._regulate()
            voltage = self.bank.terminal_voltage(current)
        return current, voltage, mode, compliance

    def _drive_reading(self, volt_any: bool | None = None) -> tuple[FloatArray, FloatArray]:
        """(current_a, voltage_v) of a logged reading: :meth:`_drive` without the mode and
        compliance a reading does not keep, the open-circuit sum computed once for the
        clamps and the terminal voltage. The same operations in the same order as
        ``_regulate`` and ``CellBank.current_for_voltage``/``terminal_voltage``, so the
        same numbers (tests/test_cabinet_blocks.py); a shorted bank or a trip takes
        :meth:`_drive` itself. ``volt_any``: whether any channel is in the VOLT function,
        when the caller knows (None: look)."""
        bank = self.bank
        if bank._shorted:
            current, voltage, _, _ = self._drive()
            return current, voltage
        ocv, r0 = bank._eval()[:2]
        e = ocv + bank._v1 + bank._v2
        i_set = self.current_set_a
        i_high = (self.voltage_limit_v - e) / r0
        i_low = (self.voltage_limit_low_v - e) / r0
        current = np.maximum(np.minimum(i_set, np.maximum(i_high, 0.0)), np.minimum(i_low, 0.0))
        volt = self.volt_function
        if volt.any() if volt_any is None else volt_any:
            i_raw = (self.voltage_set_v - e) / r0
            limit = self.current_limit_a
            current = np.where(volt, np.minimum(np.maximum(i_raw, -limit), limit), current)
        current = np.minimum(np.maximum(current, -self.current_max_a), self.current_max_a)
        on = self.output_on
        current = np.where(on, current, 0.0)
        voltage = e + current * r0
        over = (voltage > self.ovp_v) | (np.abs(current) > self.ocp_a * (1.0 + _COMPLIANCE_RTOL))
        if (on & over).any():
            current, voltage, _, _ = self._drive()  # trips, then regulates again
        return current, voltage

    def _step_to(self, now: float) -> None:
        """Every cell to ``now``; while logging, through each reading due by then, taken
        at its own instrument time under the settings in force at that time."""
        log = self.log
        if log.running and log.next_t_s <= now:
            due = int((now - log.next_t_s) / log.period_s) + 1
            if due > log.points:
                # Readings the ring would overwrite before anyone could fetch them: their
                # time passes (the cells move on), their values are never kept.
                skip = due - log.points
                self._step_bank(log.next_t_s + (skip - 1) * log.period_s)
                log.skip(skip)
                due = log.points
            self._step_bank(now, self._take_readings(log.due_times(due + 1, now)))
            return
        self._step_bank(now)

    def _take_readings(self, times_s: list[float]) -> FloatArray | None:
        """Take the readings at ``times_s`` (due, on the timer's grid) and record them into
        the ring as one block; returns the current flowing after the last one (None when
        the caller must regulate again).

        Nothing can change a setting between two readings of one call, so each reading is
        one step of the bank and one regulation (its current drives the next step), with
        no Python per channel; values are kept as references and copied into the ring once.
        """
        current: FloatArray | None = None
        vs: list[FloatArray] = []
        iis: list[FloatArray] = []
        temps: list[FloatArray] = []
        bank = self.bank
        dropout = bank.sensor_dropout
        dropped = bool(dropout.any())  # fault injection changes it only between lines
        volt_any = bool(self.volt_function.any())  # and set commands too
        for t_r in times_s:
            self._step_bank(t_r, current)
            if self.frozen and self._last_snapshot is not None:
                v, i, temp, _, _ = self._last_snapshot  # a hung measurement loop
                current = None
            else:
                # One regulation per reading: its current also drives the next step.
                i, v = self._drive_reading(volt_any)
                temp = np.where(dropout, np.nan, bank._temp_c) if dropped else bank._temp_c
                current = i
            vs.append(v)
            iis.append(i)
            temps.append(temp)
        if times_s:
            self.log.record_block(times_s, vs, iis, temps)
            self.readings.extend(zip(times_s, vs, strict=True))
            self.logged_t_s.extend(times_s)
        return current

    def _step_bank(self, now: float, current: FloatArray | None = None) -> None:
        """Every cell to ``now``; ``current``: what flows from the last update on, when
        the caller has just regulated (else from the snapshot, or regulated here)."""
        remaining = now - self._t_last
        self._t_last = now
        if remaining <= 0.0:
            return
        # A still-valid snapshot already holds the current flowing from the last update.
        if current is None:
            current = (self._snapshot[1] if self._snapshot is not None
                       else self._drive_reading()[0])
        if remaining <= MAX_STEP_ACTIVE_S:  # one step, whatever flows (a logging reading)
            self.bank.step(current, remaining)
            self._changed()
            return
        while True:
            h = min(remaining, MAX_STEP_ACTIVE_S if current.any() else MAX_STEP_IDLE_S)
            self.bank.step(current, h)
            remaining -= h
            if remaining <= 1e-12:
                break
            current = self._drive_reading()[0]
        self._changed()

    def advance(self) -> None:
        """Step every cell up to the clock's now (at most once per ``refresh_s``)."""
        now = self.clock.now()
        if now - self._t_last >= self.refresh_s:
            self._step_to(now)

    def _flush(self) -> None:
        """Advance exactly to now before a setting changes what flows next."""
        if getattr(self, "output_on", None) is not None:  # not during construction
            self._step_to(self.clock.now())

    def snapshot(self) -> tuple[FloatArray, FloatArray, FloatArray, IntArray, IntArray]:
        """(voltage_v, current_a, temperature_c, mode, status) of every channel, cached
        until time advances or a setting changes."""
        if self.frozen and self._last_snapshot is not None:
            return self._last_snapshot  # physics still uses _snapshot / _drive, not this
        if self._snapshot is not None:
            return self._snapshot
        current, voltage, mode, compliance = self._drive()
        temperature = self.bank.temperature_c
        status = (self.latched | self.output_on * STAT_OUTPUT | (mode == MODE_CC) * STAT_CC
                  | (mode == MODE_CV) * STAT_CV | compliance * STAT_COMPLIANCE
                  | np.isnan(temperature) * STAT_TEMP_FAULT)
        self._snapshot = (voltage, current, temperature, mode.astype(np.int64), status)
        self._last_snapshot = self._snapshot
        self.readings.append((self._t_last, voltage))
        return self._snapshot

    # -- queries ----------------------------------------------------------------------
    def _q_meas_all(self, args: list[str]) -> str:
        idx = self._query_channels(args)  # validates before any cached reply is used
        key = args[0] if args else ""
        reply = self._reply_cache.get(key)
        if reply is not None:
            return reply
        v, i, t, mode, status = self.snapshot()
        if self.data_format == "REAL":
            reply = format_meas_all_real32(v[idx], i[idx], t[idx], mode[idx], status[idx],
                                           self.byte_order)
        else:
            reply = format_meas_all(v[idx], i[idx], t[idx], mode[idx], status[idx])
        if len(self._reply_cache) < 64:
            self._reply_cache[key] = reply
        return reply

    def _q_meas(self, what: str) -> Callable[[list[str]], str]:
        column = {"v": 0, "i": 1, "t": 2}[what]

        def on_query(args: list[str]) -> str:
            idx = self._query_channels(args)
            values = np.asarray(self.snapshot()[column], dtype=float)
            return format_nr3_list(values[idx])

        return on_query

    def _q_status(self, args: list[str]) -> str:
        idx = self._query_channels(args)
        return format_nr1_list(self.snapshot()[4][idx])

    # -- simulator protocol ---------------------------------------------------------------
    def handle_line(self, line: str) -> str | None:
        self.advance()  # everything before this line ran with the previous settings
        return self.parser.handle_line(line)

    def on_idle(self) -> None:
        self.advance()  # protection trips happen without a controller asking

    def on_watchdog(self) -> None:
        """The host stopped talking: every output off, latched watchdog flag, and logging
        stopped (nobody fetches it; the ring stays fetchable)."""
        self._flush()
        self.latched[self.output_on] |= STAT_WATCHDOG
        self.output_on[:] = False
        self.log.running = False
        self._changed()

    # -- fault injection ----------------------------------------------------------------
    def inject_error(self, code: int, text: str | None = None) -> None:
        """Put an entry in the error queue as the instrument would."""
        self.parser.push_error(code, text)

    def set_sensor_dropout(self, channel: int, dropped: bool = True) -> None:
        """Open the temperature sensor of ``channel`` (1-based): T reads 9.91E+37."""
        self.bank.sensor_dropout[channel - 1] = dropped
        self._changed()

    def describe(self) -> dict[str, Any]:
        """Model facts for a lab description (what a technician would read off the rack)."""
        return {"model": self.model, "channels": self.channels,
                "current_max_a": self.current_max_a, "voltage_max_v": self.voltage_max_v,
                "cell": self.bank.spec.name}
