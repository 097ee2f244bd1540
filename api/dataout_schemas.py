"""Pydantic response schemas of the data-out routes: cells, samples pages and downsampled
samples (kept apart from the ORM models, like api/schemas.py)."""

from __future__ import annotations

from datetime import date

from pydantic import BaseModel, ConfigDict

from labdaq.api.schemas import UtcDatetime


class CellOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    serial: str
    spec_name: str | None
    maker: str | None
    model: str | None
    lot: str | None
    received_on: date | None
    notes: str | None
    chemistry: str
    capacity_ah: float
    nominal_voltage_v: float | None
    charge_cutoff_v: float
    discharge_cutoff_v: float
    max_charge_current_a: float | None
    max_discharge_current_a: float | None
    min_temperature_c: float | None = None
    max_temperature_c: float | None = None
    created_at: UtcDatetime
    updated_at: UtcDatetime | None
    run_ids: list[int] = []


class SamplesPage(BaseModel):
    """Column-oriented samples, one array per quantity, units in the names.

    Full resolution: rows in seq order; ``next_after_seq`` is the cursor for the next page
    (pass it as ``after_seq``) and ``more`` says whether another page exists. Downsampled
    (``points=N``): ``downsampled`` is true, the rows are a subset chosen to keep the shape
    of voltage and current, and ``source_count`` is how many rows they were chosen from.
    """

    run_id: int
    count: int
    next_after_seq: int
    more: bool
    downsampled: bool = False
    source_count: int | None = None
    seq: list[int]
    t_s: list[float]
    ts_utc: list[float]
    step_index: list[int]
    cycle_index: list[int]
    voltage_v: list[float]
    current_a: list[float]
    temperature_c: list[float | None]
    step_capacity_ah: list[float]
    step_energy_wh: list[float]
    flags: list[int]
    # Seconds from the wired sensor's reading to the sample (null: no wired reading).
    temperature_age_s: list[float | None]
