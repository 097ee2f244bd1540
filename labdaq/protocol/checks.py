"""Parsing and the structural checks that need no cell: every step can end, loops are bounded."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import yaml
from pydantic import ValidationError

from labdaq.bounds import MAX_LOOP_DEPTH, MAX_PROTOCOL_STEPS
from labdaq.protocol.document import (
    SCHEMA_VERSION,
    STEP_TYPES,
    CCCVStep,
    CCStep,
    CVStep,
    EISStep,
    EndConditions,
    LoopStep,
    LoopUntil,
    Protocol,
    PulseStep,
    RestStep,
    Step,
)
from labdaq.protocol.errors import ProtocolError, _join, _Problems


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases (``*name``, and so ``<<: *name`` merges).

    Aliases let a 1.7 KB document expand to 10^5 steps (a "billion laughs"); refusing
    the first alias as it is met stops that before anything is expanded. A protocol
    repeats steps with a ``loop`` instead.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not accepted; repeat steps with a loop", mark
            )
        return super().compose_node(parent, index)


def _check_size(data: dict[str, Any]) -> None:
    """Refuse documents nested too deep or with too many steps before pydantic sees them.

    Walks the raw data with an explicit stack, so a document of 10,000 nested loops costs
    no recursion and no validation time.
    """
    stack: list[tuple[Any, str, int]] = [(data.get("steps"), "steps", 0)]
    total = 0
    while stack:
        steps, path, depth = stack.pop()
        if not isinstance(steps, list):
            continue  # pydantic reports the wrong type
        total += len(steps)
        if total > MAX_PROTOCOL_STEPS:
            raise ProtocolError([{
                "loc": "steps",
                "msg": f"a protocol has at most {MAX_PROTOCOL_STEPS} steps in all "
                "(loop bodies counted once)",
            }])
        for i, step in enumerate(steps):
            if isinstance(step, dict) and step.get("step") == "loop":
                here = f"{path}[{i}]"
                if depth + 1 > MAX_LOOP_DEPTH:
                    raise ProtocolError([{
                        "loc": here,
                        "msg": f"loops nest at most {MAX_LOOP_DEPTH} deep",
                    }])
                stack.append((step.get("body"), f"{here}.body", depth + 1))


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
            data = yaml.load(data, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as exc:
            raise ProtocolError([{"loc": "", "msg": f"not valid YAML/JSON: {exc}"}]) from exc
    if not isinstance(data, dict):
        raise ProtocolError([{"loc": "", "msg": "a protocol must be a mapping of fields"}])
    _check_size(data)
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

