"""Pydantic schemas of the evaluation, observation and report routes (kept apart from the
ORM models and from labdaq.benchmarks' dataclasses, which they mirror)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    computed_field,
    model_validator,
)

from labdaq.api.schemas import UtcDatetime

Verdict = Literal["pass", "fail", "provisional", "not_evaluable", "reported"]


class EvaluationRequest(BaseModel):
    """What a stored evaluation is computed with."""

    model_config = ConfigDict(extra="forbid")

    rule: Literal["simple", "guarded"] = Field(
        "simple", description="decision rule (ILAC-G8): simple or guarded acceptance")
    spec_cycles: int | None = Field(
        None, ge=1, le=1_000_000, description="datasheet cycle count to judge retention at")
    entries: list[str] | None = Field(
        None, max_length=200,
        description="catalogue entry ids to judge; default: those the run's protocol serves")
    ocv_before_run: int | None = Field(
        None, ge=1, description="UN 38.3 T.1-T.4: the OCV check run made before the stress")
    # The channel's expanded (k = 2) accuracy: all three or none. Without it no
    # uncertainty is known and the guarded rule judges as simple acceptance.
    voltage_accuracy_rel: float | None = Field(None, gt=0, le=0.5)
    current_accuracy_rel: float | None = Field(None, gt=0, le=0.5)
    temperature_accuracy_c: float | None = Field(None, gt=0, le=50)


class CriterionOut(BaseModel):
    metric: str
    comparison: str
    limit: float | bool | None
    unit: str
    kind: str
    confidence: str
    verdict: Verdict
    outcome: Literal["pass", "fail"] | None = None
    value: bool | float | dict[str, float | None] | None = None
    uncertainty: float | None = None
    decision_rule: str | None = None
    reason: str | None = None
    evidence: dict[str, Any] = Field(default_factory=dict)


class EntryOut(BaseModel):
    entry_id: str
    title: str
    standard: str
    clause: str
    designations: list[str]
    jurisdictions: list[str]
    verdict: Verdict
    criteria: list[CriterionOut]
    calibration: str
    run_id: int | None


class EvaluationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    run_id: int
    rule: str | None = Field(description="rule asked for; null for a stored evaluation "
                                         "(each criterion names its decision rule)")
    stored: bool
    data_sha256: str
    catalogue_sha256: str
    software_version: str | None
    entries: list[EntryOut]
    template: str | None = Field(
        None, description="the protocol (template) name the catalogue entries were picked "
                          "by; null: an imported run without a declared template")
    note: str | None = Field(
        None, description="for an imported run: which entries apply and why, or that "
                          "none does until a template is declared")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def report_url(self) -> str:
        """Where the run's test report is served (HTML; add ``?format=pdf``)."""
        return f"/api/v1/runs/{self.run_id}/report"


class ObservationsIn(BaseModel):
    """A technician's observations, by catalogue metric: yes/no (no fire, no leakage ...)
    or a number from other equipment (mass loss, insulation resistance ...)."""

    model_config = ConfigDict(extra="forbid")

    # Strict: "yes" or "1" is not silently taken for true; JSON true/false or a number.
    values: dict[str, StrictBool | StrictFloat] = Field(min_length=1, max_length=50)
    observed_by: str | None = Field(
        None, min_length=1, max_length=100,
        description="who observed it; default: the token's name")
    note: str | None = Field(None, max_length=2000)

    @model_validator(mode="after")
    def _finite(self) -> ObservationsIn:
        for k, v in self.values.items():
            if isinstance(v, float) and not (v == v and abs(v) != float("inf")):
                raise ValueError(f"{k}: value must be finite")
        return self


class ObservationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    run_id: int
    metric: str
    value_number: float | None
    value_flag: bool | None
    observed_by: str
    note: str | None
    observed_at: UtcDatetime
