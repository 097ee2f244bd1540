"""Instrument configuration: which instruments a lab has, on which resource, with which driver.

One job: read a TOML or YAML file of ``[[instruments]]`` (and ``[[cells]]``) tables,
validate it (pydantic) with errors that name the file, the entry, the field and, where
the text allows, the line; check resource strings, driver names and each channel's
wiring before anything is opened. Also writes such a file (``labdaq sim --write-config``).
Opening a configured instrument is drivers/opener.py; loading a file into the database
is labdaq/instruments_apply.py.

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

    [[instruments.channels]]
    index = 1
    name = "smu1/1"
    max_current_a = 1.05
    max_voltage_v = 21.0
    cell = "A-001"
    impedance = "eis1"
    chamber = "chamber1"
    thermocouple = { logger = "logger1", channel = 101, type = "K", placement = "can side" }

    [[cells]]
    serial = "A-001"
    chemistry = "nmc811"
    capacity_ah = 4.9
    charge_cutoff_v = 4.2
    discharge_cutoff_v = 2.5

``options.transport`` goes to the transport (timeouts, terminations, baud rate) on top of
the framing the driver declares; every other option is a keyword argument of the driver
class. A channel's ``impedance``, ``chamber`` and ``thermocouple`` name the instruments
wired to its cell; ``cell`` is the serial of the cell on it (a ``[[cells]]`` entry or a
cell already in the database).
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

from labdaq.bounds import (
    INT32_MAX,
    Name,
    PositiveAmps,
    PositiveVolts,
    Text,
)
from labdaq.instrument_resources import (  # noqa: F401 - re-exported for callers
    RESOURCE_EXAMPLES,
    ResourceError,
    ResourceInfo,
    parse_resource,
)
from labdaq.instruments_toml import dump_instruments_toml  # noqa: F401 - re-exported
from labdaq.run_requests import CellIn

# ---------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------

# Keyword arguments open_transport / VisaTransport / SerialTransport understand.
TRANSPORT_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "read_termination": str, "write_termination": str, "timeout_s": (int, float),
    "encoding": str, "reconnect_attempts": int, "backoff_initial_s": (int, float),
    "backoff_max_s": (int, float), "retry_timeouts": bool, "baudrate": int,
    "baud_rate": int, "bytesize": int, "parity": str, "stopbits": (int, float),
    "xonxoff": bool, "rtscts": bool, "dsrdtr": bool, "backend": str, "stream": bool,
}

_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
NAME_PATTERN = _NAME_RE  # an instrument or channel name, for callers outside this module


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class ThermocoupleWiring(_Strict):
    """The temperature sensor on a channel's cell: a logger input, its type and place."""

    logger: str = Field(pattern=_NAME_RE, max_length=64,
                        description="name of the temperature logger instrument")
    channel: int = Field(ge=1, description="the logger's input, e.g. 101 on a DAQ970A")
    type: str | None = Field(default=None, pattern=r"^[BEJKNRST]$",
                             description="thermocouple type (IEC 60584), e.g. K")
    placement: str | None = Field(default=None, max_length=200,
                                  description="where on the cell, e.g. 'can side, mid-height'")


class ChannelConfig(_Strict):
    """One channel of an instrument (cycler output, logger input) and its cell's wiring."""

    # Bounds (labdaq.bounds): the index fits its INTEGER column, limits are finite.
    index: int = Field(ge=0, le=INT32_MAX, description="channel number as the instrument counts it")
    name: Name | None = Field(default=None, max_length=64)
    max_current_a: PositiveAmps | None = None
    max_voltage_v: PositiveVolts | None = None
    cell: Name | None = Field(
        default=None, max_length=100, description="serial of the cell on the channel"
    )
    thermocouple: ThermocoupleWiring | None = None
    impedance: str | None = Field(default=None, pattern=_NAME_RE, max_length=64,
                                  description="impedance analyser clipped to the cell")
    chamber: str | None = Field(default=None, pattern=_NAME_RE, max_length=64,
                                description="climate chamber the cell sits in")

    def wiring(self) -> dict[str, Any] | None:
        """The channel's auxiliary wiring as stored in ``channels.aux`` (None: none)."""
        aux: dict[str, Any] = {}
        if self.impedance:
            aux["impedance"] = self.impedance
        if self.chamber:
            aux["chamber"] = self.chamber
        if self.thermocouple is not None:
            aux["thermocouple"] = self.thermocouple.model_dump(exclude_none=True)
        return aux or None


class CellConfig(CellIn):
    """One ``[[cells]]`` table: a cell a channel can name as its default, with the fields
    and checks of a run request's inline cell (:class:`labdaq.run_requests.CellIn`, which
    imports no database layer), whitespace stripped like every other table here."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class InstrumentConfig(_Strict):
    """One ``[[instruments]]`` table."""

    name: str = Field(pattern=_NAME_RE, max_length=64)
    driver: Name = Field(max_length=100)
    resource: str = Field(max_length=300, pattern=r"^[^\x00-\x1f\x7f]*$")
    options: dict[str, Any] = Field(default_factory=dict)
    channels: list[ChannelConfig] = Field(default_factory=list)
    enabled: bool = True
    description: Text | None = None
    # The acquisition node that drives it (labdaq.nodes, `labdaq serve --role node
    # --node-name <name>`); without one, the single-machine node (`--role all`) does.
    node: str | None = Field(default=None, min_length=1, max_length=100,
                             pattern=r"^[^\x00-\x1f\x7f]*$")

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
    """A whole file: the instruments, and the cells their channels name."""

    instruments: list[InstrumentConfig] = Field(default_factory=list)
    cells: list[CellConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> InstrumentsConfig:
        serials: set[str] = set()
        for cell in self.cells:
            if cell.serial in serials:
                raise ValueError(f"cell serial {cell.serial!r} is used twice")
            serials.add(cell.serial)
        channel_names: dict[str, str] = {}
        for inst in self.instruments:
            for ch in inst.channels:
                ch_name = ch.name or f"{inst.name}/{ch.index}"
                if ch_name in channel_names:
                    raise ValueError(f"channel name {ch_name!r} is used by instruments "
                                     f"{channel_names[ch_name]!r} and {inst.name!r}")
                channel_names[ch_name] = inst.name
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
    entry and field (and the line, where the text gives it)."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = f"{source}: {self.problems[0]}"
        else:
            text = f"{source}: {len(self.problems)} problems:\n" + "\n".join(
                f"  - {p}" for p in self.problems)
        super().__init__(text)


Loc = Sequence[int | str]
_ENTRY_KINDS = {"instruments": "instrument", "cells": "cell"}


@dataclass(frozen=True)
class SourceText:
    """The text a configuration was read from, to find the line of an entry or field."""

    text: str
    suffix: str  # ".toml", ".yaml", ".yml" or ".json"

    def line_of(self, loc: Loc) -> int | None:
        try:
            if self.suffix in (".yaml", ".yml"):
                return _yaml_line(self.text, loc)
            if self.suffix == ".toml":
                return _toml_line(self.text, loc)
        except Exception:  # noqa: BLE001 - a line number is a courtesy, never an error
            return None
        return None


def _yaml_line(text: str, loc: Loc) -> int | None:
    node: Any = yaml.compose(text)
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = [v for k, v in node.value if getattr(k, "value", None) == part]
            if not found:
                break
            node = found[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _toml_line(text: str, loc: Loc) -> int | None:
    """Line of ``[[instruments]]`` number i, then of its key, then of channel j (a
    ``[[instruments.channels]]`` table, or one inline table per line as ``--write-config``
    writes them). tomllib keeps no positions, so this reads the text the way a person
    would; None when it cannot tell."""
    if len(loc) < 2 or not isinstance(loc[1], int) or loc[0] not in _ENTRY_KINDS:
        return None
    kind = str(loc[0])
    lines = text.splitlines()
    header = re.compile(rf"^\s*\[\[\s*{kind}\s*\]\]")
    starts = [n for n, line in enumerate(lines) if header.match(line)]
    if loc[1] >= len(starts):
        return None
    start = starts[loc[1]]
    # The entry ends at the next table header that is not one of its own sub-tables.
    own = re.compile(rf"^\s*\[\[?\s*{kind}\.")
    end = next((n for n in range(start + 1, len(lines))
                if re.match(r"^\s*\[", lines[n]) and not own.match(lines[n])), len(lines))
    if len(loc) < 3 or not isinstance(loc[2], str):
        return start + 1
    sub_tables = [n for n in range(start + 1, end)
                  if re.match(rf"^\s*\[\[\s*{kind}\.{re.escape(loc[2])}\s*\]\]", lines[n])]
    if sub_tables and len(loc) >= 4 and isinstance(loc[3], int) and loc[3] < len(sub_tables):
        # [[instruments.channels]] tables: the key inside the j-th one, else its header.
        first = sub_tables[loc[3]]
        last = next((n for n in range(first + 1, end) if re.match(r"^\s*\[", lines[n])), end)
        if len(loc) >= 5 and isinstance(loc[4], str):
            key = re.compile(rf"^\s*{re.escape(loc[4])}\s*=")
            hit = next((n for n in range(first + 1, last) if key.match(lines[n])), None)
            if hit is not None:
                return hit + 1
        return first + 1
    key = re.compile(rf"^\s*{re.escape(loc[2])}\s*=")
    own_end = next((n for n in range(start + 1, end) if own.match(lines[n])), end)
    hit = next((n for n in range(start + 1, own_end) if key.match(lines[n])), None)
    if hit is None:
        return start + 1
    if loc[2] == "channels" and len(loc) >= 4 and isinstance(loc[3], int):
        rows = [n for n in range(hit + 1, own_end) if lines[n].lstrip().startswith("{")]
        if loc[3] < len(rows):
            return rows[loc[3]] + 1
    return hit + 1


def describe_location(data: Any, loc: Loc, source_text: SourceText | None = None) -> str:
    """``line 7: instrument 'smu1' (instruments[0]), field 'resource'`` from a location."""
    line = source_text.line_of(loc) if source_text is not None else None
    prefix = f"line {line}: " if line else ""
    if len(loc) >= 2 and loc[0] in _ENTRY_KINDS and isinstance(loc[1], int):
        idx = loc[1]
        label = None
        try:
            entry = data[loc[0]][idx]
            key = "name" if loc[0] == "instruments" else "serial"
            label = entry.get(key) if isinstance(entry, Mapping) else None
        except (KeyError, IndexError, TypeError):
            pass
        kind = _ENTRY_KINDS[str(loc[0])]
        who = f"{kind} {label!r} ({loc[0]}[{idx}])" if label else f"{loc[0]}[{idx}]"
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
        return prefix + who + field
    if loc:
        return prefix + "field '" + ".".join(str(p) for p in loc) + "'"
    return prefix + "file"


def _format_errors(data: Any, exc: ValidationError,
                   source_text: SourceText | None) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = list(err.get("loc", ()))
        msg = str(err.get("msg", "invalid"))
        msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
        where = describe_location(data, loc, source_text)
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


def _read_file(path: Path) -> tuple[Any, SourceText | None]:
    text_source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InstrumentConfigError(text_source, [f"cannot read the file ({exc.strerror})"]
                                    ) from None
    suffix = path.suffix.lower()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InstrumentConfigError(text_source, [f"not UTF-8 text: {exc}"]) from None
    if suffix in (".yaml", ".yml"):
        try:
            return yaml.safe_load(text) or {}, SourceText(text, suffix)
        except yaml.YAMLError as exc:
            reason = str(exc).replace("\n", " ")
            raise InstrumentConfigError(text_source, [f"not valid YAML: {reason}"]) from None
    if suffix == ".json":
        try:
            return json.loads(text), None
        except ValueError as exc:
            raise InstrumentConfigError(text_source, [f"not valid JSON: {exc}"]) from None
    try:
        return tomllib.loads(text), SourceText(text, ".toml")
    except tomllib.TOMLDecodeError as exc:
        raise InstrumentConfigError(text_source, [f"not valid TOML: {exc}"]) from None


def parse_instruments_config(data: Any, source: str = "<config>", *,
                             check_drivers: bool = True,
                             source_text: SourceText | None = None) -> InstrumentsConfig:
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
        problems.extend(_format_errors(data, exc, source_text))
    if check_drivers:
        # Driver names and options are checked on the raw entries too, so one run of
        # `check` reports every problem, not the schema's first and the drivers' later.
        problems.extend(describe_location(data, loc, source_text) + ": " + msg
                        for loc, msg in driver_problems(data.get("instruments")))
        if config is not None and not problems:
            problems.extend(describe_location(data, loc, source_text) + ": " + msg
                            for loc, msg in wiring_problems(config))
    if problems or config is None:
        raise InstrumentConfigError(source, problems or ["invalid configuration"])
    return config


@dataclass(frozen=True)
class LoadedConfig:
    """A validated file with what is needed to name places in it."""

    config: InstrumentsConfig
    source: str
    data: Any
    source_text: SourceText | None

    def where(self, loc: Loc) -> str:
        return describe_location(self.data, loc, self.source_text)


def read_instruments_file(path: str | Path, *, check_drivers: bool = True) -> LoadedConfig:
    """Read and validate a TOML (default), YAML (.yaml/.yml) or JSON instruments file,
    keeping its text so later checks (against the database) can name lines too."""
    p = Path(path)
    data, source_text = _read_file(p)
    config = parse_instruments_config(data, str(p), check_drivers=check_drivers,
                                      source_text=source_text)
    return LoadedConfig(config, str(p), data, source_text)


def load_instruments_config(path: str | Path, *, check_drivers: bool = True,
                            ) -> InstrumentsConfig:
    """Read and validate a TOML (default), YAML (.yaml/.yml) or JSON instruments file."""
    return read_instruments_file(path, check_drivers=check_drivers).config


def driver_problems(entries: Any) -> list[tuple[Loc, str]]:
    from labdaq.drivers.opener import available_drivers

    if not isinstance(entries, list):
        return []
    drivers = available_drivers()
    problems: list[tuple[Loc, str]] = []
    for idx, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("driver"), str):
            continue  # the schema reports it
        driver = entry["driver"].strip()
        cls = drivers.get(driver)
        if cls is None:
            problems.append((("instruments", idx, "driver"),
                             f"unknown driver {driver!r}; expected one of {sorted(drivers)}"))
            continue
        options = entry.get("options")
        accepted = _driver_keywords(cls)
        if accepted is None or not isinstance(options, Mapping):
            continue
        for key in options:
            if key != "transport" and key not in accepted:
                problems.append((("instruments", idx, "options", key),
                                 f"driver {driver!r} has no option {key!r}; expected one of "
                                 f"{sorted(accepted) + ['transport']}"))
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


# What each wiring field must name: (role interface name in labdaq.drivers.roles, words).
_WIRING_ROLES = {
    "impedance": ("ImpedanceAnalyser", "an impedance analyser"),
    "chamber": ("Chamber", "a climate chamber"),
    "thermocouple": ("TemperatureLogger", "a temperature logger"),
}


def wiring_problems(config: InstrumentsConfig,
                    others: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
                    ) -> list[tuple[Loc, str]]:
    """Channels wired to instruments that do not exist or cannot play that role.

    ``others`` adds instruments outside ``config`` (name -> (driver, options)), e.g. those
    already in the database when one instrument is configured through the API.
    """
    from labdaq.drivers import roles
    from labdaq.drivers.opener import available_drivers

    drivers = available_drivers()
    known: dict[str, tuple[str, Mapping[str, Any]]] = dict(others or {})
    known.update({i.name: (i.driver, i.options) for i in config.instruments})
    problems: list[tuple[Loc, str]] = []
    for i, inst in enumerate(config.instruments):
        for j, ch in enumerate(inst.channels):
            refs: list[tuple[str, str, Loc]] = []
            if ch.impedance:
                refs.append(("impedance", ch.impedance, ("channels", j, "impedance")))
            if ch.chamber:
                refs.append(("chamber", ch.chamber, ("channels", j, "chamber")))
            if ch.thermocouple is not None:
                refs.append(("thermocouple", ch.thermocouple.logger,
                             ("channels", j, "thermocouple", "logger")))
            for field, target, where in refs:
                loc: Loc = ("instruments", i, *where)
                role_name, words = _WIRING_ROLES[field]
                if target not in known:
                    problems.append((loc, f"no instrument {target!r} to wire as {words}; "
                                          f"expected one of {sorted(known)}"))
                    continue
                driver, options = known[target]
                cls = drivers.get(driver)
                if cls is None:
                    continue  # reported on that instrument's own 'driver' field
                if not issubclass(cls, getattr(roles, role_name)):
                    problems.append((loc, f"instrument {target!r} (driver {driver!r}) is not "
                                          f"{words}"))
                    continue
                if field == "thermocouple" and ch.thermocouple is not None:
                    inputs = _logger_inputs(cls, options)
                    if inputs is not None and ch.thermocouple.channel not in inputs:
                        problems.append((
                            ("instruments", i, "channels", j, "thermocouple", "channel"),
                            f"logger {target!r} scans channels {sorted(inputs)}, not "
                            f"{ch.thermocouple.channel}; add it to that logger's "
                            "options.channels"))
    return problems


def _logger_inputs(cls: type, options: Mapping[str, Any]) -> set[int] | None:
    """The inputs a logger is configured to scan (its ``channels`` option or default)."""
    channels = dict(options or {}).get("channels")
    if channels is None:
        try:
            param = inspect.signature(cls).parameters.get("channels")
        except (TypeError, ValueError):
            return None
        channels = None if param is None else param.default
    if isinstance(channels, list | tuple) and all(isinstance(c, int) for c in channels):
        return set(channels)
    return None
