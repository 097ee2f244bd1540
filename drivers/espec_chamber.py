"""ESPEC temperature chamber driver (P-300 / SH / SU controller ASCII protocol) as a Chamber.

One job: hold the chamber at the test temperature a standard asks for (0 / 25 / 45 °C
...) or ramp there at a stated rate, read the air temperature and tell the engine whether
the chamber is stable, ramping, off or in alarm (door open included), raising typed
errors for the controller's ``NA:`` replies.

The ESPEC protocol is not SCPI: every command — settings included — is answered on its
own line (``OK:<command>`` or ``NA:<reason>``), there is no error queue and no
``*IDN?``; ``ROM?`` (controller firmware) identifies the controller. So this driver
overrides the base's write (a setting is a query whose reply must be ``OK:``), error
checking (errors arrive inline) and identification.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from .base import Instrument, control, measurement, register_driver, strict_range
from .errors import GarbledReply, InstrumentReportedError, InstrumentValueError
from .roles import Chamber
from .transport import Transport

# Reasons an ESPEC controller gives after "NA:" (from ESPEC's own ChamberConnectLibrary,
# which transcribes the controller communication manual).
NA_REASONS: dict[str, str] = {
    "CMD ERR": "unrecognised command",
    "ADDR ERR": "bad RS-485 address",
    "CONT NOT READY-1": "chamber has no such loop (humidity / product temperature)",
    "CONT NOT READY-2": "chamber is not running a program",
    "CONT NOT READY-3": "command not supported by this controller",
    "CONT NOT READY-4": "keys may not be locked while the controller is off",
    "CONT NOT READY-5": "time signal not enabled",
    "DATA NOT READY": "program does not exist",
    "PARA ERR": "parameter missing or unrecognisable",
    "DATA OUT OF RANGE": "value outside the chamber's range",
    "PROTECT ON": "data protection is enabled on the front panel",
    "INVALID REQ": "unsupported function",
    "CHB NOT READY": "chamber could not act on the command",
}

# Alarm code -> text. The real table is model-specific (chamber manual); these are the
# codes labdaq's simulator raises. Override per instance with ``alarm_texts=``.
DEFAULT_ALARM_TEXTS: dict[int, str] = {
    1: "air temperature above the upper limit (H)",
    2: "air temperature below the lower limit (L)",
    3: "overheat protector tripped",
    6: "refrigerator fault",
    7: "heater fault",
    8: "circulation fan fault",
    30: "door open",
}
DEFAULT_DOOR_ALARM_CODES: tuple[int, ...] = (30,)

# RUN PRGM takes its duration in whole minutes, at most 99:59.
MAX_PROGRAM_MINUTES = 99 * 60 + 59


class EspecCommandError(InstrumentReportedError):
    """The controller answered ``NA:<reason>`` (``reason`` is the raw text)."""

    def __init__(self, reason: str, *, instrument: str, command: str) -> None:
        self.reason = reason
        meaning = NA_REASONS.get(reason, "no description")
        super().__init__(
            f"chamber answered NA:{reason} ({meaning})",
            code=0, text=reason, instrument=instrument, command=command,
            expected="OK:<command> or data",
        )


class EspecOutOfRange(EspecCommandError):
    """``NA:DATA OUT OF RANGE``: a set point or limit outside what the chamber accepts."""


def _field(index: int) -> Any:
    """A ``cast`` for comma-separated replies: float of field ``index``."""

    def cast(text: str) -> float:
        parts = text.split(",")
        if len(parts) <= index:
            raise ValueError(f"no field {index} in {text!r}")
        return float(parts[index])

    cast.__name__ = f"number in field {index}"
    return cast


def _first_word(text: str) -> str:
    return text.strip().split(",")[0].strip()


@register_driver("espec_chamber")
class EspecChamber(Instrument, Chamber):
    """ESPEC chamber on a P-300-family controller (SH/SU/PR series), RS-232C/485 or a
    serial-to-TCP adapter; CR+LF framing.

    ``min_c``/``max_c`` are the chamber model's range (validated before sending);
    ``max_ramp_c_per_min`` the fastest ramp accepted; ``stable_band_c`` how close the air
    must be to the set point to report ``stable``. ``address`` prefixes commands with the
    RS-485 address (``"1,TEMP?"``).
    """

    idn_patterns: ClassVar[list[str]] = [r"^ESPEC\b"]
    # The controller does not answer *IDN?; probing asks ROM? instead (see cli_instruments).
    identify_queries: ClassVar[list[tuple[str, str]]] = [
        ("ROM?", r"^(P-?300|SCP-?220|P3\d\d)\b"),
    ]
    # Framing the controller needs; configuration uses these unless overridden.
    transport_options: ClassVar[dict[str, Any]] = {
        "read_termination": "\r\n", "write_termination": "\r\n",
    }

    temperature_c = measurement("TEMP?", "Air temperature (°C).", cast=_field(0))
    set_point = control(
        "TEMP?", "TEMP, S%.1f", "Constant set point (°C); reading gives the live (ramped) one.",
        validator=strict_range(-40.0, 150.0), cast=_field(1),
    )
    upper_limit_c = control(
        "TEMP?", "TEMP, H%.1f", "Upper temperature limit H (alarm above it).",
        validator=strict_range(-40.0, 150.0), cast=_field(2),
    )
    lower_limit_c = control(
        "TEMP?", "TEMP, L%.1f", "Lower temperature limit L (alarm below it).",
        validator=strict_range(-40.0, 150.0), cast=_field(3),
    )
    mode = control(
        "MODE?", "MODE, %s", "Operation: OFF, STANDBY, CONSTANT (RUN while a program runs).",
        validator=None, values=["OFF", "STANDBY", "CONSTANT"], cast=_first_word,
    )
    rom = measurement("ROM?", "Controller firmware version.", cast=str)

    def __init__(
        self,
        transport: Transport,
        name: str | None = None,
        *,
        idn: str | None = None,
        min_c: float = -40.0,
        max_c: float = 150.0,
        max_ramp_c_per_min: float = 10.0,
        stable_band_c: float = 0.5,
        address: int | None = None,
        alarm_texts: dict[int, str] | None = None,
        door_alarm_codes: tuple[int, ...] | list[int] = DEFAULT_DOOR_ALARM_CODES,
    ) -> None:
        super().__init__(transport, name, idn=idn)
        if not min_c < max_c:
            raise ValueError(f"min_c {min_c} must be below max_c {max_c}")
        self.min_c = float(min_c)
        self.max_c = float(max_c)
        self.max_ramp_c_per_min = float(max_ramp_c_per_min)
        self.stable_band_c = float(stable_band_c)
        self.address = address
        self.alarm_texts = dict(DEFAULT_ALARM_TEXTS)
        self.alarm_texts.update({int(k): v for k, v in (alarm_texts or {}).items()})
        self.door_alarm_codes = tuple(int(c) for c in door_alarm_codes)
        for prop in ("set_point", "upper_limit_c", "lower_limit_c"):
            self.set_validator(prop, strict_range(self.min_c, self.max_c))

    # -- protocol: every line is answered -----------------------------------------------
    def _frame(self, command: str) -> str:
        return f"{self.address},{command}" if self.address is not None else command

    def query(self, command: str) -> str:
        """Send one line, return its reply; ``NA:`` replies raise EspecCommandError."""
        with self._lock:
            reply = self.transport.query(self._frame(command)).strip()
        if reply.upper().startswith("NA:"):
            reason = reply[3:].strip()
            cls = EspecOutOfRange if reason == "DATA OUT OF RANGE" else EspecCommandError
            raise cls(reason, instrument=self.name, command=command)
        return reply

    def write(self, command: str) -> None:
        """A setting: the reply must be ``OK:...`` (read it, or it would answer the next
        query)."""
        reply = self.query(command)
        if not reply.upper().startswith("OK"):
            raise GarbledReply(reply=reply, instrument=self.name, command=command,
                               expected=f"OK:{command}")

    def check_errors(self, command: str = "") -> None:
        """Nothing to drain: the controller reports errors in the reply (``NA:``)."""
        return None

    @property
    def idn(self) -> str:
        """``ESPEC,<TYPE?>,<ROM?>`` (the controller has no ``*IDN?``)."""
        if self._idn is None:
            self._idn = f"ESPEC,{self.query('TYPE?')},{self.query('ROM?')}"
        return self._idn

    def reset(self) -> None:
        """No ``*RST`` on ESPEC controllers: stop temperature control (STANDBY)."""
        self.write("MODE, STANDBY")

    def clear(self) -> None:
        """No status registers to clear."""
        return None

    # -- Chamber role ---------------------------------------------------------------------
    def _check_temperature(self, temperature_c: float, command: str) -> float:
        try:
            value = float(temperature_c)
        except (TypeError, ValueError):
            value = math.nan
        if math.isnan(value) or not self.min_c <= value <= self.max_c:
            raise InstrumentValueError(
                f"temperature {temperature_c!r} °C rejected; nothing was sent",
                instrument=self.name, command=command,
                expected=f"a temperature in [{self.min_c:g}, {self.max_c:g}] °C",
            )
        return value

    def set_point_c(self, temperature_c: float) -> None:
        """Hold ``temperature_c``: constant set point, then CONSTANT operation (this also
        ends a running ramp program)."""
        value = self._check_temperature(temperature_c, "TEMP, S")
        with self._lock:
            self.write(self.command_for("set_point", round(value, 1)))
            self.write("MODE, CONSTANT")

    def ramp(self, temperature_c: float, rate_c_per_min: float) -> None:
        """Ramp linearly from the present air temperature to ``temperature_c`` at no more
        than ``rate_c_per_min``, then hold it (remote program ``RUN PRGM``).

        The controller counts whole minutes, so the duration is rounded up: the ramp is
        never faster than asked (cells are not shocked), at most a minute slower.
        """
        target = self._check_temperature(temperature_c, "RUN PRGM")
        try:
            rate = float(rate_c_per_min)
        except (TypeError, ValueError):
            rate = math.nan
        if math.isnan(rate) or not 0.0 < rate <= self.max_ramp_c_per_min:
            raise InstrumentValueError(
                f"ramp rate {rate_c_per_min!r} °C/min rejected; nothing was sent",
                instrument=self.name, command="RUN PRGM",
                expected=f"0 < rate <= {self.max_ramp_c_per_min:g} °C/min",
            )
        with self._lock:
            start = round(self.actual_c(), 1)
            minutes = max(1, math.ceil(abs(target - start) / rate - 1e-9))
            if minutes > MAX_PROGRAM_MINUTES:
                raise InstrumentValueError(
                    f"a {abs(target - start):.1f} °C ramp at {rate:g} °C/min takes "
                    f"{minutes} min; nothing was sent",
                    instrument=self.name, command="RUN PRGM",
                    expected=f"at most {MAX_PROGRAM_MINUTES} min (99:59)",
                )
            # The constant set point becomes the target too, so a later MODE, CONSTANT
            # (or an operator at the panel) holds the same temperature.
            self.write(self.command_for("set_point", round(target, 1)))
            self.write(self.ramp_command(start, target, minutes))

    @staticmethod
    def ramp_command(start_c: float, target_c: float, minutes: int) -> str:
        """``RUN PRGM, TEMP<start> GOTEMP<end> TIME<h>:<mm>`` (single-step remote program)."""
        return (f"RUN PRGM, TEMP{start_c:.1f} GOTEMP{target_c:.1f} "
                f"TIME{minutes // 60}:{minutes % 60:02d}")

    def actual_c(self) -> float:
        """Measured air temperature (°C)."""
        return float(self.temperature_c)

    def temperatures(self) -> dict[str, float]:
        """One ``TEMP?``: present, live set point, upper and lower limit (°C)."""
        reply = self.query("TEMP?")
        try:
            present, sp, upper, lower = (float(x) for x in reply.split(",")[:4])
        except ValueError:
            raise GarbledReply(reply=reply, instrument=self.name, command="TEMP?",
                               expected="present,set point,upper,lower") from None
        return {"actual_c": present, "set_point_c": sp, "upper_c": upper, "lower_c": lower}

    def alarms(self) -> list[tuple[int, str]]:
        """Active alarms as (code, text); ``ALARM?`` -> ``<count>[,<code>...]``."""
        reply = self.query("ALARM?")
        parts = [p.strip() for p in reply.split(",") if p.strip()]
        try:
            count = int(parts[0])
            codes = [int(p) for p in parts[1:]]
        except (ValueError, IndexError):
            raise GarbledReply(reply=reply, instrument=self.name, command="ALARM?",
                               expected="<count>[,<code>...]") from None
        if count != len(codes):
            raise GarbledReply(reply=reply, instrument=self.name, command="ALARM?",
                               expected=f"{count} alarm codes after the count")
        return [(c, self.alarm_texts.get(c, f"alarm {c}")) for c in codes]

    @property
    def door_open(self) -> bool:
        return any(code in self.door_alarm_codes for code, _ in self.alarms())

    def monitor(self) -> dict[str, Any]:
        """``MON?,DETAIL``: air temperature, humidity (None), detailed mode, alarm count."""
        reply = self.query("MON?,DETAIL")
        parts = reply.split(",")
        try:
            temp = float(parts[0])
            humidity = float(parts[1]) if parts[1].strip() else None
            mode = parts[2].strip()
            alarm_count = int(parts[3])
        except (ValueError, IndexError):
            raise GarbledReply(reply=reply, instrument=self.name, command="MON?,DETAIL",
                               expected="temperature,humidity,mode,alarms") from None
        return {"actual_c": temp, "humidity_pct": humidity, "mode": mode,
                "alarm_count": alarm_count}

    def status(self) -> str:
        """``alarm: <texts>``, ``door open``, ``off``, ``standby``, ``paused``,
        ``ramping``, ``settling`` or ``stable``."""
        with self._lock:
            mon = self.monitor()
            if mon["alarm_count"]:
                active = self.alarms()
                others = [f"{text} (code {code})" for code, text in active
                          if code not in self.door_alarm_codes]
                if others:
                    return "alarm: " + "; ".join(others)
                if active:
                    return "door open"
            mode = mon["mode"].upper()
            if mode == "OFF":
                return "off"
            if mode == "STANDBY":
                return "standby"
            if "PAUSE" in mode:
                return "paused"
            if "RUN" in mode and "HOLD" not in mode:
                return "ramping"
            temps = self.temperatures()
            if abs(temps["actual_c"] - temps["set_point_c"]) <= self.stable_band_c:
                return "stable"
            return "settling"

    def standby(self) -> None:
        """Stop temperature control (the air drifts back to room temperature)."""
        self.write("MODE, STANDBY")

    def end_ramp(self, hold: bool = True) -> None:
        """Stop a running ramp; ``hold`` keeps the temperature reached, else STANDBY."""
        self.write("PRGM, END, HOLD" if hold else "PRGM, END, STANDBY")
