"""Multi-channel cycler cabinet driver (LABDAQ CYC-n channel-list SCPI dialect).

One job: drive a cabinet of 8-64 source/measure channels through channel-list SCPI
(``SOUR:CURR 1.5,(@1:8)``), reading every channel's V, I, T, mode and status with ONE
``MEAS:ALL?`` round trip parsed by numpy — a binary IEEE 488.2 block of float32
(``FORM:DATA REAL,32``) where the instrument has it, comma-separated ASCII otherwise —
with values validated before anything is sent and the error queue checked after every
set command. Dialect: docs/instruments/cabinet.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from .base import (
    Instrument,
    _ScpiProperty,
    control,
    measurement,
    parse_error_reply,
    register_driver,
    strict_discrete_set,
    strict_range,
)
from .cabinet_log import LoggedReadings, parse_logged
from .errors import GarbledReply, InstrumentError, InstrumentReportedError, InstrumentValueError
from .roles import Cycler
from .transport import Transport
from .transport.blocks import FramingError, block_payload, starts_block

DEFAULT_CURRENT_MAX_A = 10.0
DEFAULT_VOLTAGE_MAX_V = 5.0
PROTECTION_HEADROOM = 1.1  # protection may be programmed up to 110 % of the source range
MEAS_ALL_FIELDS = 5  # V, I, T, mode, status per channel
OVERRANGE_THRESHOLD = 9.0e37  # 9.9E+37 over range, 9.91E+37 NaN (open sensor)
# MEAS:ALL? reply formats (FORM:DATA): "real32" is a block of big-endian float32
# (FORM:BORD NORM, the IEEE 488.2 default); "ascii" comma-separated NR3/NR1.
DATA_FORMATS = ("ascii", "real32")
# How the engine reads the cabinet (docs/architecture.md, "Buffered acquisition"):
# "tick", one MEAS:ALL? per sample period; "buffered", the cabinet logs on its own clock
# and the engine fetches the new readings every fetch period (TRAC:DATA?).
ACQUISITIONS = ("tick", "buffered")
BUFFER_POINTS_MIN = 10
BUFFER_POINTS_MAX = 100_000
LOG_PERIOD_MIN_S = 0.001
LOG_PERIOD_MAX_S = 60.0
_REAL32_BIG_ENDIAN = np.dtype(">f4")

# Mode codes (MEAS:ALL? field 4).
MODE_OFF = 0
MODE_CC = 1
MODE_CV = 2

# STAT:CHAN? bits (MEAS:ALL? field 5).
STAT_OUTPUT = 1
STAT_CC = 2
STAT_CV = 4
STAT_COMPLIANCE = 8
STAT_OVP = 16
STAT_OCP = 32
STAT_WATCHDOG = 64
STAT_TEMP_FAULT = 128
STAT_TRIPPED = STAT_OVP | STAT_OCP


def channel_list(channels: Iterable[int]) -> str:
    """``[1, 2, 3, 4, 7, 9, 10]`` -> ``(@1:4,7,9,10)``: runs of 3+ as ranges, order kept."""
    items: list[str] = []
    run: list[int] = []

    def flush() -> None:
        if len(run) >= 3:
            items.append(f"{run[0]}:{run[-1]}")
        else:
            items.extend(str(ch) for ch in run)

    for ch in channels:
        if run and ch != run[-1] + 1:
            flush()
            run = []
        run.append(int(ch))
    if not run:
        raise ValueError("empty channel list")
    flush()
    return "(@" + ",".join(items) + ")"


def _on_off(text: str) -> str:
    """``OUTP?`` answers 1/0; the set command spells ON/OFF."""
    return "ON" if float(text) else "OFF"


class CabinetSample(NamedTuple):
    """One ``MEAS:ALL?`` reading; every field is an array with one entry per channel."""

    channels: NDArray[np.int64]
    voltage_v: NDArray[np.float64]
    current_a: NDArray[np.float64]
    temperature_c: NDArray[np.float64]  # NaN where the sensor is open
    mode: NDArray[np.int64]  # MODE_OFF / MODE_CC / MODE_CV
    status: NDArray[np.int64]  # STAT_* bits


class channel_control(_ScpiProperty):  # noqa: N801 - declarative API, like control()
    """A per-channel setting addressed with channel lists.

    Declared in one line like :class:`~labdaq.drivers.base.control` with the header
    only (``"SOUR:CURR?"``, ``"SOUR:CURR %g"``); the channel list is appended:
    ``SOUR:CURR 1.5,(@1:4)`` / ``SOUR:CURR? (@1:4)``. On an instance it is an accessor::

        cab.source_current_a[3] = 1.5          # one channel
        cab.source_current_a.set(1.5, [1, 2])  # one command for several channels
        cab.source_current_a.get([1, 2])       # numpy array, one query
    """

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return _ChannelAccessor(obj, self)

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(f"{self.name} is per channel: use .{self.name}[channel] = value "
                             f"or .{self.name}.set(value, channels)")


class _ChannelAccessor:
    """``channel_control`` bound to one cabinet."""

    def __init__(self, cabinet: CyclerCabinet, prop: channel_control) -> None:
        self._cabinet = cabinet
        self._prop = prop

    def command(self, value: Any, channels: int | Sequence[int] | None = None) -> str:
        """The exact set command (validated, not sent)."""
        return self._cabinet.channel_command(self._prop.name, value, channels)

    def set(self, value: Any, channels: int | Sequence[int] | None = None) -> None:
        """One set command for ``channels`` (None = all), then the error-queue check."""
        self._cabinet.write_checked(self.command(value, channels))

    def get(self, channels: int | Sequence[int] | None = None) -> NDArray[Any]:
        return self._cabinet.channel_values(self._prop.name, channels)

    def __getitem__(self, channel: int) -> Any:
        return self.get([channel])[0]

    def __setitem__(self, channel: int, value: Any) -> None:
        self.set(value, [channel])


@register_driver("cabinet")
class CyclerCabinet(Instrument, Cycler):
    """LABDAQ CYC-n cycler cabinet: 1-64 channels, +-10 A, 0-5 V (per model).

    Channels and limits are read from the instrument (``SYST:CHAN:COUN?``,
    ``SYST:CHAN:LIM?``) unless given. Positive current charges the cell.
    """

    idn_patterns = [r"LABDAQ,CYC-\d+"]

    # -- one line per SCPI property ---------------------------------------------------
    channel_count = measurement("SYST:CHAN:COUN?", "Number of channels.", cast=int)
    source_function = channel_control(
        "SOUR:FUNC?", "SOUR:FUNC %s", "Source function CURR or VOLT.",
        validator=strict_discrete_set(["CURR", "VOLT"]), cast=str)
    source_current_a = channel_control(
        "SOUR:CURR?", "SOUR:CURR %g", "Set current (A), positive = charge.",
        validator=strict_range(-DEFAULT_CURRENT_MAX_A, DEFAULT_CURRENT_MAX_A))
    voltage_limit_v = channel_control(
        "SOUR:CURR:VLIM?", "SOUR:CURR:VLIM %g",
        "Compliance voltage of the current source: charge clamps to CV here.",
        validator=strict_range(0.0, DEFAULT_VOLTAGE_MAX_V))
    switches_channel_lists = True
    sets_channel_lists = True
    has_low_voltage_clamp = True
    has_temperature_sensor = True

    voltage_limit_low_v = channel_control(
        "SOUR:CURR:VLIM:LOW?", "SOUR:CURR:VLIM:LOW %g",
        "Lower compliance voltage: discharge clamps to CV here.",
        validator=strict_range(0.0, DEFAULT_VOLTAGE_MAX_V))
    source_voltage_v = channel_control(
        "SOUR:VOLT?", "SOUR:VOLT %g", "Set voltage (V) of the voltage source.",
        validator=strict_range(0.0, DEFAULT_VOLTAGE_MAX_V))
    current_limit_a = channel_control(
        "SOUR:VOLT:ILIM?", "SOUR:VOLT:ILIM %g", "Current limit (A) of the voltage source.",
        validator=strict_range(0.0, DEFAULT_CURRENT_MAX_A))
    over_voltage_protection_v = channel_control(
        "SOUR:VOLT:PROT?", "SOUR:VOLT:PROT %g", "Hardware trip above this voltage (V).",
        validator=strict_range(0.0, DEFAULT_VOLTAGE_MAX_V * PROTECTION_HEADROOM))
    over_current_protection_a = channel_control(
        "SOUR:CURR:PROT?", "SOUR:CURR:PROT %g", "Hardware trip above this |current| (A).",
        validator=strict_range(0.0, DEFAULT_CURRENT_MAX_A * PROTECTION_HEADROOM))
    output_enabled = channel_control(
        "OUTP?", "OUTP %s", "Output relay (queried back as 1/0).",
        values={True: "ON", False: "OFF"}, map_values=True, cast=_on_off)
    # Hardware-timed logging (docs/instruments/cabinet.md, "Buffered logging").
    logging_period_s = control(
        "TRIG:TIM?", "TRIG:TIM %g", "Logging period on the instrument's clock (s).",
        validator=strict_range(LOG_PERIOD_MIN_S, LOG_PERIOD_MAX_S))
    buffer_points = control(
        "TRAC:POIN?", "TRAC:POIN %d", "Depth of the logging ring (readings).",
        validator=strict_range(BUFFER_POINTS_MIN, BUFFER_POINTS_MAX), cast=int)
    buffer_first_index = measurement(
        "TRAC:ACT:STAR?", "Oldest reading index the ring holds (0: empty).", cast=int)
    buffer_last_index = measurement(
        "TRAC:ACT:END?", "Newest reading index (readings since INIT).", cast=int)
    protection_tripped = channel_control(
        "OUTP:PROT:TRIP?", None, "Latched OVP/OCP trip; clear with clear_protection().",
        values={True: 1, False: 0}, map_values=True, cast=int)

    def __init__(
        self,
        transport: Transport,
        name: str | None = None,
        *,
        idn: str | None = None,
        channels: int | None = None,
        current_max_a: float | None = None,
        voltage_max_v: float | None = None,
        data_format: str | None = None,
        acquisition: str = "tick",
        buffer_points: int = 1000,
        fetch_period_s: float = 0.05,
    ) -> None:
        super().__init__(transport, name, idn=idn)
        if data_format is not None and data_format not in DATA_FORMATS:
            raise ValueError(f"data_format must be one of {DATA_FORMATS} or None (ask the "
                             f"instrument), got {data_format!r}")
        if acquisition not in ACQUISITIONS:
            raise ValueError(f"acquisition must be one of {ACQUISITIONS}, got {acquisition!r}")
        if acquisition == "buffered" and data_format == "ascii":
            raise ValueError("acquisition 'buffered' reads binary blocks: data_format "
                             "'ascii' cannot go with it")
        if not BUFFER_POINTS_MIN <= buffer_points <= BUFFER_POINTS_MAX:
            raise ValueError(f"buffer_points must be in {BUFFER_POINTS_MIN}.."
                             f"{BUFFER_POINTS_MAX}, got {buffer_points!r}")
        if not 0.0 < fetch_period_s <= 10.0:
            raise ValueError(f"fetch_period_s must be in (0, 10], got {fetch_period_s!r}")
        # Read by the engine's instrument group (labdaq/engine/group_buffered.py).
        self.acquisition = acquisition
        self.buffer_depth = int(buffer_points)
        self.fetch_period_s = float(fetch_period_s)
        # Discover what this model has; a controller may also pass them (no traffic).
        if channels is None:
            channels = int(self.channel_count)
        if current_max_a is None or voltage_max_v is None:
            i_max, v_max = self._query_limits()
            current_max_a = i_max if current_max_a is None else current_max_a
            voltage_max_v = v_max if voltage_max_v is None else voltage_max_v
        if not 1 <= channels <= 64:
            raise InstrumentError(f"instrument reports {channels} channels",
                                  instrument=self.name, command="SYST:CHAN:COUN?",
                                  expected="1..64")
        self.channel_total = channels
        self.channels = list(range(1, channels + 1))
        self.current_max_a = float(current_max_a)
        self.voltage_max_v = float(voltage_max_v)
        i_max, v_max = self.current_max_a, self.voltage_max_v
        self.set_validator("source_current_a", strict_range(-i_max, i_max))
        self.set_validator("voltage_limit_v", strict_range(0.0, v_max))
        self.set_validator("voltage_limit_low_v", strict_range(0.0, v_max))
        self.set_validator("source_voltage_v", strict_range(0.0, v_max))
        self.set_validator("current_limit_a", strict_range(0.0, i_max))
        self.set_validator("over_voltage_protection_v",
                           strict_range(0.0, v_max * PROTECTION_HEADROOM))
        self.set_validator("over_current_protection_a",
                           strict_range(0.0, i_max * PROTECTION_HEADROOM))
        # Run limits per channel (voltage_max_v, current_max_a) for the software check.
        self.protection: dict[int, tuple[float, float]] = {}
        self._all_list = channel_list(self.channels)
        self._last_sel: tuple[list[Any], list[int], str] = ([], [], "")
        self.data_format = self._select_format(data_format)
        if acquisition == "buffered" and self.data_format != "real32":
            raise InstrumentError("acquisition 'buffered' needs FORM:DATA REAL,32, which "
                                  "the instrument refused", instrument=self.name,
                                  command="FORM:DATA REAL,32")

    def _select_format(self, wanted: str | None) -> str:
        """Binary ``MEAS:ALL?`` replies where the instrument has them: None asks for
        ``FORM:DATA REAL,32`` big-endian and keeps ASCII if the instrument refuses it.
        "ascii" sends nothing (an instrument answers ASCII after ``*RST``)."""
        if wanted == "ascii":
            return "ascii"
        try:
            self.write_checked("FORM:DATA REAL,32;:FORM:BORD NORM")
        except InstrumentReportedError:
            if wanted == "real32":
                raise
            return "ascii"
        return "real32"

    def set(self, name: str, value: Any, *, check_errors: bool | None = None) -> None:
        """Plain properties only: a per-channel one without a list would be refused by
        the instrument (-109), so say so before sending."""
        if isinstance(self._descriptor(name), channel_control):
            raise TypeError(f"{name} is per channel: use .{name}.set(value, channels)")
        super().set(name, value, check_errors=check_errors)

    def _query_limits(self) -> tuple[float, float]:
        command = "SYST:CHAN:LIM?"
        values = self.query_floats(command)
        if len(values) != 2 or not all(v > 0 and math.isfinite(v) for v in values):
            raise GarbledReply(reply=",".join(map(str, values)), instrument=self.name,
                               command=command, expected="<max current A>,<max voltage V>")
        return values[0], values[1]

    # -- channel helpers ------------------------------------------------------------------
    def _channels(self, channels: int | Sequence[int] | None) -> list[int]:
        """Validated 1-based channel numbers (None = all); nothing is sent on error."""
        if channels is None:
            return self.channels
        chans = [channels] if isinstance(channels, int | np.integer) else list(channels)
        if not chans:
            raise InstrumentValueError("empty channel selection", instrument=self.name,
                                       expected=f"channels in 1..{self.channel_total}")
        for ch in chans:
            if isinstance(ch, bool) or not isinstance(ch, int | np.integer) or not (
                    1 <= ch <= self.channel_total):
                raise InstrumentValueError(
                    f"channel {ch!r} does not exist; nothing was sent",
                    instrument=self.name, expected=f"channels in 1..{self.channel_total}")
        return [int(ch) for ch in chans]

    def _list(self, channels: int | Sequence[int] | None) -> tuple[list[int], str]:
        # An engine asks for the same channels every tick (hundreds of times a second):
        # the last selection's validation and list text are kept.
        last = self._last_sel  # one read: another thread may replace it
        if isinstance(channels, list) and channels and channels == last[0]:
            return last[1], last[2]
        chans = self._channels(channels)
        text = self._all_list if chans is self.channels else channel_list(chans)
        if isinstance(channels, list):
            self._last_sel = (list(channels), chans, text)
        return chans, text

    def channel_command(self, name: str, value: Any,
                        channels: int | Sequence[int] | None = None) -> str:
        """``<set command>,(@list)`` for property ``name`` after validation (not sent)."""
        _, text = self._list(channels)
        return f"{self.command_for(name, value)},{text}"

    def channel_values(self, name: str,
                       channels: int | Sequence[int] | None = None) -> NDArray[Any]:
        """Query property ``name`` for ``channels``: one value per channel, in order."""
        prop = self._descriptor(name)
        assert prop.get_cmd is not None
        chans, text = self._list(channels)
        command = f"{prop.get_cmd} {text}"
        reply = self.query(command)
        parts = reply.split(",")
        if len(parts) != len(chans):
            raise GarbledReply(reply=reply, instrument=self.name, command=command,
                               expected=f"{len(chans)} comma-separated values")
        try:
            values = [prop.parse_reply(p) for p in parts]
        except (ValueError, TypeError, KeyError):
            raise GarbledReply(reply=reply, instrument=self.name, command=command,
                               expected=f"values for {name}") from None
        return np.asarray(values)

    def _send_checked(self, commands: Sequence[str]) -> None:
        """All commands in one program message (one lock, no time passes between them on
        the instrument), then the error-queue check."""
        line = ";:".join(commands)
        self.write_checked(line)

    # -- measurement: one round trip ------------------------------------------------------
    def set_low_voltage_clamp(self, channel: int | Sequence[int], voltage_v: float) -> None:
        self.voltage_limit_low_v.set(voltage_v, channel)

    async def ameasure(self, channels: Sequence[int] | None = None) -> np.ndarray | None:
        """:meth:`measure` on the event loop's thread (``Instrument.aquery``); None when
        it has to go through the worker thread instead."""
        chans, text = self._list(channels)
        command = f"MEAS:ALL? {text}"
        reply = await self.aquery(command, raw=True)
        if reply is None:
            return None
        return self._parse_meas_all(reply, chans, command)[:, :3].copy()

    def _meas_all(self, channels: int | Sequence[int] | None) -> tuple[list[int],
                                                                      NDArray[np.float64]]:
        chans, text = self._list(channels)
        command = f"MEAS:ALL? {text}"
        return chans, self._parse_meas_all(self.query_raw(command), chans, command)

    def _parse_meas_all(self, reply: bytes, chans: list[int], command: str
                        ) -> NDArray[np.float64]:
        """``(n, 5)`` table of a ``MEAS:ALL?`` reply, binary block or ASCII — told apart
        by the reply itself, so an instrument reset to ASCII behind the driver's back is
        still read right. A reply that is neither leaves the link to be resynchronised."""
        try:
            return self._parse_meas_all_table(reply, chans, command)
        except GarbledReply:
            self.transport.mark_out_of_step()
            raise

    def _parse_meas_all_table(self, reply: bytes, chans: list[int], command: str
                              ) -> NDArray[np.float64]:
        count = len(chans) * MEAS_ALL_FIELDS
        if starts_block(reply):
            try:
                payload = block_payload(reply)
            except FramingError as exc:
                raise GarbledReply(str(exc), reply=reply, instrument=self.name,
                                   command=command,
                                   expected=f"a block of {count} float32") from None
            if len(payload) != count * _REAL32_BIG_ENDIAN.itemsize:
                raise GarbledReply(
                    f"block of {len(payload)} bytes for {len(chans)} channels",
                    reply=reply, instrument=self.name, command=command,
                    expected=f"{count} float32 (V,I,T,mode,status each)")
            data = np.frombuffer(payload, dtype=_REAL32_BIG_ENDIAN).astype(np.float64)
        else:
            try:
                data = np.array(reply.decode("ascii").split(","), dtype=float)
            except (UnicodeDecodeError, ValueError):
                raise GarbledReply(reply=reply, instrument=self.name, command=command,
                                   expected=f"{count} numbers") from None
            if data.size != count:
                raise GarbledReply(
                    f"got {data.size} numbers for {len(chans)} channels", reply=reply,
                    instrument=self.name, command=command,
                    expected=f"{count} numbers (V,I,T,mode,status each)")
        table = data.reshape(len(chans), MEAS_ALL_FIELDS)
        # SCPI over-range/NaN sentinels become NaN so limits never compare against 9.9e37.
        reals = table[:, :3]
        reals[np.abs(reals) >= OVERRANGE_THRESHOLD] = np.nan
        return table

    def measure(self, channels: Sequence[int] | None = None) -> np.ndarray:
        """``(n, 3)`` float array ``[voltage_v, current_a, temperature_c]``, one query."""
        return self._meas_all(channels)[1][:, :3].copy()

    def measure_full(self, channels: Sequence[int] | None = None) -> CabinetSample:
        """V, I, T, mode and status of ``channels`` (None = all) from one query."""
        chans, table = self._meas_all(channels)
        return CabinetSample(
            channels=np.asarray(chans, dtype=np.int64),
            voltage_v=table[:, 0], current_a=table[:, 1], temperature_c=table[:, 2],
            mode=table[:, 3].astype(np.int64), status=table[:, 4].astype(np.int64),
        )

    # -- hardware-timed logging -----------------------------------------------------------
    def start_logging(self, period_s: float, points: int | None = None) -> None:
        """Stop any logging, size the ring (``points`` readings, default the
        ``buffer_points`` option), set the period and start: reading 1 is taken when the
        instrument takes ``INIT``, the rest on its own clock ``period_s`` apart."""
        commands = [
            "ABOR",
            self.command_for("buffer_points", self.buffer_depth if points is None else points),
            self.command_for("logging_period_s", period_s),
            "INIT",
        ]
        self._send_checked(commands)

    def stop_logging(self) -> None:
        """``ABOR``: no more readings; those held can still be fetched."""
        self.write_checked("ABOR")

    def _fetch_command(self, start: int, channels: int | Sequence[int] | None
                       ) -> tuple[list[int], str]:
        if isinstance(start, bool) or not isinstance(start, int | np.integer) or start < 1:
            raise InstrumentValueError(f"start index {start!r}; nothing was sent",
                                       instrument=self.name, expected="an index >= 1")
        chans, text = self._list(channels)
        return chans, f"TRAC:DATA? {int(start)},{text}"

    def _parse_logged(self, reply: bytes, chans: list[int], start: int,
                      command: str) -> LoggedReadings:
        try:
            return parse_logged(reply, len(chans), start, instrument=self.name,
                                command=command)
        except GarbledReply:
            self.transport.mark_out_of_step()
            raise

    def fetch_logged(self, start: int, channels: int | Sequence[int] | None = None
                     ) -> LoggedReadings:
        """Every reading the ring holds from index ``start`` on, for ``channels`` (None
        = all), in one query; ``first_held`` says which asked-for indices were lost."""
        chans, command = self._fetch_command(start, channels)
        return self._parse_logged(self.query_raw(command), chans, start, command)

    async def afetch_logged(self, start: int, channels: Sequence[int] | None = None
                            ) -> LoggedReadings | None:
        """:meth:`fetch_logged` on the event loop's thread; None when it has to go
        through the worker thread instead (as :meth:`ameasure`)."""
        chans, command = self._fetch_command(start, channels)
        reply = await self.aquery(command, raw=True)
        if reply is None:
            return None
        return self._parse_logged(reply, chans, start, command)

    def status(self, channels: Sequence[int] | None = None) -> NDArray[np.int64]:
        """``STAT:CHAN?`` bits per channel."""
        chans, text = self._list(channels)
        command = f"STAT:CHAN? {text}"
        reply = self.query(command)
        try:
            bits = np.array(reply.split(","), dtype=np.int64)
        except ValueError:
            raise GarbledReply(reply=reply, instrument=self.name, command=command,
                               expected="integers") from None
        if bits.size != len(chans):
            raise GarbledReply(reply=reply, instrument=self.name, command=command,
                               expected=f"{len(chans)} integers")
        return bits

    # -- Cycler ---------------------------------------------------------------------------
    def _check_protection(self, chans: list[int], voltage_v: float, current_a: float,
                          command: str) -> None:
        for ch in chans:
            limits = self.protection.get(ch)
            if limits is None:
                continue
            v_max, i_max = limits
            if abs(current_a) > i_max or voltage_v > v_max:
                raise InstrumentValueError(
                    f"channel {ch}: {current_a:g} A / {voltage_v:g} V exceeds the run's "
                    "protection limits; nothing was sent",
                    instrument=self.name, command=command,
                    expected=f"|I| <= {i_max:g} A and V <= {v_max:g} V")

    def configure_protection(self, channel: int | Sequence[int], voltage_max_v: float,
                             current_max_a: float) -> None:
        """Program over-voltage and over-current trips (the hardware safety layer)."""
        chans, text = self._list(channel)
        commands = [
            f"{self.command_for('over_voltage_protection_v', voltage_max_v)},{text}",
            f"{self.command_for('over_current_protection_a', current_max_a)},{text}",
        ]
        if voltage_max_v <= 0 or current_max_a <= 0:
            # A zero trip level would trip at once; it is never what a run means.
            raise InstrumentValueError(
                f"voltage_max_v={voltage_max_v!r}, current_max_a={current_max_a!r}; "
                "nothing was sent",
                instrument=self.name, command=commands[0], expected="limits > 0")
        self._send_checked(commands)
        for ch in chans:
            self.protection[ch] = (float(voltage_max_v), float(current_max_a))

    def set_current(self, channel: int | Sequence[int], current_a: float,
                    voltage_limit_v: float) -> None:
        """CC (positive = charge) clamped to CV at ``voltage_limit_v`` while charging."""
        chans, text = self._list(channel)
        # Validate everything before sending anything: a rejected value changes nothing.
        commands = [
            f"{self.command_for('source_function', 'CURR')},{text}",
            f"{self.command_for('voltage_limit_v', voltage_limit_v)},{text}",
            f"{self.command_for('source_current_a', current_a)},{text}",
        ]
        self._check_protection(chans, voltage_limit_v, current_a, commands[-1])
        self._send_checked(commands)

    def set_voltage(self, channel: int | Sequence[int], voltage_v: float,
                    current_limit_a: float) -> None:
        chans, text = self._list(channel)
        commands = [
            f"{self.command_for('source_function', 'VOLT')},{text}",
            f"{self.command_for('current_limit_a', current_limit_a)},{text}",
            f"{self.command_for('source_voltage_v', voltage_v)},{text}",
        ]
        self._check_protection(chans, voltage_v, current_limit_a, commands[-1])
        self._send_checked(commands)

    def output(self, channel: int | Sequence[int], on: bool) -> None:
        self.output_enabled.set(bool(on), channel)

    async def aswitch_off(self, channels: int | list[int]) -> float | None:
        """:meth:`switch_off` on the event loop's thread in one round trip: the off
        command and the error query in one program message (``OUTP OFF,(@1,3);:SYST:ERR?``,
        nothing happens on the instrument between the two). A safety cut-off waits for
        no worker-thread hand-off. Switching off twice does no harm, so when this cannot
        be done (the link busy or failing) None: the caller switches off through the
        worker thread. An error entry in the reply is raised as the worker path raises
        it (InstrumentReportedError, after the command went out)."""
        _, text = self._list(channels)
        command = f"{self.command_for('output_enabled', False)},{text};{self.error_query}"
        self.mark_next_send()
        reply = await self.aquery(command, repeatable=True)
        if reply is None:
            return None
        try:
            code, message = parse_error_reply(reply)
        except ValueError:
            return None  # out of step: the worker path resynchronises and sends it again
        if code != 0:
            raise InstrumentReportedError(code=code, text=message, instrument=self.name,
                                          command=command)
        sent_s = self.marked_send_s()
        return sent_s if math.isfinite(sent_s) else time.perf_counter()

    def clear_protection(self, channels: int | Sequence[int] | None = None) -> None:
        """Clear latched OVP/OCP trips so the outputs can be switched on again."""
        _, text = self._list(channels)
        self.write_checked(f"OUTP:PROT:CLE {text}")

    def all_off(self) -> None:
        self.output_enabled.set(False, None)

    def safe_shutdown(self) -> None:
        """Every output off, then confirm; raises if any output still reports on."""
        off = f"OUTP OFF,{self._all_list}"
        problem = ""
        try:
            self.write(off)
        except InstrumentError as exc:
            problem = f"{off}: {exc}"
        command = f"OUTP? {self._all_list}"
        try:
            reply = self.query(command)
        except InstrumentError as exc:
            raise InstrumentError(f"could not confirm outputs off ({exc}); earlier: {problem}",
                                  instrument=self.name, command=command,
                                  expected="every output 0") from exc
        states = [s.strip() for s in reply.split(",")]
        on = [ch for ch, s in zip(self.channels, states, strict=False) if s not in ("0", "OFF")]
        if len(states) != self.channel_total or on:
            raise InstrumentError(f"outputs still on: {on or reply!r}; earlier: {problem}",
                                  instrument=self.name, command=command,
                                  expected="every output 0")

