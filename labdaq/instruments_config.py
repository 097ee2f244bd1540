"""Instrument configuration: which instruments a lab has, on which resource, with which driver.

One job: read a TOML or YAML file of ``[[instruments]]`` tables, validate it (pydantic)
with errors that name the instrument and the field, check resource strings and driver
names before anything is opened, and open a configured instrument with the framing its
driver needs. Also writes such a file (``labdaq sim --write-config``).

File format (TOML; YAML is the same structure under an ``instruments:`` list)::

    [[instruments]]
    name = "chamber1"
    driver = "espec_chamber"
    resource = "ASRL/dev/ttyUSB0::INSTR"
    options = { min_c = -40.0, max_c = 150.0, transport = { timeout_s = 3.0 } }
    channels = []

    [[instruments]]
    name = "smu1"
    driver = "keithley2450"
    resource = "TCPIP::10.0.0.5::5025::SOCKET"
    channels = [{ index = 1, name = "smu1/1", max_current_a = 1.05, max_voltage_v = 21.0 }]

``options.transport`` goes to :func:`labdaq.drivers.transport.open_transport` (timeouts,
terminations, baud rate); every other option is a keyword argument of the driver class.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# ---------------------------------------------------------------------------------------
# Resource strings
# ---------------------------------------------------------------------------------------

RESOURCE_EXAMPLES = (
    "TCPIP::<host>::<port>::SOCKET, TCPIP::<host>::INSTR, ASRL/dev/ttyUSB0::INSTR, "
    "ASRLCOM3::INSTR, GPIB0::<address>::INSTR, USB0::<vid>::<pid>::<serial>::INSTR, "
    "serial:///dev/ttyUSB0?baudrate=9600, /dev/ttyUSB0 or COM3"
)

_SERIAL_PATH = re.compile(r"^(/dev/\S+|COM\d+)$", re.IGNORECASE)
_VISA_CLASSES = ("INSTR", "SOCKET", "RAW")


class ResourceError(ValueError):
    """A resource string that cannot name an instrument; the message says what is
    expected."""


@dataclass(frozen=True)
class ResourceInfo:
    """What a resource string names: ``kind`` is ``visa`` or ``serial``; ``interface``
    ``TCPIP``/``ASRL``/``GPIB``/``USB``/``serial``; host/port for TCP, path for serial."""

    resource: str
    kind: str
    interface: str
    host: str | None = None
    port: int | None = None
    path: str | None = None


def parse_resource(resource: str) -> ResourceInfo:
    """Check a resource string's syntax (nothing is opened); ResourceError if malformed.

    Stricter than pyvisa on purpose: the resource class (``::INSTR``/``::SOCKET``) must be
    written out, the way NI-MAX and ``pyvisa-shell`` show it, and TCP ports are checked.
    """
    if not isinstance(resource, str):
        raise ResourceError(f"resource must be a string, got {type(resource).__name__}")
    text = resource.strip()
    if not text:
        raise ResourceError(f"empty resource string; expected one of: {RESOURCE_EXAMPLES}")
    if text != resource or any(ch.isspace() for ch in text):
        raise ResourceError(f"contains whitespace; expected one of: {RESOURCE_EXAMPLES}")
    if text.startswith("serial://"):
        port = text[len("serial://"):].split("?", 1)[0]
        if not port:
            raise ResourceError("names no port; expected serial://<port>[?baudrate=N], "
                                "e.g. serial:///dev/ttyUSB0")
        return ResourceInfo(resource, "serial", "serial", path=port)
    if _SERIAL_PATH.match(text):
        return ResourceInfo(resource, "serial", "serial", path=text)
    from pyvisa import rname

    try:
        parsed: Any = rname.parse_resource_name(text)
    except Exception as exc:  # pyvisa raises InvalidResourceName (and ValueError variants)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ResourceError(f"malformed resource string ({reason}); "
                            f"expected one of: {RESOURCE_EXAMPLES}") from None
    if text.split("::")[-1].upper() not in _VISA_CLASSES:
        raise ResourceError(
            "malformed resource string (no resource class at the end); expected it to end "
            f"in ::INSTR or ::SOCKET, e.g. {RESOURCE_EXAMPLES}")
    interface = str(getattr(parsed, "interface_type", "")) or text.split("::")[0]
    name = type(parsed).__name__
    if name == "TCPIPSocket":
        host = str(parsed.host_address)
        try:
            port_number = int(str(parsed.port))
        except ValueError:
            port_number = -1
        if not host or not 0 < port_number < 65536:
            raise ResourceError(f"port {parsed.port!r} is not a TCP port; expected "
                                "TCPIP::<host>::<port 1-65535>::SOCKET")
        return ResourceInfo(resource, "visa", "TCPIP", host=host, port=port_number)
    if name == "TCPIPInstr":
        return ResourceInfo(resource, "visa", "TCPIP", host=str(parsed.host_address))
    if name == "ASRLInstr":
        board = str(parsed.board)
        if not board:
            raise ResourceError("names no serial port; expected ASRL<port>::INSTR, "
                                "e.g. ASRL/dev/ttyUSB0::INSTR")
        return ResourceInfo(resource, "visa", "ASRL", path=board)
    if name == "GPIBInstr":
        try:
            primary = int(str(parsed.primary_address))
        except ValueError:
            primary = -1
        if not 0 <= primary <= 30:
            raise ResourceError(f"GPIB address {parsed.primary_address!r} is not 0-30; "
                                "expected GPIB<board>::<0-30>::INSTR")
        return ResourceInfo(resource, "visa", "GPIB")
    return ResourceInfo(resource, "visa", interface.upper().split(".")[-1])


# ---------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------

# Keyword arguments open_transport / VisaTransport / SerialTransport understand.
TRANSPORT_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "read_termination": str, "write_termination": str, "timeout_s": (int, float),
    "encoding": str, "reconnect_attempts": int, "backoff_initial_s": (int, float),
    "backoff_max_s": (int, float), "retry_timeouts": bool, "baudrate": int,
    "baud_rate": int, "bytesize": int, "parity": str, "stopbits": (int, float),
    "xonxoff": bool, "rtscts": bool, "dsrdtr": bool, "backend": str,
}

_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class ChannelConfig(_Strict):
    """One channel of an instrument (cycler output, logger input)."""

    index: int = Field(ge=0, description="channel number as the instrument counts it")
    name: str | None = Field(default=None, max_length=64)
    max_current_a: float | None = Field(default=None, gt=0)
    max_voltage_v: float | None = Field(default=None, gt=0)
    cell: str | None = Field(default=None, description="serial of the cell on the channel")


class InstrumentConfig(_Strict):
    """One ``[[instruments]]`` table."""

    name: str = Field(pattern=_NAME_RE, max_length=64)
    driver: str = Field(min_length=1)
    resource: str
    options: dict[str, Any] = Field(default_factory=dict)
    channels: list[ChannelConfig] = Field(default_factory=list)
    enabled: bool = True
    description: str | None = None

    @field_validator("resource")
    @classmethod
    def _resource(cls, value: str) -> str:
        parse_resource(value)
        return value

    @field_validator("channels", mode="before")
    @classmethod
    def _channels(cls, value: Any) -> Any:
        # `channels = [1, 2, 3]` is shorthand for tables with only an index.
        if isinstance(value, list):
            return [{"index": v} if isinstance(v, int) and not isinstance(v, bool) else v
                    for v in value]
        return value

    @field_validator("options")
    @classmethod
    def _options(cls, value: dict[str, Any]) -> dict[str, Any]:
        transport = value.get("transport", {})
        if not isinstance(transport, Mapping):
            raise ValueError("options.transport must be a table of transport settings")
        for key, item in transport.items():
            expected = TRANSPORT_OPTIONS.get(key)
            if expected is None:
                raise ValueError(f"unknown transport option {key!r}; expected one of "
                                 f"{sorted(TRANSPORT_OPTIONS)}")
            if isinstance(item, bool) and expected is not bool:
                raise ValueError(f"transport option {key!r} = {item!r} has the wrong type")
            if not isinstance(item, expected):
                raise ValueError(f"transport option {key!r} = {item!r} has the wrong type")
        timeout = transport.get("timeout_s")
        if timeout is not None and not (0 < float(timeout) < 3600 and math.isfinite(timeout)):
            raise ValueError(f"transport timeout_s = {timeout!r}; expected 0 < timeout_s < 3600")
        return value

    @model_validator(mode="after")
    def _unique_channels(self) -> InstrumentConfig:
        seen: set[int] = set()
        for ch in self.channels:
            if ch.index in seen:
                raise ValueError(f"channel index {ch.index} appears twice")
            seen.add(ch.index)
        return self

    @property
    def transport_options(self) -> dict[str, Any]:
        return dict(self.options.get("transport", {}))

    @property
    def driver_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.options.items() if k != "transport"}


class InstrumentsConfig(_Strict):
    """A whole file: the list of instruments."""

    instruments: list[InstrumentConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> InstrumentsConfig:
        names: dict[str, int] = {}
        resources: dict[str, str] = {}
        for inst in self.instruments:
            if inst.name in names:
                raise ValueError(f"instrument name {inst.name!r} is used twice")
            names[inst.name] = 1
            # Two drivers on one link would interleave commands and answers.
            if inst.enabled and inst.resource in resources:
                raise ValueError(f"instruments {resources[inst.resource]!r} and {inst.name!r} "
                                 f"share the resource {inst.resource!r}")
            if inst.enabled:
                resources[inst.resource] = inst.name
        return self

    def by_name(self, name: str) -> InstrumentConfig:
        for inst in self.instruments:
            if inst.name == name:
                return inst
        raise KeyError(name)


# ---------------------------------------------------------------------------------------
# Loading with readable errors
# ---------------------------------------------------------------------------------------


class InstrumentConfigError(ValueError):
    """The configuration is not usable; ``problems`` lists every finding, each naming the
    instrument and field."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = f"{source}: {self.problems[0]}"
        else:
            text = f"{source}: {len(self.problems)} problems:\n" + "\n".join(
                f"  - {p}" for p in self.problems)
        super().__init__(text)


def _where(data: Any, loc: Sequence[int | str]) -> str:
    """``instrument 'smu1' (instruments[0]), field 'resource'`` from an error location."""
    if len(loc) >= 2 and loc[0] == "instruments" and isinstance(loc[1], int):
        idx = loc[1]
        name = None
        try:
            entry = data["instruments"][idx]
            name = entry.get("name") if isinstance(entry, Mapping) else None
        except (KeyError, IndexError, TypeError):
            pass
        who = f"instrument {name!r} (instruments[{idx}])" if name else f"instruments[{idx}]"
        rest = [str(p) for p in loc[2:]]
        field = ""
        if rest:
            # channels.1.index -> channels[1].index
            parts: list[str] = []
            for p in rest:
                if p.isdigit() and parts:
                    parts[-1] += f"[{p}]"
                else:
                    parts.append(p)
            field = ", field '" + ".".join(parts) + "'"
        return who + field
    if loc:
        return "field '" + ".".join(str(p) for p in loc) + "'"
    return "file"


def _format_errors(data: Any, exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = list(err.get("loc", ()))
        msg = str(err.get("msg", "invalid"))
        msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
        where = _where(data, loc)
        if err.get("type") == "extra_forbidden":
            msg = "unknown key (not part of the instrument schema)"
        elif err.get("type") == "missing":
            msg = "required but missing"
        value = err.get("input")
        shown = ""
        if err.get("type") not in ("missing", "model_type") and not isinstance(value, dict | list):
            shown = f" (got {value!r})"
        problems.append(f"{where}: {msg}{shown}")
    return problems


def _read_file(path: Path) -> Any:
    text_source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InstrumentConfigError(text_source, [f"cannot read the file ({exc.strerror})"]
                                    ) from None
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            return yaml.safe_load(raw.decode("utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            reason = str(exc).replace("\n", " ")
            raise InstrumentConfigError(text_source, [f"not valid YAML: {reason}"]) from None
    if suffix == ".json":
        try:
            return json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise InstrumentConfigError(text_source, [f"not valid JSON: {exc}"]) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InstrumentConfigError(text_source, [f"not valid TOML: {exc}"]) from None


def parse_instruments_config(data: Any, source: str = "<config>", *,
                             check_drivers: bool = True) -> InstrumentsConfig:
    """Validate already-parsed data; InstrumentConfigError lists every problem."""
    if isinstance(data, list):
        data = {"instruments": data}
    if not isinstance(data, Mapping):
        raise InstrumentConfigError(source, [
            "expected a table with an 'instruments' list ([[instruments]] in TOML)"])
    problems: list[str] = []
    config: InstrumentsConfig | None = None
    try:
        config = InstrumentsConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(_format_errors(data, exc))
    if check_drivers:
        # Driver names and options are checked on the raw entries too, so one run of
        # `check` reports every problem, not the schema's first and the drivers' later.
        problems.extend(_driver_problems(data.get("instruments")))
    if problems or config is None:
        raise InstrumentConfigError(source, problems or ["invalid configuration"])
    return config


def load_instruments_config(path: str | Path, *, check_drivers: bool = True,
                            ) -> InstrumentsConfig:
    """Read and validate a TOML (default), YAML (.yaml/.yml) or JSON instruments file."""
    p = Path(path)
    return parse_instruments_config(_read_file(p), str(p), check_drivers=check_drivers)


def check_driver_names(config: InstrumentsConfig) -> list[str]:
    """Unknown drivers and options a driver does not accept, one message per finding."""
    return _driver_problems([inst.model_dump() for inst in config.instruments])


def _driver_problems(entries: Any) -> list[str]:
    from labdaq.drivers.base import load_entry_point_drivers

    if not isinstance(entries, list):
        return []
    drivers = load_entry_point_drivers()
    problems: list[str] = []
    for idx, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("driver"), str):
            continue  # the schema reports it
        name = entry.get("name")
        who = f"instrument {name!r} (instruments[{idx}])" if name else f"instruments[{idx}]"
        driver = entry["driver"].strip()
        cls = drivers.get(driver)
        if cls is None:
            problems.append(f"{who}, field 'driver': unknown driver {driver!r}; "
                            f"expected one of {sorted(drivers)}")
            continue
        options = entry.get("options")
        accepted = _driver_keywords(cls)
        if accepted is None or not isinstance(options, Mapping):
            continue
        for key in options:
            if key != "transport" and key not in accepted:
                problems.append(
                    f"{who}, field 'options.{key}': driver {driver!r} has no option "
                    f"{key!r}; expected one of {sorted(accepted) + ['transport']}")
    return problems


def _driver_keywords(cls: type) -> set[str] | None:
    """Keyword options a driver's constructor takes (None: it takes **kwargs)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    # transport/name/idn are supplied by the opener, not the configuration.
    return {n for n, p in params.items()
            if n not in ("transport", "name", "idn")
            and p.kind in (inspect.Parameter.KEYWORD_ONLY,
                           inspect.Parameter.POSITIONAL_OR_KEYWORD)}


def open_configured(inst: InstrumentConfig, **transport_overrides: Any) -> Any:
    """Open a configured instrument: the driver's own framing (class attributes), then
    the file's ``options.transport``, then ``transport_overrides``."""
    from labdaq.drivers.base import get_driver
    from labdaq.drivers.transport import open_transport

    cls = get_driver(inst.driver)
    opts: dict[str, Any] = {}
    # Drivers declare their framing either way: read_/write_termination class attributes
    # or a transport_options dict.
    for key in ("read_termination", "write_termination"):
        value = getattr(cls, key, None)
        if isinstance(value, str):
            opts[key] = value
    opts.update(getattr(cls, "transport_options", {}) or {})
    opts.update(inst.transport_options)
    opts.update(transport_overrides)
    transport = open_transport(inst.resource, **opts)
    try:
        return cls(transport, inst.name, **inst.driver_options)
    except Exception:
        transport.close()
        raise


# ---------------------------------------------------------------------------------------
# Writing (for `labdaq sim --write-config`)
# ---------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"TOML cannot hold {value!r} here")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def dump_instruments_toml(instruments: Sequence[Mapping[str, Any]], header: str = "") -> str:
    """TOML text for ``[[instruments]]`` tables (round-trips through the loader)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for inst in instruments:
        if lines:
            lines.append("")
        lines.append("[[instruments]]")
        for key in ("name", "driver", "resource", "description", "enabled", "options",
                    "channels"):
            if key in inst and inst[key] is not None:
                value = inst[key]
                if key == "channels" and value:
                    items = ",\n".join(f"  {_toml_value(ch)}" for ch in value)
                    lines.append(f"channels = [\n{items},\n]")
                else:
                    lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
