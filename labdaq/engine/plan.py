"""Executable plan: the flat list of steps and limits a channel worker runs.

The API resolves a protocol (C-rates, cell and instrument limits) into this form and
stores it on the run, so the engine executes exactly what was validated and recorded.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StepEnd(BaseModel):
    """End conditions; the first one met ends the step."""

    model_config = ConfigDict(extra="forbid")

    voltage_above_v: float | None = None
    voltage_below_v: float | None = None
    current_below_a: float | None = Field(default=None, description="magnitude")
    duration_s: float | None = None
    capacity_ah: float | None = Field(default=None, description="magnitude within the step")

    def is_bounded(self) -> bool:
        return any(v is not None for v in self.model_dump().values())


class PlanStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["rest", "cc", "cccv", "cv"]
    cycle_index: int = 1
    current_a: float = 0.0  # positive = charge
    voltage_v: float | None = None  # CV target (cccv/cv) or compliance for cc
    current_limit_a: float | None = None  # cv only
    end: StepEnd
    label: str = ""


class Limits(BaseModel):
    """Safety window checked on every sample; the tightest of cell, protocol and lab."""

    model_config = ConfigDict(extra="forbid")

    voltage_min_v: float
    voltage_max_v: float
    current_max_a: float
    temperature_min_c: float = -20.0
    temperature_max_c: float = 60.0
    breach_duration_s: float = 0.0


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: list[PlanStep]
    limits: Limits
    sample_period_s: float = Field(gt=0)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
