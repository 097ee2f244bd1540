"""The test-protocol language: a battery test is data.

A protocol is a versioned YAML/JSON document (``schema_version: 1``) of steps — ``rest``,
``cc``, ``cv``, ``cccv``, ``pulse``, ``eis``, ``set_temperature`` and ``loop`` — each with
OR-combined end conditions (``until``), plus a protocol-wide ``safety`` block. Field names
carry their unit (``current_a``, ``rate_c``, ``duration_s``); current is positive when
charging. The shape follows aurora-unicycler (pydantic, ``extra="forbid"``, a discriminated
union on ``step``, C-rates resolved from the cell's capacity when the run starts).

Three stages, each with its own errors, all reported as :class:`ProtocolError` whose
``errors`` list names the step by its index path (``steps[2].body[0].current_a``):

1. :func:`parse_protocol` — schema (types, unknown fields, unknown step types) and the
   checks that need no cell: every step can end, every loop is bounded.
2. :func:`resolve` — against a cell (and optionally an instrument and lab-wide limits):
   C-rates become amps, symbolic voltages (``charge_cutoff``) become volts, currents and
   voltages are checked against the tightest limits, and loops are compiled into a flat
   program an engine runs with a program counter (see :class:`ResolvedProtocol`).
3. The engine executes ``ResolvedProtocol.program``; this module has no I/O besides
   reading templates.

Templates live in ``seeds/protocols/*.yaml`` (package ``labdaq.seeds``) and are read with
:func:`load_template` / :func:`list_templates`; :func:`cycle_protocol` builds the simple
charge/rest/discharge/rest cycle used by the first end-to-end path.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from importlib import resources
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
)

__all__ = [
    "SCHEMA_VERSION",
    "VOLTAGE_REFS",
    "ProtocolError",
    "EndConditions",
    "LoopUntil",
    "Safety",
    "RestStep",
    "CCStep",
    "CVStep",
    "CCCVStep",
    "PulseStep",
    "EISStep",
    "SetTemperatureStep",
    "LoopStep",
    "Step",
    "Protocol",
    "CellLimits",
    "InstrumentLimits",
    "EffectiveLimits",
    "ResolvedUntil",
    "ResolvedRest",
    "ResolvedCC",
    "ResolvedCV",
    "ResolvedCCCV",
    "ResolvedPulse",
    "ResolvedEIS",
    "ResolvedSetTemperature",
    "ResolvedLoopStart",
    "ResolvedLoopEnd",
    "ResolvedStep",
    "ResolvedProtocol",
    "parse_protocol",
    "check_protocol",
    "resolve",
    "effective_limits",
    "load_template",
    "list_templates",
    "cycle_protocol",
]

SCHEMA_VERSION = 1

# Symbolic voltages let one template serve every chemistry: an LFP cell charges to 3.65 V,
# an NMC cell to 4.2 V, and the same "charge to the cell's cut-off" document fits both.
VOLTAGE_REFS: tuple[str, ...] = ("charge_cutoff", "discharge_cutoff")

STEP_TYPES: tuple[str, ...] = (
    "rest", "cc", "cv", "cccv", "pulse", "eis", "set_temperature", "loop",
)


# --------------------------------------------------------------------------- errors


class ProtocolError(ValueError):
    """A protocol that cannot be accepted; ``errors`` lists every problem found.

    Each problem is ``{"loc": "steps[1].current_a", "msg": "..."}`` — the API returns the
    list as-is with status 422, so a technician sees every mistake at once, not one per
    attempt.
    """

    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors
        lines = "; ".join(f"{e['loc'] or '<document>'}: {e['msg']}" for e in errors)
        super().__init__(f"{len(errors)} problem(s) in protocol: {lines}")


class _Problems:
    """Collects problems so one pass reports all of them instead of stopping at the first."""

    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []

    def add(self, loc: str, msg: str) -> None:
        self.items.append({"loc": loc, "msg": msg})

    def raise_if_any(self) -> None:
        if self.items:
            raise ProtocolError(self.items)


def _join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


# --------------------------------------------------------------------------- document


def _voltage_value(value: object) -> float | str:
    """Accept a number of volts or one of :data:`VOLTAGE_REFS`.

    A plain validator rather than ``float | Literal[...]`` so that a bad value gives one
    error at the field, not one per union member at ``...voltage_v.float``.
    """
    if isinstance(value, str):
        if value in VOLTAGE_REFS:
            return value
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"expected a voltage in V or one of {', '.join(VOLTAGE_REFS)}")


VoltageV = Annotated[
    float | str,
    PlainValidator(
        _voltage_value,
        json_schema_input_type=float | Literal["charge_cutoff", "discharge_cutoff"],
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EndConditions(_Strict):
    """When a step ends: any combination, the first condition met wins (OR).

    ``voltage_v`` takes its direction from the step's current: above it when charging,
    below it when discharging. Use ``voltage_above_v``/``voltage_below_v`` where the
    direction is not implied (a rest, a CV hold).
    """

    voltage_v: VoltageV | None = None
    voltage_above_v: VoltageV | None = None
    voltage_below_v: VoltageV | None = None
    current_below_a: float | None = Field(default=None, gt=0)
    current_below_c: float | None = Field(default=None, gt=0)
    duration_s: float | None = Field(default=None, gt=0)
    capacity_ah: float | None = Field(default=None, gt=0)
    capacity_c: float | None = Field(default=None, gt=0)
    dvdt_below_v_per_s: float | None = Field(default=None, gt=0)
    temperature_above_c: float | None = None

    def set_fields(self) -> list[str]:
        """Names of the conditions that are set, in declaration order."""
        return [name for name in type(self).model_fields if getattr(self, name) is not None]


class LoopUntil(_Strict):
    """Data-dependent end of a loop, checked after each iteration (OR-combined).

    Discharge capacity is the Ah discharged during that iteration (all discharging steps
    of the body, nested loops included); "first" is the loop's first iteration.
    """

    discharge_capacity_below_pct_of_first: float | None = Field(default=None, gt=0, le=100)
    discharge_capacity_below_ah: float | None = Field(default=None, gt=0)


class Safety(_Strict):
    """Protocol-wide limits; also the shape of the lab-wide limits in configuration.

    ``breach_duration_s`` debounces: a limit must be exceeded for this long before the
    output goes off (0 = the first sample beyond the limit trips).
    ``max_capacity_ah`` bounds the charge moved within any single step.
    """

    min_voltage_v: float | None = None
    max_voltage_v: float | None = None
    max_abs_current_a: float | None = Field(default=None, gt=0)
    min_temperature_c: float | None = None
    max_temperature_c: float | None = None
    max_capacity_ah: float | None = Field(default=None, gt=0)
    breach_duration_s: float = Field(default=0.0, ge=0)


class _StepBase(_Strict):
    # tag is for machines (analysis picks "capacity_check" steps); label is for people.
    tag: str | None = None
    label: str | None = None


class RestStep(_StepBase):
    """Open circuit until an end condition (normally ``duration_s``)."""

    step: Literal["rest"]
    until: EndConditions = Field(default_factory=EndConditions)


class CCStep(_StepBase):
    """Constant current; exactly one of ``current_a`` / ``rate_c``; positive = charge."""

    step: Literal["cc"]
    current_a: float | None = None
    rate_c: float | None = None
    until: EndConditions = Field(default_factory=EndConditions)


class CVStep(_StepBase):
    """Hold ``voltage_v`` with a current limit (``current_limit_a`` or ``rate_c``)."""

    step: Literal["cv"]
    voltage_v: VoltageV
    current_limit_a: float | None = Field(default=None, gt=0)
    rate_c: float | None = Field(default=None, gt=0)
    until: EndConditions = Field(default_factory=EndConditions)


class CCCVStep(_StepBase):
    """CC at ``current_a``/``rate_c`` up (or down) to ``voltage_v``, then CV there until
    the current falls below ``until.current_below_a``/``current_below_c``."""

    step: Literal["cccv"]
    current_a: float | None = None
    rate_c: float | None = None
    voltage_v: VoltageV
    until: EndConditions = Field(default_factory=EndConditions)


class PulseStep(_StepBase):
    """Pulse train for DC internal resistance (HPPC style): ``count`` × (pulse, rest).

    ``until`` is optional and ends the whole train early (e.g. a voltage guard).
    """

    step: Literal["pulse"]
    current_a: float | None = None
    rate_c: float | None = None
    pulse_duration_s: float = Field(gt=0)
    rest_duration_s: float = Field(ge=0)
    count: int = Field(default=1, ge=1)
    until: EndConditions = Field(default_factory=EndConditions)


class EISStep(_StepBase):
    """Impedance sweep at the present state: potentiostatic (``amplitude_v``) or
    galvanostatic (``amplitude_a``), exactly one."""

    step: Literal["eis"]
    start_frequency_hz: float = Field(gt=0)
    stop_frequency_hz: float = Field(gt=0)
    points_per_decade: int = Field(default=10, ge=1)
    amplitude_v: float | None = Field(default=None, gt=0)
    amplitude_a: float | None = Field(default=None, gt=0)


class SetTemperatureStep(_StepBase):
    """Set the chamber/ambient and wait until it is within ``tolerance_c`` for
    ``stable_for_s``; ``timeout_s`` bounds the wait (the engine pauses the run if hit)."""

    step: Literal["set_temperature"]
    temperature_c: float
    tolerance_c: float = Field(default=1.0, gt=0)
    stable_for_s: float = Field(default=300.0, ge=0)
    timeout_s: float = Field(default=4 * 3600.0, gt=0)


class LoopStep(_StepBase):
    """Repeat ``body``: ``count`` times, or until ``until`` holds (bounded by ``max_count``)."""

    step: Literal["loop"]
    count: int | None = Field(default=None, ge=1)
    until: LoopUntil | None = None
    max_count: int | None = Field(default=None, ge=1)
    body: list[Step] = Field(min_length=1)


Step = Annotated[
    RestStep | CCStep | CVStep | CCCVStep | PulseStep | EISStep | SetTemperatureStep | LoopStep,
    Field(discriminator="step"),
]


class Protocol(_Strict):
    """A test protocol document (``schema_version`` 1)."""

    schema_version: Literal[1]
    name: str = Field(min_length=1)
    description: str = ""
    safety: Safety = Field(default_factory=Safety)
    steps: list[Step] = Field(min_length=1)

    def canonical_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, fields left at their default omitted.

        Omitting defaults means writing ``tolerance_c: 1.0`` or leaving it out gives the
        same hash, and adding a defaulted field later does not change stored hashes (a
        changed default must bump ``schema_version`` instead).
        """
        data = self.model_dump(mode="json", exclude_defaults=True)
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def content_hash(self) -> str:
        """``sha256:<hex>`` of :meth:`canonical_json`; a run records it."""
        return "sha256:" + hashlib.sha256(self.canonical_json().encode()).hexdigest()


LoopStep.model_rebuild()
Protocol.model_rebuild()


# --------------------------------------------------------------------------- parsing


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    """Turn a pydantic ``loc`` into ``steps[2].body[0].current_a``.

    Pydantic puts the discriminator tag after a list index (``steps, 2, 'cc', ...``); it
    is dropped because the index already names the step.
    """
    out = ""
    after_step_index = False
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            after_step_index = i > 0 and loc[i - 1] in ("steps", "body")
            continue
        if after_step_index and part in STEP_TYPES:
            after_step_index = False
            continue
        after_step_index = False
        out = _join(out, str(part))
    return out


def _pydantic_problems(exc: ValidationError) -> list[dict[str, str]]:
    problems: list[dict[str, str]] = []
    for err in exc.errors():
        loc = _loc_to_path(tuple(err["loc"]))
        kind = err["type"]
        if kind == "union_tag_invalid":
            ctx = err.get("ctx", {})
            msg = f"unknown step type {ctx.get('tag')!r}; expected one of {', '.join(STEP_TYPES)}"
            loc = _join(loc, "step")
        elif kind == "union_tag_not_found":
            msg = f"missing 'step' (the step type: {', '.join(STEP_TYPES)})"
            loc = _join(loc, "step")
        elif kind == "extra_forbidden":
            msg = "unknown field (check the spelling and the unit suffix)"
        elif kind == "missing":
            msg = "field required"
        else:
            msg = err["msg"]
        problems.append({"loc": loc, "msg": msg})
    return problems


def parse_protocol(data: dict[str, Any] | str | bytes) -> Protocol:
    """Validate a protocol given as a mapping or as YAML/JSON text.

    Raises :class:`ProtocolError` listing every schema problem, or — when the schema is
    fine — every structural problem (:func:`check_protocol`).
    """
    if isinstance(data, bytes | str):
        try:
            # YAML 1.2 is a superset of JSON, so one loader reads both.
            data = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise ProtocolError([{"loc": "", "msg": f"not valid YAML/JSON: {exc}"}]) from exc
    if not isinstance(data, dict):
        raise ProtocolError([{"loc": "", "msg": "a protocol must be a mapping of fields"}])
    if data.get("schema_version") not in (None, SCHEMA_VERSION):
        # Checked first so a document from a newer labdaq is not reported as 40 field errors.
        raise ProtocolError([{
            "loc": "schema_version",
            "msg": f"unsupported schema_version {data.get('schema_version')!r}; "
            f"this labdaq reads {SCHEMA_VERSION}",
        }])
    try:
        protocol = Protocol.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(_pydantic_problems(exc)) from exc
    problems = _Problems()
    _check_structure(protocol, problems)
    problems.raise_if_any()
    return protocol


# Which end conditions make sense for each step type. A rest cannot end on current (there
# is none), a CC step cannot end on "current below" (it is constant), a CV hold cannot end
# on voltage (it is held). Rejecting these catches typos that would make a step endless.
_ALL_UNTIL = frozenset(EndConditions.model_fields)
_VOLTAGE_UNTIL = frozenset({"voltage_v", "voltage_above_v", "voltage_below_v"})
_ALLOWED_UNTIL: dict[str, frozenset[str]] = {
    "rest": frozenset({"duration_s", "voltage_above_v", "voltage_below_v",
                       "dvdt_below_v_per_s", "temperature_above_c"}),
    "cc": _ALL_UNTIL - {"current_below_a", "current_below_c"},
    "cv": _ALL_UNTIL - _VOLTAGE_UNTIL,
    "cccv": _ALL_UNTIL - _VOLTAGE_UNTIL - {"dvdt_below_v_per_s"},
    "pulse": frozenset({"duration_s", "voltage_v", "voltage_above_v", "voltage_below_v",
                        "temperature_above_c", "capacity_ah", "capacity_c"}),
}


def _iter_steps(steps: Iterable[Step], path: str = "steps") -> Iterator[tuple[str, Step]]:
    """Depth-first (path, step) pairs, loop bodies included."""
    for i, step in enumerate(steps):
        here = f"{path}[{i}]"
        yield here, step
        if isinstance(step, LoopStep):
            yield from _iter_steps(step.body, f"{here}.body")


def _check_structure(protocol: Protocol, problems: _Problems) -> None:
    """Checks that need no cell: currents given once, every step can end, loops bounded."""
    for path, step in _iter_steps(protocol.steps):
        if isinstance(step, CCStep | CCCVStep | PulseStep):
            _check_one_current(step.current_a, step.rate_c, path, problems)
        if isinstance(step, CVStep):
            if (step.current_limit_a is None) == (step.rate_c is None):
                problems.add(_join(path, "current_limit_a"),
                             "give exactly one of current_limit_a or rate_c")
        if isinstance(step, EISStep):
            if (step.amplitude_v is None) == (step.amplitude_a is None):
                problems.add(_join(path, "amplitude_v"),
                             "give exactly one of amplitude_v (potentiostatic) or "
                             "amplitude_a (galvanostatic)")
            if step.start_frequency_hz == step.stop_frequency_hz:
                problems.add(_join(path, "stop_frequency_hz"),
                             "start and stop frequency are equal")
        if isinstance(step, LoopStep):
            _check_loop(step, path, problems)
        if isinstance(step, RestStep | CCStep | CVStep | CCCVStep | PulseStep):
            _check_until(step, path, problems)


def _check_one_current(current_a: float | None, rate_c: float | None, path: str,
                       problems: _Problems) -> None:
    if (current_a is None) == (rate_c is None):
        problems.add(_join(path, "current_a"), "give exactly one of current_a or rate_c")
    elif (current_a or rate_c) == 0:
        field = "current_a" if current_a is not None else "rate_c"
        problems.add(_join(path, field), "current must not be zero (use a rest step)")


def _check_until(step: RestStep | CCStep | CVStep | CCCVStep | PulseStep, path: str,
                 problems: _Problems) -> None:
    until_path = _join(path, "until")
    present = step.until.set_fields()
    for name in present:
        if name not in _ALLOWED_UNTIL[step.step]:
            problems.add(_join(until_path, name),
                         f"a {step.step} step cannot end on {name}")
    if isinstance(step, RestStep) and step.until.voltage_v is not None:
        # Already reported as not allowed; say why, since this one is a common slip.
        problems.items[-len([n for n in present if n not in _ALLOWED_UNTIL["rest"]]):]  # noqa: B018
    if isinstance(step, PulseStep):
        return  # the pulse train's own timing ends it; until is an optional early stop
    if isinstance(step, CVStep):
        if not {"current_below_a", "current_below_c", "duration_s"} & set(present):
            problems.add(until_path, "a cv step needs a current cut-off "
                         "(current_below_a/current_below_c) or duration_s")
        return
    if isinstance(step, CCCVStep):
        if not {"current_below_a", "current_below_c"} & set(present):
            problems.add(until_path, "a cccv step needs a CV current cut-off "
                         "(current_below_a or current_below_c)")
        return
    if not present:
        problems.add(until_path, f"a {step.step} step needs at least one end condition")


def _check_loop(step: LoopStep, path: str, problems: _Problems) -> None:
    if step.until is not None and not any(
        getattr(step.until, n) is not None for n in LoopUntil.model_fields
    ):
        problems.add(_join(path, "until"), "loop until needs at least one condition")
    if step.count is None and step.until is None:
        problems.add(_join(path, "count"), "a loop needs count, or until together with "
                     "max_count, so it always ends")
    elif step.count is None and step.max_count is None:
        problems.add(_join(path, "max_count"), "a loop with until needs max_count, in case "
                     "the condition is never met")


def check_protocol(protocol: Protocol) -> list[dict[str, str]]:
    """Structural problems of an already-built :class:`Protocol` (empty list = fine)."""
    problems = _Problems()
    _check_structure(protocol, problems)
    return problems.items
