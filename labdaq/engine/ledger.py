"""What a sample batch commits besides its rows: run positions, finished steps and cycles.

A run's position (where it is in its program, with the step's and cycle's accumulators)
must count exactly the samples that are committed, or a restarted engine resumes with
charge counted from samples that were never stored (or misses some). So positions, and
the steps and cycles rows a boundary completes, travel through the sample sink with the
rows they belong to and are committed in the same transaction (:mod:`.writer`).

Cheap on the hot path: an instrument group sends, with every put, one small float array
of each stored run's *fast* state (``FAST_COLUMNS``: the numbers that change every tick),
and a *full* position (a JSON-able dict) only when the slow part changes (a run joins,
a phase ends, a pause ends). The writer resolves them when a batch leaves its queue, in
stream order (:class:`Resolver`): the newest full position of each run, overlaid with
the fast values of its newest row when that row is newer. The result (:class:`Records`)
is JSON, so it can be journaled with its rows and replayed with them.

Gaps (sample periods the engine missed, :mod:`.gaps`) travel the same way: each is an
event row keyed by the run and the seq of the sample after it (written once however often
its batch is replayed) and the run's new ``missed_periods`` total.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from labdaq.engine import wallclock
from labdaq.engine.gaps import EVENT_KIND

#: Columns of a fast-state array (one row per stored sample of a run, float64): run id,
#: the sample's seq and t_s, then the step's and the open cycle's accumulators.
FAST_COLUMNS = (
    "run_id", "seq", "t_s", "step_cap_ah", "step_en_wh", "step_dis_ah",
    "charge_ah", "discharge_ah", "charge_wh", "discharge_wh",
    "charge_v_s", "charge_s", "discharge_v_s", "discharge_s", "end_t_s",
)
_RUN, _SEQ, _T = 0, 1, 2
_STEP_FIELDS = ("step_cap_ah", "step_en_wh", "step_dis_ah")
_CYCLE_FIELDS = FAST_COLUMNS[6:]

STEP_COLUMNS = (
    "run_id", "step_number", "step_index", "cycle_index", "kind", "start_t_s", "end_t_s",
    "end_reason", "capacity_ah", "energy_wh", "end_voltage_v", "dcir_ohm", "end_crossing_t_s",
)
CYCLE_COLUMNS = (
    "run_id", "cycle_index", "start_t_s", "end_t_s", "charge_capacity_ah",
    "discharge_capacity_ah", "charge_energy_wh", "discharge_energy_wh",
    "coulombic_efficiency", "energy_efficiency", "mean_charge_voltage_v",
    "mean_discharge_voltage_v", "spans_gap",
)
PROGRESS_COLUMNS = (
    "step_index", "step_count", "cycle_index", "elapsed_s", "last_seq", "position", "run_id",
)
GAP_EVENT_COLUMNS = ("run_id", "ts", "kind", "severity", "message", "data", "seq")


@dataclass
class Ledger:
    """What one put carries besides its rows, in stream order after them.

    ``fast``: fast-state arrays (``FAST_COLUMNS``); ``positions``: full positions, each
    ``{"run_id", "step_index", "step_count", "cycle_index", "position"}``; ``steps`` and
    ``cycles``: rows for those tables (``STEP_COLUMNS``/``CYCLE_COLUMNS`` keys);
    ``gaps``: missed sample periods (:func:`labdaq.engine.gaps.gap_record` dicts).
    """

    fast: list[NDArray[np.float64]] = field(default_factory=list)
    positions: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    cycles: list[dict[str, Any]] = field(default_factory=list)
    gaps: list[dict[str, Any]] = field(default_factory=list)

    def extend(self, other: Ledger) -> None:
        self.fast += other.fast
        self.positions += other.positions
        self.steps += other.steps
        self.cycles += other.cycles
        self.gaps += other.gaps


@dataclass
class Records:
    """A batch's resolved ledger: progress rows by run (newest only), steps, cycles,
    gaps."""

    progress: dict[int, dict[str, Any]] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    cycles: list[dict[str, Any]] = field(default_factory=list)
    gaps: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.progress or self.steps or self.cycles or self.gaps)

    def extend(self, later: Records) -> None:
        self.progress.update(later.progress)
        self.steps += later.steps
        self.cycles += later.cycles
        self.gaps += later.gaps

    def only_runs(self, runs: set[Any]) -> Records:
        return Records(
            {k: v for k, v in self.progress.items() if k in runs},
            [s for s in self.steps if s["run_id"] in runs],
            [c for c in self.cycles if c["run_id"] in runs],
            [g for g in self.gaps if g["run_id"] in runs],
        )

    def to_json(self) -> bytes:
        return json.dumps(
            {"progress": list(self.progress.values()), "steps": self.steps,
             "cycles": self.cycles, "gaps": self.gaps}, default=_plain,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Records:
        d = json.loads(data)
        return cls({int(p["run_id"]): p for p in d["progress"]}, d["steps"], d["cycles"],
                   d.get("gaps", []))


def position_json(position: dict[str, Any]) -> str:
    """A position as JSON text, as ``json.dumps`` writes it.

    orjson writes it about ten times faster (every commit writes one per run in it:
    docs/performance.md). orjson writes a NaN as null where ``json.dumps`` writes NaN, and
    a position holds no null of its own, so a null in orjson's text sends the position
    to ``json.dumps``, keeping any NaN as it was.
    """
    text = orjson.dumps(position, default=_plain,
                        option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    if b"null" in text:
        return json.dumps(position, default=_plain)
    return text.decode()


def _plain(obj: Any) -> Any:
    item = getattr(obj, "item", None)  # numpy scalars
    if callable(item):
        return item()
    raise TypeError(f"{type(obj).__name__} is not JSON")


class Resolver:
    """Turns ledgers into records, batch by batch in stream order (see module docstring).

    Remembers each run's newest full position across batches: a batch that only carries
    fast state of a run continues from it.
    """

    def __init__(self) -> None:
        self._full: dict[int, dict[str, Any]] = {}

    def resolve(self, ledger: Ledger | None) -> Records:
        out = Records()
        if ledger is None:
            return out
        changed: set[int] = set()
        for p in ledger.positions:
            rid = int(p["run_id"])
            self._full[rid] = p
            changed.add(rid)
        newest: dict[int, list[float]] = {}
        if ledger.fast:
            fast = ledger.fast[0] if len(ledger.fast) == 1 else np.concatenate(ledger.fast)
            # The newest row of each run: the one with the highest seq (seq only grows).
            order = np.lexsort((fast[:, _SEQ], fast[:, _RUN]))
            fast = fast[order]
            last = np.r_[fast[1:, _RUN] != fast[:-1, _RUN], True]
            for row in fast[last].tolist():  # Python floats: no numpy scalar per field
                newest[int(row[_RUN])] = row
        clock = wallclock.snapshot()  # the wall clock now, against the boot clock
        for rid in changed | newest.keys():
            full = self._full.get(rid)
            if full is None:
                continue  # never happens: a run joins with a full position
            pos = dict(full["position"])
            row = newest.get(rid)
            if row is not None and row[_SEQ] > pos["seq"]:
                pos["seq"], pos["t_s"] = int(row[_SEQ]), row[_T]
                pos.update(zip(_STEP_FIELDS, row[3:6], strict=True))
                cyc = dict(pos["cycle"])
                cyc.update(zip(_CYCLE_FIELDS, row[6:], strict=True))
                pos["cycle"] = cyc
            pos[wallclock.KEY] = clock
            out.progress[rid] = {
                "run_id": rid,
                "step_index": int(full["step_index"]),
                "step_count": int(full["step_count"]),
                "cycle_index": int(full["cycle_index"]),
                "elapsed_s": float(pos["t_s"]),
                "last_seq": int(pos["seq"]),
                "position": pos,
            }
        out.steps = list(ledger.steps)
        out.cycles = list(ledger.cycles)
        out.gaps = list(ledger.gaps)
        return out

    def forget(self, run_ids: Sequence[int]) -> None:
        for rid in run_ids:
            self._full.pop(rid, None)


# -- SQL ----------------------------------------------------------------------------------
def _ph(paramstyle: str, n: int) -> list[str]:
    if paramstyle == "numeric_dollar":
        return [f"${i}" for i in range(1, n + 1)]
    if paramstyle in ("format", "pyformat"):
        return ["%s"] * n
    return ["?"] * n


def _insert(table: str, cols: Sequence[str], conflict: str, paramstyle: str) -> str:
    return (
        f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(_ph(paramstyle, len(cols)))})"
        f" ON CONFLICT ({conflict}) DO NOTHING"
    )


@dataclass(frozen=True)
class RecordSql:
    """The statements that write Records, in one dialect's parameter style."""

    steps: str
    cycles: str
    progress: str
    gap_events: str
    missed_totals: str
    # asyncpg takes a datetime for a timestamp; SQLite stores SQLAlchemy's text form.
    native_datetime: bool = False

    @classmethod
    def for_paramstyle(cls, paramstyle: str) -> RecordSql:
        ph = _ph(paramstyle, len(PROGRESS_COLUMNS))
        sets = ", ".join(f"{c} = {p}" for c, p in zip(PROGRESS_COLUMNS[:-1], ph, strict=False))
        ph2 = _ph(paramstyle, 2)
        return cls(
            steps=_insert("steps", STEP_COLUMNS, "run_id, step_number", paramstyle),
            cycles=_insert("cycles", CYCLE_COLUMNS, "run_id, cycle_index", paramstyle),
            # Unique per (run, kind, seq) where seq is set (models.Event): a replayed
            # batch does not record its gap twice.
            gap_events=_insert("events", GAP_EVENT_COLUMNS, "run_id, kind, seq", paramstyle)
            .replace(" DO NOTHING", " WHERE seq IS NOT NULL DO NOTHING"),
            # The run's total after the gap (absolute: a replay writes the same value).
            missed_totals=f"UPDATE runs SET missed_periods = {ph2[0]} WHERE id = {ph2[1]}",
            native_datetime=paramstyle == "numeric_dollar",
            # A position built just before its run ended must not overwrite the final record.
            progress=f"UPDATE runs SET {sets} WHERE id = {ph[-1]} "
            "AND state IN ('running', 'paused')",
        )

    def params(self, rec: Records) -> list[tuple[str, list[tuple[Any, ...]]]]:
        """(statement, parameter tuples) pairs to execute, steps and cycles first."""
        out: list[tuple[str, list[tuple[Any, ...]]]] = []
        if rec.steps:
            out.append((self.steps, [tuple(s.get(c) for c in STEP_COLUMNS) for s in rec.steps]))
        if rec.cycles:
            out.append((self.cycles, [
                tuple(bool(c.get(k)) if k == "spans_gap" else c.get(k) for k in CYCLE_COLUMNS)
                for c in rec.cycles
            ]))
        if rec.progress:
            out.append((self.progress, [
                tuple(position_json(p[c]) if c == "position" else p[c]
                      for c in PROGRESS_COLUMNS)
                for p in rec.progress.values()
            ]))
        if rec.gaps:
            out.append((self.gap_events, [self._gap_event(g) for g in rec.gaps]))
            out.append((self.missed_totals,
                        [(int(g["total"]), int(g["run_id"])) for g in rec.gaps]))
        return out

    def _gap_event(self, g: dict[str, Any]) -> tuple[Any, ...]:
        ts = datetime.fromtimestamp(float(g["ts_utc"]), UTC)
        data = {k: g[k] for k in ("count", "t_from_s", "t_to_s", "period_s", "seq", "cause")}
        return (
            int(g["run_id"]),
            # SQLAlchemy's SQLite DateTime text form (UTC, as models.utcnow writes it).
            ts if self.native_datetime else ts.strftime("%Y-%m-%d %H:%M:%S.%f"),
            EVENT_KIND,
            "warning",
            f"{g['count']} sample period(s) missed, t {g['t_from_s']:.3f}–{g['t_to_s']:.3f} s "
            f"(before sample {g['seq']})",
            json.dumps(data, default=_plain),
            int(g["seq"]),
        )
