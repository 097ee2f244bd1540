"""What a fault or a scenario of the simulated lab says (:mod:`labdaq.sims.faults` schedules
them): one pydantic model per fault kind, unknown fields rejected, the scenario files under
``seeds/scenarios/``, and ``--fault`` options, each with an error naming the entry and field.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CELL_KINDS = ("internal_short", "external_short", "sensor_dropout", "thermal_runaway")
INSTRUMENT_KINDS = ("drop_connection", "slow_replies", "garbled_replies", "lost_replies",
                    "error_queue", "frozen_readings")


class ScenarioError(ValueError):
    """A scenario file, ``--fault`` option or ``inject()`` call is invalid; the message
    names the source, the entry and the field."""


# ---------------------------------------------------------------------------------------
# Fault specifications (pydantic): one model per kind, unknown fields rejected
# ---------------------------------------------------------------------------------------


class FaultSpec(BaseModel):
    """Common fields of every fault. ``target`` is ``<instrument>[/<channel>]`` or a cell
    serial; ``channel`` is the same channel given separately."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    target: str = Field(min_length=1)
    channel: int | None = Field(default=None, ge=1)
    at_s: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    duration_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    # Whether the fault can be undone (duration_s allowed), and what it acts on.
    clearable: ClassVar[bool] = True
    scope: ClassVar[Literal["cell", "instrument"]] = "cell"

    @model_validator(mode="after")
    def _duration_allowed(self) -> FaultSpec:
        if self.duration_s is not None and not self.clearable:
            raise ValueError(f"duration_s: a {self.kind} fault cannot be undone; remove "
                             "duration_s")
        return self

    @property
    def params(self) -> dict[str, Any]:
        """The kind-specific parameters (everything but the common fields)."""
        common = set(FaultSpec.model_fields)
        return {k: getattr(self, k) for k in type(self).model_fields if k not in common}


class InternalShort(FaultSpec):
    """A resistance across the cell inside its can: drains it and heats it."""

    kind: Literal["internal_short"] = "internal_short"
    resistance_ohm: float = Field(gt=0, allow_inf_nan=False)


class ExternalShort(FaultSpec):
    """A resistance across the cell's terminals outside it (heat stays outside)."""

    kind: Literal["external_short"] = "external_short"
    resistance_ohm: float = Field(gt=0, allow_inf_nan=False)


class SensorDropout(FaultSpec):
    """The cell's temperature sensor (or a logger thermocouple) reads open."""

    kind: Literal["sensor_dropout"] = "sensor_dropout"


class ThermalRunaway(FaultSpec):
    """Start the cell's runaway now whatever its temperature (irreversible)."""

    kind: Literal["thermal_runaway"] = "thermal_runaway"
    clearable: ClassVar[bool] = False


class DropConnection(FaultSpec):
    """Break every client connection; with ``duration_s`` also refuse new ones until it
    clears (instrument off the network). On a pty the line goes deaf for ~0.2 s."""

    kind: Literal["drop_connection"] = "drop_connection"
    scope: ClassVar[Literal["cell", "instrument"]] = "instrument"


class SlowReplies(FaultSpec):
    """Delay every reply by ``delay_s`` *wall* seconds (transport timeouts are wall time)."""

    kind: Literal["slow_replies"] = "slow_replies"
    delay_s: float = Field(gt=0, le=60, allow_inf_nan=False)
    scope: ClassVar[Literal["cell", "instrument"]] = "instrument"


class GarbledReplies(FaultSpec):
    """Corrupt the next ``count`` replies (line noise)."""

    kind: Literal["garbled_replies"] = "garbled_replies"
    count: int = Field(default=1, ge=1)
    clearable: ClassVar[bool] = False
    scope: ClassVar[Literal["cell", "instrument"]] = "instrument"


class LostReplies(FaultSpec):
    """Execute but never answer the next ``count`` queries (the client times out)."""

    kind: Literal["lost_replies"] = "lost_replies"
    count: int = Field(default=1, ge=1)
    clearable: ClassVar[bool] = False
    scope: ClassVar[Literal["cell", "instrument"]] = "instrument"


class ErrorQueue(FaultSpec):
    """Put an entry in the instrument's error queue (``code``, ``text``); an ESR-only
    instrument (Hioki BT4560) gets ``esr_bits`` set instead (16 = execution error)."""

    kind: Literal["error_queue"] = "error_queue"
    code: int = Field(default=-300, ge=-32768, le=32767)
    text: str | None = None
    esr_bits: int = Field(default=16, ge=1, le=255)
    clearable: ClassVar[bool] = False
    scope: ClassVar[Literal["cell", "instrument"]] = "instrument"

    @model_validator(mode="after")
    def _nonzero(self) -> ErrorQueue:
        if self.code == 0:
            raise ValueError("code: 0 means 'No error'; use a negative SCPI or a positive "
                             "device-specific code")
        return self


class FrozenReadings(FaultSpec):
    """The instrument keeps answering the last values it measured while the cells move."""

    kind: Literal["frozen_readings"] = "frozen_readings"
    scope: ClassVar[Literal["cell", "instrument"]] = "instrument"


FAULT_MODELS: dict[str, type[FaultSpec]] = {
    m.model_fields["kind"].default: m
    for m in (InternalShort, ExternalShort, SensorDropout, ThermalRunaway, DropConnection,
              SlowReplies, GarbledReplies, LostReplies, ErrorQueue, FrozenReadings)
}


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_fault(entry: Any, where: str = "fault") -> FaultSpec:
    """Validate one fault entry (a mapping with ``kind``); errors name ``where``, the
    kind, the target and the field."""
    if not isinstance(entry, Mapping):
        raise ScenarioError(f"{where}: expected a mapping like {{kind: internal_short, "
                            f"target: smu1, ...}}, got {type(entry).__name__}")
    kind = entry.get("kind")
    if kind is None:
        raise ScenarioError(f"{where}: kind: missing; one of {', '.join(FAULT_MODELS)}")
    model = FAULT_MODELS.get(str(kind))
    if model is None:
        raise ScenarioError(f"{where}: kind: unknown fault {kind!r}; one of "
                            f"{', '.join(FAULT_MODELS)}")
    label = f"{where} ({kind}" + (f" on {entry['target']})" if entry.get("target") else ")")
    try:
        return model.model_validate(dict(entry))
    except ValidationError as exc:
        raise ScenarioError(f"{label}: {_format_errors(exc)}") from None


# ---------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------


class LabNeeds(BaseModel):
    """The smallest lab a scenario needs; ``labdaq sim --scenario`` raises its counts to
    these (never lowers them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    smus: int = Field(default=0, ge=0)
    cabinets: int = Field(default=0, ge=0)
    cabinet_channels: int = Field(default=0, ge=0, le=64)
    impedance: int = Field(default=0, ge=0)
    loggers: int = Field(default=0, ge=0)
    logger_channels: int = Field(default=0, ge=0, le=20)
    chamber: bool = False

    def apply(self, lab_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """``lab_kwargs`` (SimLab keyword arguments) with every count at least ours."""
        out = dict(lab_kwargs)
        for name in type(self).model_fields:
            need = getattr(self, name)
            if name == "chamber":
                out[name] = bool(out.get(name, False)) or need
            elif need:
                out[name] = max(int(out.get(name, 0)), need)
        return out


class Scenario(BaseModel):
    """A named list of faults (and the lab they need)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    lab: LabNeeds = LabNeeds()
    faults: list[FaultSpec] = Field(min_length=1)
    source: str = ""


def parse_scenario(data: Any, source: str = "scenario") -> Scenario:
    """Validate scenario data (parsed YAML); errors name the source, entry and field."""
    if not isinstance(data, Mapping):
        raise ScenarioError(f"{source}: expected a mapping with name: and faults:, got "
                            f"{type(data).__name__}")
    unknown = sorted(set(data) - {"name", "description", "lab", "faults"})
    if unknown:
        raise ScenarioError(f"{source}: unknown field(s) {', '.join(map(str, unknown))}; "
                            "expected name, description, lab, faults")
    faults = data.get("faults")
    if not isinstance(faults, list) or not faults:
        raise ScenarioError(f"{source}: faults: expected a non-empty list of faults")
    specs = [parse_fault(entry, f"{source}: faults[{i}]") for i, entry in enumerate(faults)]
    try:
        lab = LabNeeds.model_validate(data.get("lab") or {})
    except ValidationError as exc:
        raise ScenarioError(f"{source}: lab: {_format_errors(exc)}") from None
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ScenarioError(f"{source}: name: expected a non-empty string")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ScenarioError(f"{source}: description: expected a string")
    return Scenario(name=name, description=description, lab=lab, faults=specs,
                    source=source)


def _scenarios_dir() -> Path:
    return Path(str(resources.files("labdaq.seeds") / "scenarios"))


def list_scenarios() -> list[str]:
    """Names of the shipped scenarios (file stems in seeds/scenarios)."""
    return sorted(p.stem for p in _scenarios_dir().glob("*.yaml"))


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A shipped scenario by name (``"flaky_link"``) or a YAML file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = _scenarios_dir() / f"{name_or_path}.yaml"
        if isinstance(name_or_path, str) and "/" not in name_or_path and shipped.is_file():
            path = shipped
        else:
            raise ScenarioError(f"unknown scenario {str(name_or_path)!r}: no such file and "
                                f"not a shipped one ({', '.join(list_scenarios())})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path.name}: not valid YAML: {exc}") from None
    return parse_scenario(data, path.name)


def parse_fault_option(text: str) -> FaultSpec:
    """``<kind>:<target>[:key=value,...][@<t_s>]`` (``labdaq sim --fault``) -> FaultSpec.

    Values are read as YAML scalars (``0.5``, ``-300``, ``true``); ``@<t_s>`` is the
    simulated time, omitted = at once.
    """
    where = f"--fault {text!r}"
    head, at, when = text.rpartition("@")
    if not at:
        head, when = text, ""
    parts = head.split(":", 2)
    if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
        raise ScenarioError(f"{where}: expected <kind>:<target>[:key=value,...][@<t_s>], "
                            "e.g. internal_short:smu1:resistance_ohm=0.5@600")
    entry: dict[str, Any] = {"kind": parts[0].strip(), "target": parts[1].strip()}
    if len(parts) == 3 and parts[2].strip():
        for item in parts[2].split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ScenarioError(f"{where}: parameter {item!r} is not key=value")
            try:
                entry[key.strip()] = yaml.safe_load(value.strip()) if value.strip() else ""
            except yaml.YAMLError:
                entry[key.strip()] = value.strip()
    if when.strip():
        try:
            entry["at_s"] = float(when)
        except ValueError:
            raise ScenarioError(f"{where}: time {when!r} after @ is not a number of "
                                "simulated seconds") from None
    return parse_fault(entry, where)
