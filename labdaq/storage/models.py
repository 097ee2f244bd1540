"""ORM models: the database schema of labdaq as SQLAlchemy 2 typed declarative classes.

One job: the tables, one class each, with the comment that says what a column means.
The declarative base is in ``base.py``; who may act and the record of what they did
(users, tokens, web sessions, the audit chain) in ``models_access.py``, re-exported here,
so every caller names a table the same way (``models as m``: ``m.Run``, ``m.ApiToken``)
and Alembic's ``check`` compares the one metadata they share with the database.
"""

from __future__ import annotations

import enum
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
    true,
)
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base, utcnow
from .models_access import (  # noqa: F401 - re-exported: every caller names tables as m.X
    ApiToken,
    AuditHead,
    AuditRecord,
    Role,
    User,
    WebSession,
)


class RunState(enum.StrEnum):
    queued = "queued"
    # Next on its channel, held until a technician confirms the cell on the channel
    # (another cell than the previous run's, or the previous run ended abnormally).
    awaiting_cell = "awaiting_cell"
    running = "running"
    paused = "paused"
    completed = "completed"
    stopped = "stopped"
    aborted_safety = "aborted_safety"
    failed = "failed"
    interrupted = "interrupted"
    # Another lab's cycler file brought in (labdaq.imports): read-only, never acquired;
    # terminal from the start, so pause/resume/stop are refused.
    imported = "imported"


#: States in which a run waits in its channel's queue (labdaq/run_queue.py).
WAITING_STATES = (RunState.queued, RunState.awaiting_cell)
#: States in which a run holds its channel's instrument (at most one run per channel).
HOLDING_STATES = (RunState.running, RunState.paused)
#: Every state that is not final: a channel with such a run is busy.
ACTIVE_STATES = (*WAITING_STATES, *HOLDING_STATES)
_HOLDING_SQL = "state IN ('running', 'paused')"
_WAITING_SQL = "state IN ('queued', 'awaiting_cell')"


class Instrument(Base):
    __tablename__ = "instruments"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    driver: Mapped[str] = mapped_column(String(100))
    resource: Mapped[str] = mapped_column(String(300))
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    idn: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # False: configured off, or removed from the instruments file while past runs still
    # reference its channels (rows are kept for their history); the engine skips it.
    enabled: Mapped[bool] = mapped_column(default=True, server_default=true())
    # The acquisition node that drives it (labdaq.nodes); None: unassigned, driven only
    # by a single-machine node (`serve --role all`), never by a `--role node` one.
    node: Mapped[str | None] = mapped_column(String(100))


class Channel(Base):
    __tablename__ = "channels"
    __table_args__ = (
        UniqueConstraint("instrument_id", "index", name="uq_channel_instrument_index"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    instrument_id: Mapped[int] = mapped_column(ForeignKey("instruments.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    # Hardware limits of the channel, used to reject protocols before anything runs.
    max_current_a: Mapped[float | None] = mapped_column(Float)
    max_voltage_v: Mapped[float | None] = mapped_column(Float)
    # Instruments wired to this channel's cell, by instrument name: {"impedance": "eis1",
    # "chamber": "chamber1", "thermocouple": {"logger": "logger1", "channel": 101,
    # "type": "K", "placement": "can side"}} (labdaq.instruments_config.ChannelConfig).
    aux: Mapped[dict[str, Any] | None] = mapped_column()
    # The cell normally on this channel (the instruments file's `cell`).
    default_cell_id: Mapped[int | None] = mapped_column(ForeignKey("cells.id"))
    # False: removed from the instruments file but kept for the runs that reference it.
    enabled: Mapped[bool] = mapped_column(default=True, server_default=true())


class Cell(Base):
    __tablename__ = "cells"

    id: Mapped[int] = mapped_column(primary_key=True)
    serial: Mapped[str] = mapped_column(String(100), unique=True)
    chemistry: Mapped[str] = mapped_column(String(50))
    spec_name: Mapped[str | None] = mapped_column(String(100))
    capacity_ah: Mapped[float] = mapped_column(Float)
    nominal_voltage_v: Mapped[float | None] = mapped_column(Float)
    charge_cutoff_v: Mapped[float] = mapped_column(Float)
    discharge_cutoff_v: Mapped[float] = mapped_column(Float)
    max_charge_current_a: Mapped[float | None] = mapped_column(Float)
    max_discharge_current_a: Mapped[float | None] = mapped_column(Float)
    # The cell's temperature window (°C, datasheet): a limit of every run on it.
    min_temperature_c: Mapped[float | None] = mapped_column(Float)
    max_temperature_c: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Identity of the physical cell, edited by technicians through the cells API.
    maker: Mapped[str | None] = mapped_column(String(100))
    model: Mapped[str | None] = mapped_column(String(100))
    lot: Mapped[str | None] = mapped_column(String(100))
    received_on: Mapped[date | None] = mapped_column(Date)
    notes: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime | None] = mapped_column()


class Protocol(Base):
    __tablename__ = "protocols"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # The same document always hashes the same, so a run points at exactly what it ran.
    content_hash: Mapped[str] = mapped_column(String(80), unique=True)  # "sha256:<hex>"
    document: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        # At most one run per channel holds the instrument, enforced by the database
        # itself so two nodes (or a claim racing a resume) cannot both win.
        Index(
            "uq_runs_holding_channel",
            "channel_id",
            unique=True,
            sqlite_where=text(_HOLDING_SQL),
            postgresql_where=text(_HOLDING_SQL),
        ),
        # One place per run in its channel's queue: two requests queueing at once cannot
        # take the same place (the loser retries behind; with "queue": false it is a 409).
        Index(
            "uq_runs_queue_order",
            "channel_id",
            "queue_order",
            unique=True,
            sqlite_where=text(_WAITING_SQL),
            postgresql_where=text(_WAITING_SQL),
        ),
        Index("ix_runs_state", "state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    channel_id: Mapped[int] = mapped_column(ForeignKey("channels.id"))
    cell_id: Mapped[int] = mapped_column(ForeignKey("cells.id"))
    protocol_id: Mapped[int] = mapped_column(ForeignKey("protocols.id"))
    state: Mapped[str] = mapped_column(String(20), default=RunState.queued.value)
    # Written by the API, read by the engine: "stop", "pause", "resume".
    requested_action: Mapped[str | None] = mapped_column(String(20))
    # The protocol after C-rates and limits were resolved against the cell and channel.
    plan: Mapped[dict[str, Any]] = mapped_column(default=dict)
    sample_period_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    end_reason: Mapped[str | None] = mapped_column(Text)
    step_index: Mapped[int] = mapped_column(Integer, default=0)
    step_count: Mapped[int] = mapped_column(Integer, default=0)
    cycle_index: Mapped[int] = mapped_column(Integer, default=0)
    elapsed_s: Mapped[float] = mapped_column(Float, default=0.0)
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    node: Mapped[str | None] = mapped_column(String(100))
    # The run's place in its program (pc, loop counters, accumulators): what a restarted
    # engine resumes from. Written with every progress update and at step boundaries.
    position: Mapped[dict[str, Any] | None] = mapped_column()
    # The channel's wiring (channels.aux) when the run was created: which sensor,
    # thermocouple type and placement, impedance meter and chamber its data came from.
    wiring: Mapped[dict[str, Any] | None] = mapped_column()
    # Sample periods the engine could not sample (lost samples), each gap also an event
    # of kind ``missed_periods``; written with the samples and that event (engine/gaps.py).
    missed_periods: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The run queue (labdaq/run_queue.py): the run's sort key among its channel's waiting
    # runs (smallest starts first; not a position, which counts from 1 without gaps), the
    # earliest time it may start, and when a technician last said its cell is on the
    # channel (creating it on an idle channel, or confirming a change); cleared on the
    # other waiting runs of the channel whenever a run starts there.
    queue_order: Mapped[int | None] = mapped_column(Integer)
    not_before: Mapped[datetime | None] = mapped_column()
    cell_confirmed_at: Mapped[datetime | None] = mapped_column()
    # Why an awaiting_cell run waits (the cell loaded, or how the previous run ended).
    waiting_reason: Mapped[str | None] = mapped_column(Text)


class Import(Base):
    """A cycler file brought in as a read-only run (labdaq.imports). ``file_sha256`` is
    unique: the same file imported twice is the same run. ``vendor_cycles`` is the
    cycler's own per-cycle summary where the file has one (kept beside the ``cycles``
    labdaq computes), one dict per cycle with labdaq's column names."""

    __tablename__ = "imports"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), unique=True)
    file_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    filename: Mapped[str] = mapped_column(String(300))
    format: Mapped[str] = mapped_column(String(30))
    # The reader: package name and version, or "labdaq" for our own, and its licence.
    reader: Mapped[str] = mapped_column(String(100))
    reader_licence: Mapped[str] = mapped_column(String(60))
    # False: the file had no measured current (e.g. a BioLogic OCV technique); currents
    # were derived from its charge column, or are zero.
    current_measured: Mapped[bool] = mapped_column(default=True)
    n_samples: Mapped[int] = mapped_column(BigInteger)
    vendor_cycles: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    imported_by: Mapped[str] = mapped_column(String(200))
    imported_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The labdaq protocol template (seeds/protocols/) the other lab's test followed, as
    # declared by whoever imported it: the catalogue entries of that template apply to
    # the run. None: imported without a template, and no entry applies by protocol.
    template: Mapped[str | None] = mapped_column(String(100))


class Calibration(Base):
    """A calibration certificate of an instrument (``channel_id`` NULL: every channel of
    it) or of one channel: who calibrated it, when, until when it is valid, and the
    accuracy it certifies per quantity ({"voltage_rel": 0.001, "current_rel": 0.01,
    "temperature_c": 2.0}: expanded, k = 2). History is kept; the evaluation takes the
    newest certificate in force for the run's channel (labdaq.calibrations)."""

    __tablename__ = "calibrations"

    id: Mapped[int] = mapped_column(primary_key=True)
    instrument_id: Mapped[int] = mapped_column(ForeignKey("instruments.id"), index=True)
    channel_id: Mapped[int | None] = mapped_column(ForeignKey("channels.id"))
    certificate_id: Mapped[str] = mapped_column(String(100))
    lab: Mapped[str] = mapped_column(String(200))
    calibrated_on: Mapped[date] = mapped_column(Date)
    due_on: Mapped[date] = mapped_column(Date)
    accuracy: Mapped[dict[str, Any]] = mapped_column(default=dict)
    recorded_by: Mapped[str] = mapped_column(String(200))
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)
    note: Mapped[str | None] = mapped_column(Text)


class SampleFlag(enum.IntFlag):
    """Bits of ``samples.flags``."""

    BREACH = 1  # a safety limit was exceeded at this reading (output turned off)
    PAUSED = 2  # the run was paused: the output was off, nothing counted
    RESUMED = 4  # first reading after a gap (engine restart, lost instrument or writer)
    EDGE = 8  # taken right after a set point changed (a phase began or came back)
    GAP = 16  # first reading after sample periods the engine missed (a missed_periods event)
    # The channel's wired temperature sensor (channels.aux thermocouple) had no current
    # reading: temperature_c is its last one (or NULL), older than the engine's staleness
    # bound; it was checked against no limit.
    TEMP_STALE = 32
    # The wired sensor is lost (open thermocouple, or its logger stopped answering):
    # temperature_c is NULL.
    TEMP_LOST = 64


class SampleColumns:
    """The columns of a sample row, shared by samples and its downsampled copies."""

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    # Per-run monotonic sequence; (run_id, seq) unique so a replay never duplicates.
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    t_s: Mapped[float] = mapped_column(Float)
    ts_utc: Mapped[float] = mapped_column(Float)  # POSIX seconds, UTC
    step_index: Mapped[int] = mapped_column(Integer)
    cycle_index: Mapped[int] = mapped_column(Integer)
    voltage_v: Mapped[float] = mapped_column(Float)
    current_a: Mapped[float] = mapped_column(Float)
    temperature_c: Mapped[float | None] = mapped_column(Float)
    step_capacity_ah: Mapped[float] = mapped_column(Float)
    step_energy_wh: Mapped[float] = mapped_column(Float)
    flags: Mapped[int] = mapped_column(Integer, default=0)
    # The age of temperature_c's reading when it comes from a wired sensor (engine
    # seconds from the logger's query to this sample's measurement); NULL otherwise.
    temperature_age_s: Mapped[float | None] = mapped_column(Float)


class Sample(SampleColumns, Base):
    """One measurement of one channel. Narrow on purpose: this is the hot table."""

    __tablename__ = "samples"


class DownsampledSample(SampleColumns, Base):
    """A sample kept in a run's downsampled copy (labdaq.retention): a row of samples as
    it was, chosen to keep the shape of voltage and current at a few thousand points."""

    __tablename__ = "samples_downsampled"


class RunArchive(Base):
    """An archived export of an ended run's samples (labdaq.retention): where the file
    is, what it holds and its hash. No foreign key: the record outlives its run."""

    __tablename__ = "run_archives"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(Integer, unique=True)
    path: Mapped[str] = mapped_column(String(1000))
    format: Mapped[str] = mapped_column(String(20))
    samples: Mapped[int] = mapped_column(BigInteger)
    last_seq: Mapped[int] = mapped_column(BigInteger)
    data_sha256: Mapped[str] = mapped_column(String(64))
    file_sha256: Mapped[str] = mapped_column(String(64))
    downsampled: Mapped[int] = mapped_column(Integer)  # rows in samples_downsampled
    archived_at: Mapped[datetime] = mapped_column(default=utcnow)
    archived_by: Mapped[str] = mapped_column(String(200))


class Step(Base):
    __tablename__ = "steps"
    __table_args__ = (UniqueConstraint("run_id", "step_number", name="uq_steps_run_number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    # step_number counts executed steps (loops repeat step_index); step_index is the plan's.
    step_number: Mapped[int] = mapped_column(Integer)
    step_index: Mapped[int] = mapped_column(Integer)
    cycle_index: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(30))
    start_t_s: Mapped[float] = mapped_column(Float)
    end_t_s: Mapped[float] = mapped_column(Float)
    end_reason: Mapped[str] = mapped_column(String(100))
    capacity_ah: Mapped[float] = mapped_column(Float)
    energy_wh: Mapped[float] = mapped_column(Float)
    end_voltage_v: Mapped[float | None] = mapped_column(Float)
    dcir_ohm: Mapped[float | None] = mapped_column(Float)  # mean of the step's pulses
    # The end condition's crossing, interpolated between the readings around it; end_t_s
    # is the reading that showed it (where the next step starts).
    end_crossing_t_s: Mapped[float | None] = mapped_column(Float)


class Cycle(Base):
    __tablename__ = "cycles"
    __table_args__ = (UniqueConstraint("run_id", "cycle_index", name="uq_cycles_run_index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    cycle_index: Mapped[int] = mapped_column(Integer)
    start_t_s: Mapped[float] = mapped_column(Float)
    end_t_s: Mapped[float] = mapped_column(Float)
    charge_capacity_ah: Mapped[float] = mapped_column(Float)
    discharge_capacity_ah: Mapped[float] = mapped_column(Float)
    charge_energy_wh: Mapped[float] = mapped_column(Float)
    discharge_energy_wh: Mapped[float] = mapped_column(Float)
    coulombic_efficiency: Mapped[float | None] = mapped_column(Float)
    energy_efficiency: Mapped[float | None] = mapped_column(Float)
    mean_charge_voltage_v: Mapped[float | None] = mapped_column(Float)
    mean_discharge_voltage_v: Mapped[float | None] = mapped_column(Float)
    # The cycle spans a gap (engine, writer or instrument outage it was resumed after):
    # its totals count the samples on either side, not the time in between.
    spans_gap: Mapped[bool] = mapped_column(default=False, server_default=false())


class EisSpectrum(Base):
    """One impedance sweep taken by an EIS step of a run."""

    __tablename__ = "eis_spectra"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    step_index: Mapped[int] = mapped_column(Integer)
    cycle_index: Mapped[int] = mapped_column(Integer)
    t_s: Mapped[float] = mapped_column(Float)
    instrument: Mapped[str] = mapped_column(String(100))
    dc_voltage_v: Mapped[float | None] = mapped_column(Float)
    frequency_hz: Mapped[list[float]] = mapped_column(JSON)
    z_real_ohm: Mapped[list[float]] = mapped_column(JSON)
    z_imag_ohm: Mapped[list[float]] = mapped_column(JSON)


#: events whose ``seq`` is set are unique per run, kind and seq (a replayed batch
#: never records its gap twice).
_EVENT_SEQ_SQL = "seq IS NOT NULL"


class Event(Base):
    """Safety, state-change, interruption and audit events."""

    __tablename__ = "events"
    __table_args__ = (
        Index(
            "uq_events_run_kind_seq",
            "run_id",
            "kind",
            "seq",
            unique=True,
            sqlite_where=text(_EVENT_SEQ_SQL),
            postgresql_where=text(_EVENT_SEQ_SQL),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int | None] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), index=True
    )
    ts: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(30))
    severity: Mapped[str] = mapped_column(String(10), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    actor: Mapped[str | None] = mapped_column(String(100))
    # The sample an engine event written with the samples belongs to (a missed_periods
    # gap: the first sample after it); NULL for every other event.
    seq: Mapped[int | None] = mapped_column(BigInteger)


class Evaluation(Base):
    """One benchmark catalogue entry judged on one run (labdaq.benchmarks.evaluate):
    the verdict, and in ``result`` every criterion with its value, uncertainty, evidence
    and decision rule. Kept as history: a re-evaluation adds a row, the newest counts.
    ``data_sha256`` hashes the samples it was computed from, ``catalogue_sha256`` the
    catalogue files, so a result can be traced to exactly what produced it."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    entry_id: Mapped[str] = mapped_column(String(100))
    verdict: Mapped[str] = mapped_column(String(20))
    result: Mapped[dict[str, Any]] = mapped_column()
    data_sha256: Mapped[str] = mapped_column(String(64))
    catalogue_sha256: Mapped[str] = mapped_column(String(64))
    software_version: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Observation(Base):
    """What a technician saw or measured with other equipment during a run — no fire, no
    leakage, a mass loss, an insulation resistance — by catalogue metric name, for the
    evaluation to combine with the measured criteria. A number or a yes/no (one of the
    two); history is kept, the newest per metric counts."""

    __tablename__ = "observations"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    metric: Mapped[str] = mapped_column(String(100))
    value_number: Mapped[float | None] = mapped_column(Float)
    value_flag: Mapped[bool | None] = mapped_column()
    observed_by: Mapped[str] = mapped_column(String(100))
    note: Mapped[str | None] = mapped_column(Text)
    observed_at: Mapped[datetime] = mapped_column(default=utcnow)


SAMPLE_COLUMNS = (
    "run_id",
    "seq",
    "t_s",
    "ts_utc",
    "step_index",
    "cycle_index",
    "voltage_v",
    "current_a",
    "temperature_c",
    "step_capacity_ah",
    "step_energy_wh",
    "flags",
    "temperature_age_s",
)


class NodeHeartbeat(Base):
    """The latest sign of life of an acquisition node (labdaq.heartbeat): one row per node,
    overwritten every beat, read by ``GET /ready``."""

    __tablename__ = "node_heartbeats"

    node: Mapped[str] = mapped_column(String(100), primary_key=True)
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column()
    beat_at: Mapped[datetime] = mapped_column()
    # "running" while it acquires; "stopped" after an orderly shutdown; any other value
    # says why it is going down (e.g. "writer died").
    state: Mapped[str] = mapped_column(String(40))
    active_runs: Mapped[int] = mapped_column(Integer, default=0)
    # Instrument name -> "ok" | "lost: <reason>" | "not connected: <reason>".
    instruments: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The engine's own counters for /metrics (labdaq.metrics.ENGINE_METRICS names).
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")


class AlertCursor(Base):
    """How far the alert notifier (labdaq.alerts) has read the events table: one row, id 1,
    so a restarted notifier neither repeats nor skips an event."""

    __tablename__ = "alert_cursor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    event_id: Mapped[int] = mapped_column(BigInteger)


class AlertDelivery(Base):
    """One alert to one subscriber: claimed (unique per event and target) before it is
    sent, so concurrent notifiers never send it twice; then its outcome."""

    __tablename__ = "alert_deliveries"
    __table_args__ = (UniqueConstraint("event_id", "target", name="uq_alert_event_target"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    # No foreign keys: the record outlives a deleted run or event.
    event_id: Mapped[int] = mapped_column(BigInteger)
    run_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # completed | paused_fault | aborted_safety | node_down | node_up
    kind: Mapped[str] = mapped_column(String(30))
    # email | webhook, and the address or URL
    channel: Mapped[str] = mapped_column(String(10))
    target: Mapped[str] = mapped_column(String(500))
    # pending | sent | failed
    outcome: Mapped[str] = mapped_column(String(10), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column()


class LiveReading(Base):
    """The latest reading a cycler that runs its own program reported for a run (a Neware
    channel's ``inquire``, labdaq/engine/delegated_live.py): what the live view shows
    before the records are harvested as samples. One row per run, overwritten; it is
    not a sample and takes no part in any analysis."""

    __tablename__ = "live_readings"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"),
                                        primary_key=True)
    t_s: Mapped[float] = mapped_column(Float)  # run time of the reading
    ts_utc: Mapped[float] = mapped_column(Float)  # POSIX seconds, UTC, when it was asked
    voltage_v: Mapped[float | None] = mapped_column(Float)
    current_a: Mapped[float | None] = mapped_column(Float)
    temperature_c: Mapped[float | None] = mapped_column(Float)
    step_index: Mapped[int] = mapped_column(Integer)
    cycle_index: Mapped[int] = mapped_column(Integer)
    # The instrument's own state word (Neware: working, pause, stop, finish, protect).
    state: Mapped[str] = mapped_column(String(20))
    # The last harvested sample's seq when it was read: how far the samples lag.
    last_seq: Mapped[int] = mapped_column(BigInteger)


class RunSubscription(Base):
    """Someone to tell about one run (labdaq.run_alerts): an e-mail address or a webhook
    URL, and the alert kinds they want. The notifier (labdaq.alerts) sends a run's alerts
    to these besides the lab-wide subscribers of the configuration."""

    __tablename__ = "run_subscriptions"
    __table_args__ = (
        UniqueConstraint("run_id", "target", name="uq_run_subscriptions_run_target"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    # email | webhook, and the address or URL
    channel: Mapped[str] = mapped_column(String(10))
    target: Mapped[str] = mapped_column(String(500))
    kinds: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Who subscribed it (the audit log has the rest).
    created_by: Mapped[str] = mapped_column(String(200))
