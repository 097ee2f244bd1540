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
        elif kind == "value_error":
            msg = err["msg"].removeprefix("Value error, ")
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
        if name in _ALLOWED_UNTIL[step.step]:
            continue
        if name == "voltage_v" and isinstance(step, RestStep):
            # A common slip; say why: with no current there is no direction to imply.
            msg = ("a rest has no current to imply a direction; use voltage_above_v or "
                   "voltage_below_v")
        else:
            msg = f"a {step.step} step cannot end on {name}"
        problems.add(_join(until_path, name), msg)
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


# --------------------------------------------------------------------------- limits


class CellLimits(_Strict):
    """What the cell's datasheet allows; supplied when a run starts.

    ``voltage_margin_v`` widens the *safety* window beyond the cut-offs: a step that ends
    at 4.20 V by design must not trip the 4.20 V safety limit on the same sample, so the
    interlock sits a little outside (4.25 V by default). End conditions and setpoints are
    still checked against the cut-offs themselves.
    """

    capacity_ah: float | None = Field(default=None, gt=0)
    charge_cutoff_v: float
    discharge_cutoff_v: float
    max_charge_current_a: float = Field(gt=0)
    max_discharge_current_a: float = Field(gt=0)
    min_temperature_c: float | None = None
    max_temperature_c: float | None = None
    voltage_margin_v: float = Field(default=0.05, ge=0)


class InstrumentLimits(_Strict):
    """What the channel's hardware can do (from its driver or instrument profile)."""

    max_current_a: float = Field(gt=0)
    min_voltage_v: float | None = None
    max_voltage_v: float | None = None


class EffectiveLimits(_Strict):
    """The tightest of cell, instrument, protocol safety block and lab-wide limits.

    These are the safety monitor's trip thresholds (compare with ``>``/``<``, debounced by
    ``breach_duration_s``) and what the instrument's own protection is programmed to.
    ``sources`` says which input set each limit (``cell``/``instrument``/``protocol``/
    ``lab``), so a rejection or a trip can say why.
    """

    min_voltage_v: float
    max_voltage_v: float
    max_charge_current_a: float
    max_discharge_current_a: float
    min_temperature_c: float | None = None
    max_temperature_c: float | None = None
    max_capacity_ah: float | None = None
    breach_duration_s: float = 0.0
    sources: dict[str, str] = Field(default_factory=dict)

    @property
    def max_abs_current_a(self) -> float:
        """Compliance for the instrument: the larger of the two directions."""
        return max(self.max_charge_current_a, self.max_discharge_current_a)


def _tightest(candidates: list[tuple[float | None, str]], lowest: bool,
              ) -> tuple[float | None, str]:
    """Smallest (``lowest``) or largest of the given values; first source wins ties."""
    present = [(v, src) for v, src in candidates if v is not None]
    if not present:
        return None, ""
    best = present[0]
    for v, src in present[1:]:
        if (v < best[0]) if lowest else (v > best[0]):
            best = (v, src)
    return best


def effective_limits(cell: CellLimits, safety: Safety | None = None,
                     instrument: InstrumentLimits | None = None,
                     lab: Safety | None = None) -> EffectiveLimits:
    """Combine every source of limits into the tightest set (no validation of emptiness)."""
    safety = safety or Safety()
    lab_v = lab or Safety()
    inst_max_i = instrument.max_current_a if instrument else None
    inst_min_v = instrument.min_voltage_v if instrument else None
    inst_max_v = instrument.max_voltage_v if instrument else None
    sources: dict[str, str] = {}
    values: dict[str, float | None] = {}

    def pick(field: str, lowest: bool, candidates: list[tuple[float | None, str]]) -> None:
        value, source = _tightest(candidates, lowest)
        values[field] = value
        if value is not None:
            sources[field] = source

    pick("min_voltage_v", False, [
        (cell.discharge_cutoff_v - cell.voltage_margin_v, "cell"),
        (inst_min_v, "instrument"), (safety.min_voltage_v, "protocol"),
        (lab_v.min_voltage_v, "lab")])
    pick("max_voltage_v", True, [
        (cell.charge_cutoff_v + cell.voltage_margin_v, "cell"),
        (inst_max_v, "instrument"), (safety.max_voltage_v, "protocol"),
        (lab_v.max_voltage_v, "lab")])
    for field, cell_value in (("max_charge_current_a", cell.max_charge_current_a),
                              ("max_discharge_current_a", cell.max_discharge_current_a)):
        pick(field, True, [(cell_value, "cell"), (inst_max_i, "instrument"),
                           (safety.max_abs_current_a, "protocol"),
                           (lab_v.max_abs_current_a, "lab")])
    pick("min_temperature_c", False, [
        (cell.min_temperature_c, "cell"), (safety.min_temperature_c, "protocol"),
        (lab_v.min_temperature_c, "lab")])
    pick("max_temperature_c", True, [
        (cell.max_temperature_c, "cell"), (safety.max_temperature_c, "protocol"),
        (lab_v.max_temperature_c, "lab")])
    pick("max_capacity_ah", True, [
        (safety.max_capacity_ah, "protocol"), (lab_v.max_capacity_ah, "lab")])
    # A lab's debounce is a ceiling only if the lab set one: Safety's default of 0 means
    # "not configured" there, and must not silently remove a protocol's debounce.
    lab_breach = (lab.breach_duration_s
                  if lab is not None and "breach_duration_s" in lab.model_fields_set else None)
    pick("breach_duration_s", True, [(safety.breach_duration_s, "protocol"),
                                     (lab_breach, "lab")])

    def from_cell(field: str) -> float:
        # The cell always contributes these, so they are never missing.
        value = values[field]
        assert value is not None
        return value

    return EffectiveLimits(
        min_voltage_v=from_cell("min_voltage_v"),
        max_voltage_v=from_cell("max_voltage_v"),
        max_charge_current_a=from_cell("max_charge_current_a"),
        max_discharge_current_a=from_cell("max_discharge_current_a"),
        min_temperature_c=values["min_temperature_c"],
        max_temperature_c=values["max_temperature_c"],
        max_capacity_ah=values["max_capacity_ah"],
        breach_duration_s=values["breach_duration_s"] or 0.0,
        sources=sources,
    )


# --------------------------------------------------------------------------- resolved


class ResolvedUntil(_Strict):
    """End conditions in SI units with explicit directions; first one met ends the step.

    ``capacity_ah`` is the magnitude of charge moved in the step; ``current_below_a`` and
    ``dvdt_below_v_per_s`` compare magnitudes.
    """

    voltage_above_v: float | None = None
    voltage_below_v: float | None = None
    current_below_a: float | None = None
    duration_s: float | None = None
    capacity_ah: float | None = None
    dvdt_below_v_per_s: float | None = None
    temperature_above_c: float | None = None


class _ResolvedBase(_Strict):
    index: int  # position in ResolvedProtocol.program; what the engine records as step_index
    path: str  # where it came from in the document, e.g. "steps[2].body[0]"
    tag: str | None = None
    label: str | None = None


class ResolvedRest(_ResolvedBase):
    step: Literal["rest"] = "rest"
    until: ResolvedUntil


class ResolvedCC(_ResolvedBase):
    step: Literal["cc"] = "cc"
    current_a: float  # signed: positive = charge
    until: ResolvedUntil


class ResolvedCV(_ResolvedBase):
    step: Literal["cv"] = "cv"
    voltage_v: float
    current_limit_a: float  # magnitude, applies in both directions
    until: ResolvedUntil


class ResolvedCCCV(_ResolvedBase):
    step: Literal["cccv"] = "cccv"
    current_a: float  # signed CC phase current
    voltage_v: float  # CC phase ends / CV phase holds here
    until: ResolvedUntil  # current_below_a is always set (the CV cut-off)


class ResolvedPulse(_ResolvedBase):
    step: Literal["pulse"] = "pulse"
    current_a: float  # signed pulse current
    pulse_duration_s: float
    rest_duration_s: float
    count: int
    until: ResolvedUntil  # optional early end of the whole train; may be empty


class ResolvedEIS(_ResolvedBase):
    step: Literal["eis"] = "eis"
    start_frequency_hz: float
    stop_frequency_hz: float
    points_per_decade: int
    amplitude_v: float | None = None
    amplitude_a: float | None = None


class ResolvedSetTemperature(_ResolvedBase):
    step: Literal["set_temperature"] = "set_temperature"
    temperature_c: float
    tolerance_c: float
    stable_for_s: float
    timeout_s: float


class ResolvedLoopStart(_ResolvedBase):
    """Entering a loop: reset its iteration counter and per-iteration capacity."""

    step: Literal["loop_start"] = "loop_start"
    end_index: int
    max_iterations: int


class ResolvedLoopEnd(_ResolvedBase):
    """End of one loop iteration: jump to ``start_index + 1`` or fall through."""

    step: Literal["loop_end"] = "loop_end"
    start_index: int
    max_iterations: int
    until: LoopUntil | None = None

    def repeat(self, iterations_done: int, discharge_ah: float | None = None,
               first_discharge_ah: float | None = None) -> bool:
        """Whether to run the body again after ``iterations_done`` iterations.

        ``discharge_ah`` is the (positive) Ah discharged in the iteration just finished;
        ``first_discharge_ah`` the same for the loop's first iteration.
        """
        if iterations_done >= self.max_iterations:
            return False
        u = self.until
        if u is None or discharge_ah is None:
            return True
        if u.discharge_capacity_below_ah is not None and \
                discharge_ah < u.discharge_capacity_below_ah:
            return False
        if (u.discharge_capacity_below_pct_of_first is not None and first_discharge_ah
                and discharge_ah < first_discharge_ah
                * u.discharge_capacity_below_pct_of_first / 100.0):
            return False
        return True


ResolvedStep = Annotated[
    ResolvedRest | ResolvedCC | ResolvedCV | ResolvedCCCV | ResolvedPulse | ResolvedEIS
    | ResolvedSetTemperature | ResolvedLoopStart | ResolvedLoopEnd,
    Field(discriminator="step"),
]


class ResolvedProtocol(_Strict):
    """A protocol bound to one cell: what an engine executes and a run stores.

    ``program`` is flat. Run it with a program counter ``pc`` from 0:

    * ``loop_start``: set ``iterations[pc] = 0`` (and clear that loop's capacity
      accumulators), ``pc += 1``.
    * ``loop_end``: ``iterations[start_index] += 1``; if
      ``step.repeat(iterations, discharge_ah, first_discharge_ah)`` jump to
      ``start_index + 1``, else ``pc += 1``.
    * any other step: execute it until its ``until`` (or its own timing) ends it, add the
      Ah it discharged to every open loop's iteration total, ``pc += 1``.

    ``(pc, iteration counters)`` is the whole position, so a restarted engine can resume
    a run from the database. Each completed ``loop_end`` iteration is a natural cycle
    boundary.
    """

    schema_version: int = SCHEMA_VERSION
    name: str
    protocol_hash: str
    cell: CellLimits
    instrument: InstrumentLimits | None = None
    limits: EffectiveLimits
    program: list[ResolvedStep]


# --------------------------------------------------------------------------- resolve


class _Resolver:
    """Walks the document once, building the program and collecting every problem."""

    def __init__(self, cell: CellLimits, limits: EffectiveLimits, problems: _Problems):
        self.cell = cell
        self.limits = limits
        self.problems = problems
        self.program: list[Any] = []

    # -- values

    def amps_from_rate(self, rate_c: float, loc: str) -> float | None:
        if self.cell.capacity_ah is None:
            self.problems.add(loc, "a C-rate needs the cell's capacity, and the cell has no "
                              "capacity_ah; give the current in A or set the capacity")
            return None
        return rate_c * self.cell.capacity_ah

    def signed_current(self, path: str, current_a: float | None, rate_c: float | None,
                       ) -> float | None:
        """Setpoint in A from current_a or rate_c, checked against the current limits."""
        if current_a is not None:
            field, value = "current_a", current_a
        elif rate_c is not None:
            field = "rate_c"
            converted = self.amps_from_rate(rate_c, _join(path, field))
            if converted is None:
                return None
            value = converted
        else:
            return None
        self.check_current(_join(path, field), value)
        return value

    def check_current(self, loc: str, value: float, both_ways: bool = False) -> None:
        lim = self.limits
        checks = []
        if both_ways or value > 0:
            checks.append(("charge", "max_charge_current_a", lim.max_charge_current_a))
        if both_ways or value < 0:
            checks.append(("discharge", "max_discharge_current_a",
                           lim.max_discharge_current_a))
        for direction, field, limit in checks:
            if abs(value) > limit * (1 + 1e-9):
                source = lim.sources.get(field, "")
                self.problems.add(loc, f"{abs(value):.4g} A exceeds the {source} limit for "
                                  f"{direction} current, {limit:.4g} A")

    def volts(self, loc: str, value: float | str) -> float:
        """Resolve a voltage (symbolic or numeric) and check it against cell and safety."""
        cell, lim = self.cell, self.limits
        if value == "charge_cutoff":
            return cell.charge_cutoff_v
        if value == "discharge_cutoff":
            return cell.discharge_cutoff_v
        v = float(value)
        tol = 1e-9
        if not cell.discharge_cutoff_v - tol <= v <= cell.charge_cutoff_v + tol:
            self.problems.add(loc, f"{v:.4g} V is outside the cell's window "
                              f"{cell.discharge_cutoff_v:.4g}–{cell.charge_cutoff_v:.4g} V")
        elif not lim.min_voltage_v - tol <= v <= lim.max_voltage_v + tol:
            self.problems.add(loc, f"{v:.4g} V is outside the safety window "
                              f"{lim.min_voltage_v:.4g}–{lim.max_voltage_v:.4g} V; the "
                              "interlock would trip before the step ends")
        return v

    def until(self, path: str, until: EndConditions, sign: float) -> ResolvedUntil:
        """Explicit, SI end conditions; ``sign`` is the step current's sign (0 = none)."""
        loc = _join(path, "until")
        above: list[float] = []
        below: list[float] = []
        if until.voltage_v is not None:
            v = self.volts(_join(loc, "voltage_v"), until.voltage_v)
            # The step current's sign says which way the voltage moves.
            (above if sign > 0 else below).append(v)
        if until.voltage_above_v is not None:
            above.append(self.volts(_join(loc, "voltage_above_v"), until.voltage_above_v))
        if until.voltage_below_v is not None:
            below.append(self.volts(_join(loc, "voltage_below_v"), until.voltage_below_v))
        currents: list[float] = []
        if until.current_below_a is not None:
            currents.append(until.current_below_a)
        if until.current_below_c is not None:
            amps = self.amps_from_rate(until.current_below_c, _join(loc, "current_below_c"))
            if amps is not None:
                currents.append(amps)
        capacities: list[float] = []
        if until.capacity_ah is not None:
            capacities.append(until.capacity_ah)
        if until.capacity_c is not None:
            ah = self.amps_from_rate(until.capacity_c, _join(loc, "capacity_c"))
            if ah is not None:
                capacities.append(ah)
        lim = self.limits
        if capacities and lim.max_capacity_ah is not None \
                and min(capacities) > lim.max_capacity_ah:
            field = "capacity_ah" if until.capacity_ah is not None else "capacity_c"
            self.problems.add(_join(loc, field), f"{min(capacities):.4g} Ah exceeds the "
                              f"safety max_capacity_ah {lim.max_capacity_ah:.4g} Ah")
        t_above = until.temperature_above_c
        if t_above is not None and lim.max_temperature_c is not None \
                and t_above >= lim.max_temperature_c:
            self.problems.add(_join(loc, "temperature_above_c"),
                              f"{t_above:.4g} °C is not below the safety limit "
                              f"{lim.max_temperature_c:.4g} °C; the interlock would trip first")
        # Several conditions of one kind: the one reached first is the one that matters.
        return ResolvedUntil(
            voltage_above_v=min(above) if above else None,
            voltage_below_v=max(below) if below else None,
            current_below_a=max(currents) if currents else None,
            duration_s=until.duration_s,
            capacity_ah=min(capacities) if capacities else None,
            dvdt_below_v_per_s=until.dvdt_below_v_per_s,
            temperature_above_c=t_above,
        )

    # -- steps

    def emit(self, cls: type[_ResolvedBase], path: str, step: Any, **fields: Any) -> None:
        self.program.append(cls(index=len(self.program), path=path, tag=step.tag,
                                label=step.label, **fields))

    def steps(self, steps: list[Step], prefix: str) -> None:
        for i, step in enumerate(steps):
            self.step(step, f"{prefix}[{i}]")

    def step(self, step: Step, path: str) -> None:
        if isinstance(step, LoopStep):
            self.loop(step, path)
        elif isinstance(step, RestStep):
            self.emit(ResolvedRest, path, step, until=self.until(path, step.until, 0))
        elif isinstance(step, CCStep | CCCVStep | PulseStep):
            current = self.signed_current(path, step.current_a, step.rate_c)
            sign = 0.0 if current is None else (1.0 if current > 0 else -1.0)
            until = self.until(path, step.until, sign)
            if current is None:
                return  # already reported; keep resolving the rest for more problems
            if isinstance(step, CCStep):
                self.emit(ResolvedCC, path, step, current_a=current, until=until)
            elif isinstance(step, CCCVStep):
                voltage = self.volts(_join(path, "voltage_v"), step.voltage_v)
                if until.current_below_a is not None \
                        and until.current_below_a >= abs(current):
                    field = ("current_below_a" if step.until.current_below_a is not None
                             else "current_below_c")
                    self.problems.add(_join(_join(path, "until"), field),
                                      "the CV cut-off must be below the CC current")
                self.emit(ResolvedCCCV, path, step, current_a=current, voltage_v=voltage,
                          until=until)
            else:
                self.emit(ResolvedPulse, path, step, current_a=current,
                          pulse_duration_s=step.pulse_duration_s,
                          rest_duration_s=step.rest_duration_s, count=step.count,
                          until=until)
        elif isinstance(step, CVStep):
            voltage = self.volts(_join(path, "voltage_v"), step.voltage_v)
            if step.current_limit_a is not None:
                limit: float | None = step.current_limit_a
                field = "current_limit_a"
            else:
                field = "rate_c"
                limit = self.amps_from_rate(step.rate_c or 0.0, _join(path, field))
            if limit is not None:
                # A hold may source or sink current, so both directions' limits apply.
                self.check_current(_join(path, field), limit, both_ways=True)
            until = self.until(path, step.until, 0)
            if limit is not None:
                self.emit(ResolvedCV, path, step, voltage_v=voltage, current_limit_a=limit,
                          until=until)
        elif isinstance(step, EISStep):
            if step.amplitude_a is not None:
                self.check_current(_join(path, "amplitude_a"), step.amplitude_a,
                                   both_ways=True)
            self.emit(ResolvedEIS, path, step, start_frequency_hz=step.start_frequency_hz,
                      stop_frequency_hz=step.stop_frequency_hz,
                      points_per_decade=step.points_per_decade,
                      amplitude_v=step.amplitude_v, amplitude_a=step.amplitude_a)
        elif isinstance(step, SetTemperatureStep):
            lim, t = self.limits, step.temperature_c
            if (lim.min_temperature_c is not None and t < lim.min_temperature_c) or (
                    lim.max_temperature_c is not None and t > lim.max_temperature_c):
                self.problems.add(_join(path, "temperature_c"),
                                  f"{t:.4g} °C is outside the temperature window "
                                  f"{lim.min_temperature_c}–{lim.max_temperature_c} °C")
            self.emit(ResolvedSetTemperature, path, step, temperature_c=t,
                      tolerance_c=step.tolerance_c, stable_for_s=step.stable_for_s,
                      timeout_s=step.timeout_s)

    def loop(self, step: LoopStep, path: str) -> None:
        bound = step.count if step.count is not None else step.max_count
        if bound is None:
            # Reported by the structural check; compile the body anyway for its problems.
            bound = 0
        start = len(self.program)
        self.program.append(None)  # placeholder until the end index is known
        self.steps(step.body, _join(path, "body"))
        end = len(self.program)
        self.program[start] = ResolvedLoopStart(index=start, path=path, tag=step.tag,
                                                label=step.label, end_index=end,
                                                max_iterations=bound)
        self.program.append(ResolvedLoopEnd(index=end, path=path, tag=step.tag,
                                            label=step.label, start_index=start,
                                            max_iterations=bound, until=step.until))


def resolve(protocol: Protocol, cell: CellLimits, instrument: InstrumentLimits | None = None,
            lab: Safety | None = None) -> ResolvedProtocol:
    """Bind a protocol to a cell: C-rates to amps, checks against every limit, a flat program.

    Raises :class:`ProtocolError` with every problem found (structural ones included, for
    a :class:`Protocol` built in code rather than through :func:`parse_protocol`).
    """
    problems = _Problems()
    _check_structure(protocol, problems)
    limits = effective_limits(cell, protocol.safety, instrument, lab)
    for low, high, what in (("min_voltage_v", "max_voltage_v", "voltage"),
                            ("min_temperature_c", "max_temperature_c", "temperature")):
        lo, hi = getattr(limits, low), getattr(limits, high)
        if lo is not None and hi is not None and lo >= hi:
            problems.add(f"safety.{high}", f"the combined {what} window is empty: "
                         f"{lo:.4g} ({limits.sources.get(low)}) to {hi:.4g} "
                         f"({limits.sources.get(high)})")
    if cell.discharge_cutoff_v >= cell.charge_cutoff_v:
        problems.add("cell.charge_cutoff_v", "the cell's charge cut-off must be above its "
                     "discharge cut-off")
    resolver = _Resolver(cell, limits, problems)
    resolver.steps(protocol.steps, "steps")
    problems.raise_if_any()
    return ResolvedProtocol(
        name=protocol.name,
        protocol_hash=protocol.content_hash(),
        cell=cell,
        instrument=instrument,
        limits=limits,
        program=resolver.program,
    )


# --------------------------------------------------------------------------- templates


def _templates_dir() -> Any:
    return resources.files("labdaq.seeds") / "protocols"


def list_templates() -> list[str]:
    """Names of the shipped templates (``seeds/protocols/<name>.yaml``), sorted."""
    return sorted(entry.name[: -len(".yaml")] for entry in _templates_dir().iterdir()
                  if entry.name.endswith(".yaml"))


def load_template(name: str) -> Protocol:
    """Parse the shipped template ``name``; ``KeyError`` if there is none."""
    if name not in list_templates():
        raise KeyError(f"unknown protocol template {name!r}; "
                       f"available: {', '.join(list_templates())}")
    return parse_protocol((_templates_dir() / f"{name}.yaml").read_text(encoding="utf-8"))


def cycle_protocol(*, charge_current_a: float | None = None, charge_rate_c: float | None = None,
                   discharge_current_a: float | None = None,
                   discharge_rate_c: float | None = None,
                   charge_voltage_v: float | str = "charge_cutoff",
                   discharge_voltage_v: float | str = "discharge_cutoff",
                   rest_s: float = 600.0, cycles: int = 1,
                   name: str = "basic_cycle") -> Protocol:
    """The simple cycle: CC charge to ``charge_voltage_v``, rest, CC discharge to
    ``discharge_voltage_v``, rest — ``cycles`` times.

    Currents are magnitudes (the discharge is negated here); with neither current nor
    rate given for a direction, C/2 is used. Voltages default to the cell's cut-offs.
    ``basic_cycle.yaml`` is this with ``cycles=3``.
    """
    def current(amps: float | None, rate: float | None, sign: float) -> dict[str, float]:
        if amps is not None and rate is not None:
            raise ValueError("give a current in A or a C-rate, not both")
        if amps is not None:
            return {"current_a": sign * abs(amps)}
        return {"rate_c": sign * abs(rate if rate is not None else 0.5)}

    charge = current(charge_current_a, charge_rate_c, 1.0)
    discharge = current(discharge_current_a, discharge_rate_c, -1.0)
    return parse_protocol({
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "description": "CC charge to the upper voltage, rest, CC discharge to the lower "
                       "voltage, rest; repeated for the given number of cycles.",
        "steps": [{
            "step": "loop", "count": cycles, "tag": "cycle",
            "body": [
                {"step": "cc", **charge, "until": {"voltage_v": charge_voltage_v},
                 "tag": "charge"},
                {"step": "rest", "until": {"duration_s": rest_s}},
                {"step": "cc", **discharge, "until": {"voltage_v": discharge_voltage_v},
                 "tag": "discharge"},
                {"step": "rest", "until": {"duration_s": rest_s}},
            ],
        }],
    })
