"""Response and request bodies of imported cycler files and calibration certificates."""

from __future__ import annotations

from datetime import date
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from labdaq.api.schemas import UtcDatetime


class ImportOut(BaseModel):
    """An imported file and the read-only run it became. ``vendor_cycles``: the cycler's
    own per-cycle summary where the file has one (labdaq's own is at
    ``/api/v1/runs/{run_id}/cycles``)."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    run_id: int
    created: bool = False  # this request stored it (false: imported before)
    file_sha256: str
    filename: str
    format: str
    reader: str
    reader_licence: str
    current_measured: bool
    n_samples: int
    imported_by: str
    imported_at: UtcDatetime
    vendor_cycles: list[dict[str, Any]] | None = None
    details: dict[str, Any] = {}
    # The protocol template the other lab's test followed (its catalogue entries apply);
    # None: none declared.
    template: str | None = None


class ImportPatch(BaseModel):
    """Declare (or, with null, clear) the protocol template an imported run followed."""

    model_config = ConfigDict(extra="forbid")

    template: str | None = Field(
        max_length=100, description="a shipped protocol template's name (GET "
                                    "/api/v1/protocols/templates), or null")


class CalibrationOut(BaseModel):
    id: int
    instrument: str
    channel: str | None
    certificate_id: str
    lab: str
    calibrated_on: date
    due_on: date
    accuracy: dict[str, float]
    recorded_by: str
    recorded_at: UtcDatetime
    note: str | None
