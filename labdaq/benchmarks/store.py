"""Store evaluation results (the ``evaluations`` table) with what they were computed
from: a SHA-256 of the run's samples, of the catalogue files and the software version.
Sync; an async caller uses ``session.run_sync``."""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from labdaq.benchmarks.evaluate import EntryResult, RunData
from labdaq.storage import models as m

__all__ = [
    "data_sha256", "catalogue_sha256", "store_evaluation", "latest_evaluation",
    "record_observation", "observations_of", "observable_metrics",
]

# The sample columns an evaluation reads, in a fixed order for the hash.
_HASHED = ("seq", "t_s", "step_index", "cycle_index", "voltage_v", "current_a",
           "temperature_c", "flags")


def data_sha256(samples: dict[str, np.ndarray]) -> str:
    """SHA-256 over the sample columns present (name, dtype and little-endian bytes)."""
    h = hashlib.sha256()
    for name in (c for c in _HASHED if c in samples):
        col = np.ascontiguousarray(samples[name])
        col = col.astype(col.dtype.newbyteorder("<"), copy=False)
        h.update(f"{name}:{col.dtype.str}:{col.size};".encode())
        h.update(col.tobytes())
    return h.hexdigest()


def catalogue_sha256(directory: Path | None = None) -> str:
    """SHA-256 over the catalogue's YAML files (sorted by name); the shipped one's is
    computed once per process, as its catalogue is read once (shipped_catalogue)."""
    if directory is None:
        return _shipped_sha256()
    return _sha256_of(directory)


@functools.cache
def _shipped_sha256() -> str:
    return _sha256_of(resources.files("labdaq.seeds") / "benchmarks")


def _sha256_of(root: Any) -> str:
    h = hashlib.sha256()
    for p in sorted((p for p in root.iterdir() if p.name.endswith(".yaml")),
                    key=lambda p: p.name):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _version() -> str:
    try:
        return metadata.version("labdaq")
    except metadata.PackageNotFoundError:
        return "unknown"


def store_evaluation(session: Session, run: RunData, results: list[EntryResult]
                     ) -> list[m.Evaluation]:
    """Add one row per entry result (the caller commits)."""
    if run.run_id is None:
        raise ValueError("only a stored run's evaluation can be stored")
    data_hash, cat_hash, version = data_sha256(run.samples), catalogue_sha256(), _version()
    rows = [
        m.Evaluation(run_id=run.run_id, entry_id=r.entry_id, verdict=r.verdict,
                     result=_jsonable(r.as_dict()), data_sha256=data_hash,
                     catalogue_sha256=cat_hash, software_version=version)
        for r in results
    ]
    session.add_all(rows)
    return rows


def latest_evaluation(session: Session, run_id: int) -> list[m.Evaluation]:
    """The newest stored result per entry of ``run_id``."""
    newest = (select(m.Evaluation.entry_id, func.max(m.Evaluation.id).label("id"))
              .where(m.Evaluation.run_id == run_id).group_by(m.Evaluation.entry_id)
              .subquery())
    return list(session.scalars(
        select(m.Evaluation).join(newest, m.Evaluation.id == newest.c.id)
        .order_by(m.Evaluation.entry_id)))


@functools.cache
def observable_metrics() -> frozenset[str]:
    """What an observation may name: the catalogue's metrics and the quantities its banded
    limits depend on (e.g. cell_mass_g). Read once: the shipped catalogue does not change
    while the process runs, and parsing its YAML for every value of every request made
    POST /runs/{id}/observations the API's slowest operation."""
    from labdaq.benchmarks.catalogue import METRICS, shipped_catalogue

    return frozenset(METRICS) | {c.band_quantity for e in shipped_catalogue().entries
                                 for c in e.criteria if c.band_quantity}


def record_observation(session: Session, run_id: int, metric: str, value: float | bool,
                       observed_by: str, note: str | None = None) -> m.Observation:
    """Add a technician's observation (the caller commits)."""
    if metric not in observable_metrics():
        raise ValueError(f"unknown metric {metric!r}")
    if session.get(m.Run, run_id) is None:
        raise KeyError(f"no run {run_id}")
    row = m.Observation(run_id=run_id, metric=metric, observed_by=observed_by, note=note,
                        value_flag=value if isinstance(value, bool) else None,
                        value_number=None if isinstance(value, bool) else float(value))
    session.add(row)
    return row


def observations_of(session: Session, run_id: int) -> dict[str, float | bool]:
    """The newest observation per metric of ``run_id``, as evaluation input."""
    out: dict[str, float | bool] = {}
    for row in session.scalars(select(m.Observation).where(m.Observation.run_id == run_id)
                               .order_by(m.Observation.id)):
        value = row.value_flag if row.value_flag is not None else row.value_number
        if value is not None:
            out[row.metric] = value
    return out


def _jsonable(x: Any) -> Any:
    """numpy scalars and arrays to plain JSON values; NaN to None."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and x != x:
        return None
    return x
