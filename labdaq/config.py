"""Settings: one place that reads LABDAQ_* environment variables and an optional TOML file."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

from labdaq.bounds import MAX_DURATION_S, MIN_SAMPLE_PERIOD_S
from labdaq.protocol.document import Safety


def _toml_values() -> dict[str, Any]:
    """Values from the TOML file named by LABDAQ_CONFIG (or ./labdaq.toml if present)."""
    path = os.environ.get("LABDAQ_CONFIG")
    candidate = Path(path) if path else Path("labdaq.toml")
    if not candidate.is_file():
        if path:
            raise FileNotFoundError(f"LABDAQ_CONFIG points at {candidate}, which does not exist")
        return {}
    with candidate.open("rb") as fh:
        data = tomllib.load(fh)
    # Accept both a flat file and one with a [labdaq] table.
    return dict(data.get("labdaq", data))


ALERT_KINDS = ("completed", "paused_fault", "aborted_safety", "node_down", "node_up")


class AlertSubscription(BaseModel):
    """One `[[labdaq.alerts]]` entry: who is told (an e-mail address or a webhook URL)
    about which run outcomes and node changes (node_down, node_up)."""

    email: str | None = Field(default=None, max_length=320)
    webhook: str | None = Field(default=None, max_length=500, pattern=r"^https?://")
    kinds: list[str] = Field(default_factory=lambda: list(ALERT_KINDS))

    @model_validator(mode="after")
    def _one_target(self) -> AlertSubscription:
        if (self.email is None) == (self.webhook is None):
            raise ValueError("an alert subscription names exactly one of email or webhook")
        unknown = set(self.kinds) - set(ALERT_KINDS)
        if unknown:
            raise ValueError(f"unknown alert kinds {sorted(unknown)}; known: {ALERT_KINDS}")
        return self


class Settings(BaseSettings):
    """Runtime configuration. Environment variables win over the TOML file."""

    model_config = SettingsConfigDict(env_prefix="LABDAQ_", extra="ignore")

    data_dir: Path = Field(
        default=Path("./data"), description="Where the SQLite file and journals live"
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite file in data_dir"
    )
    host: str = "127.0.0.1"
    port: int = 8000
    # Niceness added to the API process (labdaq api / serve): acquisition gets the CPU first.
    api_nice: int = Field(default=10, ge=0, le=19)
    # labdaq api: move the start-up heap out of full GC collections (labdaq.api.gc_freeze).
    api_gc_freeze: bool = True
    # Writer batching: a batch is flushed when it reaches this many rows or this age.
    writer_batch_rows: int = 2000
    writer_batch_age_s: float = 0.5
    # Batches that queued up behind a slow write go out together, up to this many rows.
    writer_max_batch_rows: int = Field(default=32_000, ge=1)
    # A write starts at most this often (s) unless writer_max_batch_rows are waiting: every
    # commit updates the position of each run in it.
    writer_commit_interval_s: float = Field(default=0.25, ge=0, le=5)
    # The sample writer runs in its own process (no GIL shared with acquisition).
    writer_process: bool = True
    # How often the engine polls the database for new work when no nudge arrives.
    engine_poll_s: float = 0.5
    # Safety and end conditions are evaluated at least this often (s, on the engine clock).
    engine_control_period_s: float = 1.0
    # A wired temperature sensor's reading older than this (s, on the engine clock; or two
    # of its scan periods, if longer) is stale: stored with the sample, flagged, and
    # checked against no limit.
    engine_temperature_stale_s: float = Field(default=3.0, gt=0)
    # A wired sensor with no current reading for longer than this (s, on the engine
    # clock; never less than its staleness bound) is lost: a run with a temperature limit
    # is stopped safely, as for an open thermocouple.
    engine_temperature_lost_s: float = Field(default=15.0, gt=0)
    # Lab-wide safety limits (the protocol safety block's fields), combined with the
    # cell's, the channel's and the protocol's to the tightest when a run is created.
    lab_limits: Safety | None = Field(
        default=None, description="lab-wide limits, e.g. {max_temperature_c = 60}"
    )
    # The longest interruption (wall seconds, whatever the clock speed) after which a run
    # is resumed, not ended.
    max_resume_gap_s: float = 600.0
    # `labdaq serve` restarts a child that dies after restart_backoff_s, doubling up to
    # restart_backoff_max_s; after restart_max restarts that each died within
    # restart_stable_s it gives up on the child (the engine: every output off first).
    restart_backoff_s: float = Field(default=1.0, gt=0)
    restart_backoff_max_s: float = Field(default=30.0, gt=0)
    restart_max: int = Field(default=5, ge=0)
    restart_stable_s: float = Field(default=30.0, gt=0)
    # This acquisition node's name (labdaq.nodes; default: the host name): instruments
    # with `node = "<name>"` in the instruments file are its to drive.
    node_name: str | None = Field(default=None, max_length=100)
    # A node whose heartbeat (on the database's clock) is older than this is down: the
    # API shows its running and paused runs as node_down until it returns.
    node_down_after_s: float = Field(default=15.0, gt=0)
    # PostgreSQL: hash partitions of the samples table by run_id (0: one plain table);
    # applied when migrations first reach 0019, changed later with `labdaq db
    # partition-samples` (labdaq.storage.partitions).
    samples_partitions: int = Field(default=0, ge=0, le=1024)
    # Retention (labdaq.retention): where archived exports go (default <data_dir>/archive),
    # and how many points a run's downsampled copy keeps.
    archive_dir: Path | None = Field(default=None, description="archived exports' folder")
    retention_points: int = Field(default=5000, ge=10, le=1_000_000)
    # GET /ready: an engine heartbeat older than this (wall seconds) is not ready.
    ready_heartbeat_max_age_s: float = Field(default=10.0, gt=0)
    # The cell's safety window is its cut-offs widened by this margin (V).
    safety_voltage_margin_v: float = 0.1
    # The lab's instruments file (docs/lab-setup.md). When set, `labdaq serve` applies it
    # at start and it is the source of truth: the API refuses instrument changes.
    instruments_file: Path | None = Field(
        default=None, description="instruments file applied at start; the API cannot edit"
    )
    # Input bounds the API enforces beyond its schema (which shows the widest values).
    min_sample_period_s: float = Field(default=MIN_SAMPLE_PERIOD_S, ge=MIN_SAMPLE_PERIOD_S)
    max_duration_s: float = Field(default=MAX_DURATION_S, gt=0, le=MAX_DURATION_S)
    # A dashboard sign-in lasts this long (never past its token's expiry).
    web_session_ttl_s: float = Field(default=12 * 3600.0, gt=0)
    # Request bodies larger than this get 413 before they are parsed.
    api_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # ... except an uploaded cycler file (POST /api/v1/imports), buffered in memory.
    api_max_import_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    # How long an API request waits for a locked SQLite database before answering 503
    # (the engine keeps its own, longer wait); and the Retry-After it then suggests.
    api_db_busy_timeout_s: float = Field(default=2.0, ge=0)
    api_retry_after_s: int = Field(default=2, ge=1)
    # How long the API keeps a verified token before checking it in the database again
    # (labdaq.token_cache); 0 checks every request. A revocation through the same API
    # process takes effect at once, one made elsewhere (CLI, another API) within this.
    api_token_cache_s: float = Field(default=2.0, ge=0, le=60)
    # Alerts (labdaq.alerts): who is told when a run completes, stops on a fault or for
    # safety; the link in each alert is {public_url}/runs/{id}.
    alerts: list[AlertSubscription] = Field(default=[], description="alert subscriptions")
    public_url: str = "http://127.0.0.1:8000"
    # Per-run subscriptions (POST /api/v1/runs/{id}/subscriptions, labdaq.run_alerts): the
    # API runs the notifier for them even with no lab-wide subscriber above; false stores
    # them but sends nothing.
    run_alerts: bool = True
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_from: str = "labdaq@localhost"
    # The notifier reads new events this often (s); a delivery is tried this many times,
    # waiting alerts_backoff_s, doubled each time, in between; each try waits at most
    # alerts_timeout_s for the server.
    alerts_poll_s: float = Field(default=2.0, gt=0)
    alerts_attempts: int = Field(default=5, ge=1)
    alerts_backoff_s: float = Field(default=1.0, ge=0)
    alerts_timeout_s: float = Field(default=10.0, gt=0)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'labdaq.db').resolve()}"

    @property
    def audit_head_file(self) -> Path:
        """The audit chain's head outside the database (labdaq.audit): in the directory of
        the SQLite file, else in the data directory."""
        url = make_url(self.resolved_database_url)
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            return Path(url.database).resolve().parent / "audit-head"
        return self.data_dir / "audit-head"


def load_settings(**overrides: Any) -> Settings:
    values = _toml_values()
    values.update({k: v for k, v in overrides.items() if v is not None})
    # Explicit overrides > env > TOML: pydantic-settings gives init kwargs priority over env,
    # so pass TOML values only where the environment does not set them.
    env_keys = {k[len("LABDAQ_") :].lower() for k in os.environ if k.startswith("LABDAQ_")}
    init = {
        k: v
        for k, v in values.items()
        if k in overrides and overrides[k] is not None or k not in env_keys
    }
    settings = Settings(**init)
    from labdaq.audit import remember_head_file

    remember_head_file(settings.resolved_database_url, settings.audit_head_file)
    return settings
