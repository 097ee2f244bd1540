"""Pydantic schemas of the dashboard's own API additions (who am I, the lab at a glance,
safety alarms) and of a run request's dry run."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from labdaq.api.schemas import UtcDatetime


class WhoAmI(BaseModel):
    name: str
    role: str
    grants: list[str] = Field(description="what the role may do: read, operate, evaluate, "
                              "abuse (start abuse protocols), admin")


class RunBrief(BaseModel):
    id: int
    state: str = Field(description="the run's state; node_down (shown, never stored) for a "
                       "running or paused run whose node is down")
    node: str | None = Field(default=None, description="the node acquiring it")
    cell_id: int
    cell_serial: str | None
    step_index: int
    step_count: int
    cycle_index: int
    elapsed_s: float
    progress: float | None = Field(description="fraction of the program done, 0 to 1")
    end_reason: str | None


class ChannelStatus(BaseModel):
    channel_id: int
    channel: str
    instrument: str
    driver: str
    state: str = Field(description="idle, queued, running, paused, node_down (its run's node "
                       "is down), interrupted, safety_stop")
    run: RunBrief | None
    voltage_v: float | None
    current_a: float | None = Field(description="positive when charging")
    temperature_c: float | None
    t_s: float | None = Field(description="run time of the newest sample, s")


class AlarmOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    run_id: int | None
    ts: UtcDatetime
    severity: str
    message: str
    data: dict[str, object]


class AckIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str | None = Field(default=None, max_length=500, pattern=r"^[^\x00-\x1f\x7f]*$")


class AckOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int = Field(description="the audit event")
    run_id: int | None
    ts: UtcDatetime
    message: str
    actor: str | None


class RunPreview(BaseModel):
    """What ``POST /api/v1/runs`` would start (``dry_run=true``): nothing is stored."""

    dry_run: bool
    channel: str
    cell: dict[str, Any]
    protocol_name: str
    content_hash: str
    sample_period_s: float
    limits: dict[str, Any] = Field(description="the effective limits (cell, channel, protocol)")
    program: list[dict[str, Any]] = Field(description="resolved steps, currents in A")
