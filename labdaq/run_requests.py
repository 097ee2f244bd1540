"""What a client asks for when it starts a run (``POST /api/v1/runs``): the request and
its parts, with their bounds stated in the schema (:mod:`labdaq.runs` validates and
resolves them against the cell, channel and lab)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from labdaq.bounds import (
    MAX_TEXT_LENGTH,
    AmpHours,
    Celsius,
    Name,
    NonNegativeSeconds,
    PositiveAmps,
    PositiveVolts,
    RowId,
    SamplePeriodS,
    Seconds,
    Text,
    UtcTime,
    WholeNumber,
)


class CellIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Lengths are the columns' (VARCHAR on PostgreSQL refuses longer text).
    serial: Name = Field(max_length=100)
    chemistry: Name = Field(max_length=50)
    capacity_ah: AmpHours
    nominal_voltage_v: PositiveVolts | None = None
    charge_cutoff_v: PositiveVolts
    discharge_cutoff_v: PositiveVolts
    max_charge_current_a: PositiveAmps | None = None
    max_discharge_current_a: PositiveAmps | None = None
    # The cell's temperature window (datasheet), a limit of every run on the cell.
    min_temperature_c: Celsius | None = None
    max_temperature_c: Celsius | None = None
    spec_name: Name | None = Field(default=None, max_length=100)

    @model_validator(mode="after")
    def _window(self) -> CellIn:
        if self.discharge_cutoff_v >= self.charge_cutoff_v:
            raise ValueError("discharge_cutoff_v must be below charge_cutoff_v")
        if (self.min_temperature_c is not None and self.max_temperature_c is not None
                and self.min_temperature_c >= self.max_temperature_c):
            raise ValueError("min_temperature_c must be below max_temperature_c")
        return self


class CycleProtocolIn(BaseModel):
    """The fixed first protocol: CC-CV charge, rest, CC discharge, rest; repeated."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["basic_cycle"] = "basic_cycle"
    charge_current_a: PositiveAmps = Field(description="CC charge current, A")
    charge_voltage_v: PositiveVolts = Field(description="CC end / CV hold voltage, V")
    taper_current_a: PositiveAmps | None = Field(
        default=None, description="CV ends when |I| falls below; default C/20"
    )
    rest_s: NonNegativeSeconds = 600.0
    discharge_current_a: PositiveAmps = Field(description="CC discharge current magnitude, A")
    discharge_cutoff_v: PositiveVolts
    cycles: WholeNumber = Field(default=1, ge=1, le=100_000)
    max_step_s: Seconds = Field(default=48 * 3600.0, description="time bound on every step")


def _one_of(*names: str) -> dict[str, Any]:
    """JSON Schema for "exactly one of these fields is given and not null"."""
    return {
        "oneOf": [{"required": [n], "properties": {n: {"not": {"type": "null"}}}} for n in names]
    }


# A protocol document sent as YAML/JSON text; the request body limit bounds it too.
DocumentText = Annotated[str, Field(min_length=1, max_length=100 * MAX_TEXT_LENGTH)]


class RunCreate(BaseModel):
    """A run request: where, which cell, and what to run (exactly one protocol source)."""

    # The one-of rules are in the schema too, so a client generator (and schemathesis)
    # knows a body with two cells or no protocol is invalid.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "allOf": [
                _one_of("cell_id", "cell_serial", "cell"),
                _one_of("protocol", "protocol_document", "template"),
            ],
            # The simulated lab's first channel and cell (`labdaq serve --sim`).
            "examples": [
                {
                    "channel": "smu1/1",
                    "cell_serial": "SIM-NMC811-001",
                    "template": "basic_cycle",
                    "sample_period_s": 1.0,
                }
            ],
        },
    )

    channel: Name | RowId = Field(description="channel name (e.g. 'smu1/1') or id")
    cell_id: RowId | None = None
    cell_serial: Name | None = Field(default=None, max_length=100)
    cell: CellIn | None = None
    protocol: CycleProtocolIn | None = Field(
        default=None, description="the simple charge/rest/discharge cycle, by its parameters"
    )
    protocol_document: dict[str, Any] | DocumentText | None = Field(
        default=None, description="a protocol document (JSON object or YAML/JSON text)"
    )
    template: Name | None = Field(default=None, description="a shipped protocol template")
    sample_period_s: SamplePeriodS = Field(
        default=1.0,
        description="seconds between stored samples; at least the configured minimum "
        "(min_sample_period_s) and the instrument's fastest period where it is known",
    )
    queue: bool = Field(
        default=True, strict=True,
        description="on a busy channel, wait in its queue behind the runs there (the "
        "response gives the queue_position); false: refuse with 409 instead",
    )
    not_before: UtcTime | None = Field(
        default=None,
        description="do not start before this time (ISO 8601 with its UTC offset); the "
        "run waits at its place in the queue meanwhile, holding up those behind it",
    )
    reason: Text | None = Field(
        default=None,
        description="why the run is started; required (non-blank) for a protocol marked "
        "abuse: true, which needs an engineer or admin token; recorded in the audit log",
    )

    @model_validator(mode="after")
    def _one_of_each(self) -> RunCreate:
        given = [x is not None for x in (self.cell_id, self.cell_serial, self.cell)]
        if sum(given) > 1:
            # None: the channel's default cell (its `cell` in the instruments file).
            raise ValueError("give at most one of cell_id, cell_serial or cell")
        sources = [x is not None for x in (self.protocol, self.protocol_document, self.template)]
        if sum(sources) != 1:
            raise ValueError("give exactly one of protocol, protocol_document or template")
        return self
