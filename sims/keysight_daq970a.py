"""Keysight DAQ970A data-acquisition system emulator, used as a thermocouple scanner.

One job: answer the DAQ970A temperature-scanning command subset labdaq's driver uses —
``MEAS:TEMP?``, ``CONF:TEMP``, ``ROUT:SCAN``, ``INIT``/``FETC?``/``READ?``, ``UNIT:TEMP``,
``FORM:READ:CHAN|UNIT|TIME``, ``SYST:CTYP?``, the SCPI error queue (``+0,"No error"``) —
with readings taken from callables (e.g. a simulated cell's temperature), seeded Gaussian
sensor noise that is a function of the channel and the simulated time of the scan (a
query re-sent at the same simulated time reads the same; labdaq.sims.noise), and
injectable open thermocouples that read ``+9.9E+37`` as the real instrument does.

Channel numbers are slot*100 + channel (``@101``); one 20-channel multiplexer (DAQM901A)
is installed in slot 1 by default. Channels are scanned in ascending order whatever order
the list gives, as on the 34970A/DAQ970A family. A wired source that returns NaN (e.g. a
cell bank's sensor dropout) reads as an open thermocouple.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from .clock import Clock, SimClock
from .noise import KeyedNoise
from .scpi import (
    OVERRANGE,
    ScpiError,
    ScpiParser,
    expect_args,
    format_nr1,
    format_nr3,
    parse_bool,
    parse_choice,
)

# DAQM901A: 20 voltage channels (21/22 are current-only, not usable for thermocouples).
CHANNELS_PER_SLOT = 20
SLOTS = (1, 2, 3)
TC_TYPES = ("B", "E", "J", "K", "N", "R", "S", "T")
OPEN_TC_READING = OVERRANGE  # +9.9E+37


class _KeysightParser(ScpiParser):
    """Keysight writes the error code with a sign: ``+0,"No error"``, ``-113,"..."``."""

    def _q_error_next(self, args: list[str]) -> str:
        expect_args(args, 0)
        code, text = self.pop_error()
        return f'{code:+d},"{text}"'


_RANGE_RE = re.compile(r"^\s*(\d+)\s*(?::\s*(\d+)\s*)?$")


def parse_channel_list(text: str) -> list[int]:
    """``(@101,103:105)`` -> ``[101, 103, 104, 105]`` (order kept; -131/-224 if malformed)."""
    t = text.strip()
    if not (t.startswith("(@") and t.endswith(")")):
        raise ScpiError(-104, "Data type error (expected a channel list like (@101:104))")
    body = t[2:-1].strip()
    if not body:
        return []
    channels: list[int] = []
    for part in body.split(","):
        m = _RANGE_RE.match(part)
        if m is None:
            raise ScpiError(-224, "Illegal parameter value (channel list)")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) else first
        if last < first:
            first, last = last, first
        channels.extend(range(first, last + 1))
    return channels


def format_channel_list(channels: Iterable[int]) -> str:
    return "(@" + ",".join(str(c) for c in channels) + ")"


class DAQ970ASim:
    """Stateful DAQ970A emulator; serve it with :class:`labdaq.sims.server.SimServer`
    (LF framing, the server's default).

    ``sources`` maps channel -> zero-argument callable returning the true temperature in
    degC; channels in ``open_channels`` (or unwired ones) read as open thermocouples.
    ``noise_c`` is the 1-sigma sensor noise; ``modules`` maps slot -> module model.
    """

    def __init__(
        self,
        sources: Mapping[int, Callable[[], float]] | None = None,
        clock: Clock | None = None,
        seed: int | None = None,
        open_channels: Iterable[int] = (),
        *,
        serial: str = "MY58012345",
        firmware: str = "A.03.02-01.00-03.02-00.02-03.02",
        noise_c: float = 0.02,
        modules: Mapping[int, str] | None = None,
    ) -> None:
        self.sources: dict[int, Callable[[], float]] = dict(sources or {})
        self.clock: Clock = clock if clock is not None else SimClock()
        self.noise = KeyedNoise(seed)
        self.open_channels: set[int] = set(open_channels)
        self.serial = serial
        self.firmware = firmware
        self.noise_c = float(noise_c)
        self.modules: dict[int, str] = dict(modules if modules is not None else {1: "DAQM901A"})
        self.parser = _KeysightParser(
            idn=f"Keysight Technologies,DAQ970A,{serial},{firmware}",
            on_reset=self._reset,
        )
        self._reset()
        self._register()

    # -- state ------------------------------------------------------------------------
    def _reset(self) -> None:
        """``*RST``: channels unconfigured, empty scan list, reading-format fields off."""
        self.config: dict[int, tuple[str, str]] = {}  # channel -> (transducer, type)
        self.units: dict[int, str] = {}
        self.scan_list: list[int] = []
        self.readings: list[tuple[int, float, float]] = []  # (channel, value, t_rel_s)
        self.format_fields = {"CHAN": False, "UNIT": False, "TIME": False}
        self._scan_t0_s: float | None = None

    def _register(self) -> None:
        p = self.parser
        p.register(":MEASure:TEMPerature?", on_query=self._measure)
        p.register(":CONFigure:TEMPerature", on_set=self._configure)
        p.register(":CONFigure?", on_query=self._q_configure)
        p.register(":ROUTe:SCAN", on_set=self._set_scan,
                   on_query=lambda a: format_channel_list(self.scan_list))
        p.register(":ROUTe:SCAN:SIZE?", on_query=lambda a: format_nr1(len(self.scan_list)))
        p.register(":INITiate[:IMMediate]", on_set=self._initiate)
        p.register(":FETCh?", on_query=self._fetch)
        p.register(":READ?", on_query=self._read)
        p.register(":UNIT:TEMPerature", on_set=self._set_units, on_query=self._q_units)
        for field, pattern in (("CHAN", ":FORMat:READing:CHANnel"),
                               ("UNIT", ":FORMat:READing:UNIT"),
                               ("TIME", ":FORMat:READing:TIME")):
            p.register(pattern, on_set=self._format_setter(field),
                       on_query=self._format_getter(field))
        p.register(":SYSTem:CTYPe?", on_query=self._q_card_type)

    # -- channel handling --------------------------------------------------------------
    def _check_channels(self, channels: list[int]) -> list[int]:
        for ch in channels:
            slot, number = divmod(ch, 100)
            if slot not in self.modules or not 1 <= number <= CHANNELS_PER_SLOT:
                raise ScpiError(-221, f"Settings conflict (channel {ch} not available)")
        # The scanner visits channels in ascending order; duplicates are scanned once.
        return sorted(set(channels))

    def _split_temp_args(self, args: list[str]) -> tuple[str, str, list[int]]:
        """``TC,K[,<range>,<resolution>],(@list)`` -> (transducer, type, channels)."""
        if len(args) < 3:
            raise ScpiError(-109)
        transducer = parse_choice(args[0], ["TCouple", "RTD", "FRTD", "THERmistor", "DEF"])
        if transducer != "TC":
            raise ScpiError(-221, "Settings conflict (only thermocouples are simulated)")
        tc_type = args[1].strip().upper()
        if tc_type not in TC_TYPES:
            raise ScpiError(-224)
        channels = self._check_channels(parse_channel_list(args[-1]))
        return transducer, tc_type, channels

    def _configure_channels(self, tc_type: str, channels: list[int]) -> None:
        for ch in channels:
            self.config[ch] = ("TC", tc_type)
        # CONFigure and MEASure? redefine the scan list and turn extra reading fields off.
        self.scan_list = channels
        self.format_fields = dict.fromkeys(self.format_fields, False)

    def _configure(self, args: list[str]) -> None:
        _, tc_type, channels = self._split_temp_args(args)
        self._configure_channels(tc_type, channels)

    def _q_configure(self, args: list[str]) -> str:
        channels = (self._check_channels(parse_channel_list(args[0])) if args
                    else self.scan_list)
        parts = []
        for ch in channels:
            transducer, tc_type = self.config.get(ch, ("VOLT", ""))
            parts.append(f'"TEMP {transducer},{tc_type}"' if tc_type else '"VOLT"')
        return ",".join(parts)

    def _set_scan(self, args: list[str]) -> None:
        expect_args(args, 1)
        self.scan_list = self._check_channels(parse_channel_list(args[0]))

    def _set_units(self, args: list[str]) -> None:
        if not 1 <= len(args) <= 2:
            raise ScpiError(-109 if not args else -108)
        unit = parse_choice(args[0], ["C", "F", "K"])
        channels = (self._check_channels(parse_channel_list(args[1])) if len(args) == 2
                    else self.scan_list)
        for ch in channels:
            self.units[ch] = unit

    def _q_units(self, args: list[str]) -> str:
        channels = (self._check_channels(parse_channel_list(args[0])) if args
                    else self.scan_list)
        return ",".join(self.units.get(ch, "C") for ch in channels)

    def _format_setter(self, field: str) -> Callable[[list[str]], None]:
        def on_set(args: list[str]) -> None:
            expect_args(args, 1)
            self.format_fields[field] = parse_bool(args[0])

        return on_set

    def _format_getter(self, field: str) -> Callable[[list[str]], str]:
        def on_query(args: list[str]) -> str:
            expect_args(args, 0)
            return "1" if self.format_fields[field] else "0"

        return on_query

    def _q_card_type(self, args: list[str]) -> str:
        expect_args(args, 1)
        slot = round(float(args[0])) // 100
        if slot not in SLOTS:
            raise ScpiError(-222)
        model = self.modules.get(slot)
        if model is None:
            return "0,0,0,0"
        return f"Keysight Technologies,{model},0,1.0"

    # -- measuring ---------------------------------------------------------------------
    def true_temperature_c(self, channel: int) -> float:
        """Temperature the sensor on ``channel`` sees (NaN when open or unwired)."""
        source = self.sources.get(channel)
        if source is None or channel in self.open_channels:
            return math.nan
        return float(np.asarray(source(), dtype=float).reshape(-1)[0])

    def _reading(self, channel: int, now_s: float) -> float:
        t = self.true_temperature_c(channel)
        if math.isnan(t):
            return OPEN_TC_READING
        t += self.noise_c * float(self.noise.standard_normal(1, now_s, channel)[0])
        unit = self.units.get(channel, "C")
        if unit == "F":
            return t * 9.0 / 5.0 + 32.0
        if unit == "K":
            return t + 273.15
        return t

    def _scan(self) -> None:
        if not self.scan_list:
            raise ScpiError(-221, "Settings conflict (empty scan list)")
        unconfigured = [ch for ch in self.scan_list if ch not in self.config]
        if unconfigured:
            raise ScpiError(-221, f"Settings conflict (channel {unconfigured[0]} "
                                  "not configured)")
        now = self.clock.now()
        if self._scan_t0_s is None:
            self._scan_t0_s = now
        self.readings = [(ch, self._reading(ch, now), now - self._scan_t0_s)
                         for ch in self.scan_list]

    def _format(self) -> str:
        parts: list[str] = []
        for ch, value, t_rel in self.readings:
            text = format_nr3(value)
            if self.format_fields["UNIT"]:
                text += " " + self.units.get(ch, "C")
            parts.append(text)
            if self.format_fields["TIME"]:
                parts.append(f"{t_rel:013.3f}")
            if self.format_fields["CHAN"]:
                parts.append(str(ch))
        return ",".join(parts)

    def _measure(self, args: list[str]) -> str:
        _, tc_type, channels = self._split_temp_args(args)
        self._configure_channels(tc_type, channels)
        self._scan()
        return self._format()

    def _initiate(self, args: list[str]) -> None:
        expect_args(args, 0)
        self._scan()

    def _fetch(self, args: list[str]) -> str:
        expect_args(args, 0)
        if not self.readings:
            raise ScpiError(-230, "Data corrupt or stale")
        return self._format()

    def _read(self, args: list[str]) -> str:
        expect_args(args, 0)
        self._scan()
        return self._format()

    # -- fault injection ----------------------------------------------------------------
    def set_open(self, channel: int, is_open: bool = True) -> None:
        """Break (or repair) the thermocouple on ``channel``."""
        if is_open:
            self.open_channels.add(channel)
        else:
            self.open_channels.discard(channel)

    def inject_error(self, code: int, text: str | None = None) -> None:
        self.parser.push_error(code, text)

    # -- simulator protocol ------------------------------------------------------------
    def handle_line(self, line: str) -> str | None:
        return self.parser.handle_line(line)
