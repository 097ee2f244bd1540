"""Hioki BT4560 battery impedance meter emulator: R, X and DC V of one simulated cell.

One job: answer the BT4560 command subset labdaq's driver uses, the way the meter does —
CR+LF framing (set by the server), errors reported only through ``*ESR?`` bits (command
error CME 32, execution error EXE 16; there is no SCPI error queue), a bus trigger
(``*TRG``) that measures one point at the set frequency, ``:FETCh?`` / ``:READ?`` replies
``R,X,V`` — with R and X from the cell model's impedance spectrum
(:func:`labdaq.sims.impedance.impedance`) plus seeded measurement noise, and V the cell's
terminal voltage.

Reply conventions (documented in docs/instruments/hioki_bt4560.md):

* numbers are written like the meter's own replies in public logs, six significant digits
  without padding (``0.0065671,0.00282787,7.37814``, ``-7.45E-06``);
* impedance beyond the range's full scale: R and X are both reported as the Hioki overflow
  value ``±1E+09`` (sign of the true component; the BT356x manual's ±overflow convention),
  V stays valid;
* no contact with the cell (leads open, or no cell wired): all three fields are the
  measurement-fault value ``1E+10`` — client code treats V > 1E+8 as a lead-contact error.

The emulator never steps the cell model: an impedance meter's milliamp AC signal moves no
charge, and the bank may be shared with a cycler simulator that owns its time stepping.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .clock import Clock, SimClock
from .impedance import impedance
from .noise import KeyedNoise
from .scpi import (
    ScpiError,
    ScpiParser,
    esr_bit_for,
    expect_args,
    parse_bool,
    parse_choice,
    parse_number,
)
from .server import PtySimServer, SimServer, TcpSimServer

# Impedance ranges (ohm) the meter offers; a :RANGe value picks the smallest that holds it.
RANGES_OHM: tuple[float, ...] = (3e-3, 30e-3, 300e-3, 3.0)
# Displayed full scale is 3.1000 on each range (as on the BT356x family): beyond it, overflow.
FULL_SCALE_FACTOR = 3.1 / 3.0
FREQUENCY_MIN_HZ = 0.1
FREQUENCY_MAX_HZ = 1050.0
OVERFLOW_OHM = 1.0e9
CONTACT_FAULT = 1.0e10
SPEEDS = ("FAST", "MEDium", "SLOW")
# The meter frames commands and replies with CR+LF (RS-232C and USB virtual COM alike).
TERMINATION = "\r\n"
DELAY_WAVES_MAX = 10.0


class _EsrOnlyParser(ScpiParser):
    """The BT4560 has no SCPI error queue: errors only set ESR bits, SYST:ERR? is unknown."""

    last_error: tuple[int, str | None] | None = None  # for tests; the meter cannot report it

    def __post_init__(self) -> None:
        # Deliberately skip ScpiParser's :SYSTem:ERRor registration (see class docstring).
        pass

    def push_error(self, code: int, text: str | None = None) -> None:
        self.esr |= esr_bit_for(code)
        self.last_error = (code, text)


def _fmt(value: float) -> str:
    """Six significant digits, no padding, upper-case exponent: the meter's reply style."""
    return f"{value:.6G}"


class HiokiBT4560Sim:
    """Stateful BT4560 emulator for cell ``index`` of ``cell_bank``; serve it with
    :class:`labdaq.sims.server.SimServer` using ``read_termination=write_termination="\\r\\n"``.

    ``noise_rel`` is the 1-sigma measurement noise as a fraction of |Z|, ``noise_v`` the
    voltage noise (V); ``lead_inductance_h`` adds the fixture's series inductance
    (``+j*2*pi*f*L``) that makes X positive near 1 kHz on real modules (0 = ideal leads).
    """

    def __init__(
        self,
        cell_bank: Any | None = None,
        index: int = 0,
        clock: Clock | None = None,
        seed: int | None = None,
        *,
        serial: str = "230912345",
        firmware: str = "V1.05",
        noise_rel: float = 2e-4,
        noise_v: float = 5e-6,
        lead_inductance_h: float = 0.0,
    ) -> None:
        self.cell = cell_bank
        self.index = int(index)
        self.clock: Clock = clock if clock is not None else SimClock()
        self.noise = KeyedNoise(seed)
        self.serial = serial
        self.firmware = firmware
        self.noise_rel = float(noise_rel)
        self.noise_v = float(noise_v)
        self.lead_inductance_h = float(lead_inductance_h)
        self.contact = cell_bank is not None
        self.reversed_leads = False
        self.parser = _EsrOnlyParser(
            idn=f"HIOKI,BT4560,{serial},{firmware}",
            on_reset=self._reset,
            on_trigger=self._on_trigger,
        )
        self.measurements = 0
        self._reset()
        self._register()

    # -- state ------------------------------------------------------------------------
    def _reset(self) -> None:
        """``*RST`` defaults (relevant subset)."""
        self.function = "RV"
        self.range_ohm = 3.0
        self.speed = {"V": "MED", "Z": "MED"}
        self.delay_mode = "WAVE"
        self.delay_waves = 0.5
        self.frequency_hz = 1000.0
        self.trigger_source = "IMM"
        self.continuous = True
        self.armed = False
        self.beeper = True
        self.last_reading: tuple[float, float, float] | None = None

    # -- SCPI wiring -------------------------------------------------------------------
    def _register(self) -> None:
        p = self.parser
        p.register(":FUNCtion", on_set=self._set_function, on_query=lambda a: self.function)
        p.register(":RANGe", on_set=self._set_range,
                   on_query=lambda a: f"{self.range_ohm:.4E}")
        p.register(":SAMPle:RATE", on_set=self._set_rate, on_query=self._q_rate)
        p.register(":SAMPle:DELay:MODE", on_set=self._set_delay_mode,
                   on_query=lambda a: self.delay_mode)
        p.register_value(":SAMPle:DELay:WAVE", lambda: self.delay_waves,
                         self._put("delay_waves"), minimum=0.0, maximum=DELAY_WAVES_MAX,
                         default=0.5)
        p.register_value(":FREQuency", lambda: self.frequency_hz, self._put("frequency_hz"),
                         minimum=FREQUENCY_MIN_HZ, maximum=FREQUENCY_MAX_HZ, default=1000.0)
        p.register(":TRIGger:SOURce", on_set=self._set_trigger_source,
                   on_query=lambda a: self.trigger_source)
        p.register(":INITiate:CONTinuous", on_set=self._set_continuous,
                   on_query=lambda a: "ON" if self.continuous else "OFF")
        p.register(":INITiate[:IMMediate]", on_set=self._initiate)
        p.register(":FETCh?", on_query=self._fetch)
        p.register(":READ?", on_query=self._read)
        p.register(":SYSTem:BEEPer", on_set=self._set_beeper,
                   on_query=lambda a: "ON" if self.beeper else "OFF")

    def _put(self, attr: str) -> Any:
        def put(value: float) -> None:
            setattr(self, attr, value)

        return put

    def _set_function(self, args: list[str]) -> None:
        expect_args(args, 1)
        # Only the R-X-V function is modelled; others are an execution error, not silence.
        if args[0].strip().upper() != "RV":
            raise ScpiError(-224)
        self.function = "RV"

    def _set_range(self, args: list[str]) -> None:
        expect_args(args, 1)
        value = parse_number(args[0], minimum=0.0, maximum=RANGES_OHM[-1] * FULL_SCALE_FACTOR)
        self.range_ohm = next(r for r in RANGES_OHM if value <= r * FULL_SCALE_FACTOR)

    def _set_rate(self, args: list[str]) -> None:
        expect_args(args, 2)
        which = parse_choice(args[0], ["V", "Z"])
        self.speed[which] = parse_choice(args[1], SPEEDS)

    def _q_rate(self, args: list[str]) -> str:
        expect_args(args, 1)
        return self.speed[parse_choice(args[0], ["V", "Z"])]

    def _set_delay_mode(self, args: list[str]) -> None:
        expect_args(args, 1)
        self.delay_mode = parse_choice(args[0], ["WAVE", "TIME"])

    def _set_trigger_source(self, args: list[str]) -> None:
        expect_args(args, 1)
        self.trigger_source = parse_choice(args[0], ["IMMediate", "EXTernal"])

    def _set_continuous(self, args: list[str]) -> None:
        expect_args(args, 1)
        self.continuous = parse_bool(args[0])
        self.armed = False

    def _set_beeper(self, args: list[str]) -> None:
        expect_args(args, 1)
        self.beeper = parse_bool(args[0])

    # -- triggering ----------------------------------------------------------------------
    def _on_trigger(self) -> None:
        """``*TRG``: one measurement when waiting for a bus trigger, else execution error."""
        if self.trigger_source != "EXT" or not (self.continuous or self.armed):
            raise ScpiError(-200, "Execution error (no bus trigger expected)")
        self.armed = False
        self._measure()

    def _initiate(self, args: list[str]) -> None:
        expect_args(args, 0)
        if self.continuous:
            raise ScpiError(-200, "Execution error (continuous measurement is on)")
        if self.trigger_source == "IMM":
            self._measure()
        else:
            self.armed = True

    def _fetch(self, args: list[str]) -> str:
        expect_args(args, 0)
        if self.continuous and self.trigger_source == "IMM":
            self._measure()  # free-running: the latest reading is always fresh
        if self.last_reading is None:
            raise ScpiError(-200, "Execution error (no measurement yet)")
        return ",".join(_fmt(v) for v in self.last_reading)

    def _read(self, args: list[str]) -> str:
        expect_args(args, 0)
        # As on the BT356x: :READ? is a one-shot trigger+fetch, refused while free-running.
        if self.continuous:
            raise ScpiError(-200, "Execution error (:READ? with continuous measurement on)")
        self._measure()
        return ",".join(_fmt(v) for v in self.last_reading or ())

    # -- physics -----------------------------------------------------------------------
    def true_impedance_ohm(self, frequency_hz: float | None = None) -> complex:
        """Noise-free Z of the cell at ``frequency_hz`` (default: the set frequency)."""
        f = self.frequency_hz if frequency_hz is None else float(frequency_hz)
        if self.cell is None:
            return complex(math.nan, math.nan)
        z = complex(impedance(self.cell, [f])[self.index, 0])
        return z + 1j * 2.0 * math.pi * f * self.lead_inductance_h

    def true_voltage_v(self) -> float:
        if self.cell is None:
            return math.nan
        return float(np.asarray(self.cell.voltage_v, dtype=float).reshape(-1)[self.index])

    def _measure(self) -> None:
        self.measurements += 1
        if not self.contact or self.cell is None:
            self.last_reading = (CONTACT_FAULT, CONTACT_FAULT, CONTACT_FAULT)
            return
        z = self.true_impedance_ohm()
        mag = abs(z)
        # Keyed on simulated time and frequency, not drawn in call order: a :FETCh? re-sent
        # after a timeout measures what the first copy did (labdaq.sims.noise).
        n_re, n_im, n_v = self.noise.standard_normal(3, self.clock.now(), self.frequency_hz)
        z += self.noise_rel * mag * complex(n_re, n_im)
        voltage = self.true_voltage_v() + self.noise_v * float(n_v)
        if self.reversed_leads:
            voltage = -voltage
        full_scale = self.range_ohm * FULL_SCALE_FACTOR
        if abs(z) > full_scale:
            r = math.copysign(OVERFLOW_OHM, z.real)
            x = math.copysign(OVERFLOW_OHM, z.imag)
        else:
            r, x = z.real, z.imag
        self.last_reading = (r, x, voltage)

    # -- fault injection ----------------------------------------------------------------
    def disconnect_leads(self) -> None:
        """Lift the probes off the cell: readings become the contact-fault value."""
        self.contact = False

    def connect_leads(self) -> None:
        self.contact = self.cell is not None

    def inject_error(self, esr_bits: int) -> None:
        """Set ESR bits (e.g. 16 = execution error) as if a command had failed."""
        self.parser.esr |= int(esr_bits)

    # -- simulator protocol ------------------------------------------------------------
    def handle_line(self, line: str) -> str | None:
        return self.parser.handle_line(line)


def make_server(sim: HiokiBT4560Sim, kind: str = "tcp",
                **kwargs: Any) -> TcpSimServer | PtySimServer:
    """A TCP or pty server for ``sim`` with the meter's CR+LF framing (not started)."""
    kwargs.setdefault("read_termination", TERMINATION)
    kwargs.setdefault("write_termination", TERMINATION)
    kwargs.setdefault("name", f"bt4560-{sim.serial}")
    if kind == "tcp":
        return SimServer.tcp(sim, **kwargs)
    if kind == "pty":
        return SimServer.pty(sim, **kwargs)
    raise ValueError(f"kind must be 'tcp' or 'pty', got {kind!r}")
