"""The protocol document: the pydantic models of a ``schema_version: 1`` test protocol.

Field names carry their unit; current is positive when charging. The shape follows
aurora-unicycler (``extra="forbid"``, a discriminated union on ``step``).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator

from labdaq.bounds import (
    MAX_ABS_VOLTAGE_V,
    MAX_PROTOCOL_STEPS,
    AmpHours,
    Amps,
    Celsius,
    CRate,
    Hertz,
    LoopCount,
    Name,
    NonNegativeSeconds,
    Percent,
    PositiveAmps,
    PositiveCRate,
    PositiveKelvinSpan,
    PositiveVolts,
    Seconds,
    Text,
    Volts,
    VoltsPerSecond,
    WholeNumber,
)

SCHEMA_VERSION = 1

# Symbolic voltages let one template serve every chemistry: an LFP cell charges to 3.65 V,
# an NMC cell to 4.2 V, and the same "charge to the cell's cut-off" document fits both.
VOLTAGE_REFS: tuple[str, ...] = ("charge_cutoff", "discharge_cutoff")

STEP_TYPES: tuple[str, ...] = (
    "rest", "cc", "cv", "cccv", "pulse", "eis", "set_temperature", "loop",
)



def _voltage_value(value: object) -> float | str:
    """Accept a number of volts or one of :data:`VOLTAGE_REFS`.

    A plain validator rather than ``float | Literal[...]`` so that a bad value gives one
    error at the field, not one per union member at ``...voltage_v.float``.
    """
    if isinstance(value, str) and value in VOLTAGE_REFS:
        return value
    # Booleans are ints to Python but not voltages; Infinity/NaN and absurd values are
    # refused here because this validator replaces pydantic's own float checks.
    if isinstance(value, int | float) and not isinstance(value, bool):
        v = float(value)
        if math.isfinite(v) and abs(v) <= MAX_ABS_VOLTAGE_V:
            return v
        raise ValueError(f"a voltage must be finite and within ±{MAX_ABS_VOLTAGE_V:g} V")
    raise ValueError(f"expected a voltage in V or one of {', '.join(VOLTAGE_REFS)}")


VoltageV = Annotated[
    float | str,
    PlainValidator(
        _voltage_value,
        json_schema_input_type=Volts | Literal["charge_cutoff", "discharge_cutoff"],
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
    current_below_a: PositiveAmps | None = None
    current_below_c: PositiveCRate | None = None
    duration_s: Seconds | None = None
    capacity_ah: AmpHours | None = None
    capacity_c: PositiveCRate | None = None
    dvdt_below_v_per_s: VoltsPerSecond | None = None
    temperature_above_c: Celsius | None = None

    def set_fields(self) -> list[str]:
        """Names of the conditions that are set, in declaration order."""
        return [name for name in type(self).model_fields if getattr(self, name) is not None]


class LoopUntil(_Strict):
    """Data-dependent end of a loop, checked after each iteration (OR-combined).

    Discharge capacity is the Ah discharged during that iteration (all discharging steps
    of the body, nested loops included); "first" is the loop's first iteration.
    """

    discharge_capacity_below_pct_of_first: Percent | None = None
    discharge_capacity_below_ah: AmpHours | None = None


class Safety(_Strict):
    """Protocol-wide limits; also the shape of the lab-wide limits in configuration.

    ``breach_duration_s`` debounces: a limit must be exceeded for this long before the
    output goes off (0 = the first sample beyond the limit trips).
    ``max_capacity_ah`` bounds the charge moved within any single step.
    """

    min_voltage_v: Volts | None = None
    max_voltage_v: Volts | None = None
    max_abs_current_a: PositiveAmps | None = None
    min_temperature_c: Celsius | None = None
    max_temperature_c: Celsius | None = None
    max_capacity_ah: AmpHours | None = None
    breach_duration_s: NonNegativeSeconds = 0.0


class _StepBase(_Strict):
    # tag is for machines (analysis picks "capacity_check" steps); label is for people.
    tag: Name | None = None
    label: Text | None = None


class RestStep(_StepBase):
    """Open circuit until an end condition (normally ``duration_s``)."""

    step: Literal["rest"]
    until: EndConditions = Field(default_factory=EndConditions)


class CCStep(_StepBase):
    """Constant current; exactly one of ``current_a`` / ``rate_c``; positive = charge."""

    step: Literal["cc"]
    current_a: Amps | None = None
    rate_c: CRate | None = None
    until: EndConditions = Field(default_factory=EndConditions)


class CVStep(_StepBase):
    """Hold ``voltage_v`` with a current limit (``current_limit_a`` or ``rate_c``)."""

    step: Literal["cv"]
    voltage_v: VoltageV
    current_limit_a: PositiveAmps | None = None
    rate_c: PositiveCRate | None = None
    until: EndConditions = Field(default_factory=EndConditions)


class CCCVStep(_StepBase):
    """CC at ``current_a``/``rate_c`` up (or down) to ``voltage_v``, then CV there until
    the current falls below ``until.current_below_a``/``current_below_c``."""

    step: Literal["cccv"]
    current_a: Amps | None = None
    rate_c: CRate | None = None
    voltage_v: VoltageV
    until: EndConditions = Field(default_factory=EndConditions)


class PulseStep(_StepBase):
    """Pulse train for DC internal resistance (HPPC style): ``count`` × (pulse, rest).

    ``until`` is optional and ends the whole train early (e.g. a voltage guard).
    """

    step: Literal["pulse"]
    current_a: Amps | None = None
    rate_c: CRate | None = None
    pulse_duration_s: Seconds
    rest_duration_s: NonNegativeSeconds
    count: LoopCount = 1
    until: EndConditions = Field(default_factory=EndConditions)


class EISStep(_StepBase):
    """Impedance sweep at the present state: potentiostatic (``amplitude_v``) or
    galvanostatic (``amplitude_a``), exactly one."""

    step: Literal["eis"]
    start_frequency_hz: Hertz
    stop_frequency_hz: Hertz
    points_per_decade: WholeNumber = Field(default=10, ge=1, le=1000)
    amplitude_v: PositiveVolts | None = None
    amplitude_a: PositiveAmps | None = None


class SetTemperatureStep(_StepBase):
    """Set the chamber/ambient and wait until it is within ``tolerance_c`` for
    ``stable_for_s``; ``timeout_s`` bounds the wait (the engine pauses the run if hit)."""

    step: Literal["set_temperature"]
    temperature_c: Celsius
    tolerance_c: PositiveKelvinSpan = 1.0
    stable_for_s: NonNegativeSeconds = 300.0
    timeout_s: Seconds = 4 * 3600.0


class LoopStep(_StepBase):
    """Repeat ``body``: ``count`` times, or until ``until`` holds (bounded by ``max_count``)."""

    step: Literal["loop"]
    count: LoopCount | None = None
    until: LoopUntil | None = None
    max_count: LoopCount | None = None
    body: list[Step] = Field(min_length=1, max_length=MAX_PROTOCOL_STEPS)


Step = Annotated[
    RestStep | CCStep | CVStep | CCCVStep | PulseStep | EISStep | SetTemperatureStep | LoopStep,
    Field(discriminator="step"),
]


class Protocol(_Strict):
    """A test protocol document (``schema_version`` 1)."""

    schema_version: Literal[1]
    name: Name
    description: Text = ""
    safety: Safety = Field(default_factory=Safety)
    # An abuse test (UN 38.3 T7 overcharge, T8 forced discharge; IEC 62133-2 overcharge)
    # goes beyond the cell's ratings on purpose: resolved without the cell's limits (never
    # without the channel's), started only by an engineer or admin giving a reason.
    abuse: bool = Field(default=False, strict=True)
    steps: list[Step] = Field(min_length=1, max_length=MAX_PROTOCOL_STEPS)

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

