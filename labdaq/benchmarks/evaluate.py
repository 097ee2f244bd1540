"""Judge a run against the catalogue entries its protocol serves.

For each applicable entry (the entry names the run's protocol template) every criterion
gets a value computed from the run's stored data (labdaq.analysis), a technician's
observation, or a reason why it cannot be judged; then a verdict:

* ``pass`` / ``fail`` — the value against the limit, by the decision rule named with it;
* ``provisional`` — the same comparison, but the limit is still ``to_verify`` against the
  purchased standard (the outcome is kept in ``outcome``);
* ``not_evaluable`` — with the reason (an observation is missing, the data lack a tagged
  step, the value lies within the measurement uncertainty of the limit under the guarded
  rule, equipment labdaq does not log ...);
* ``reported`` — measurement-method criteria (IEC 62660-1 and the like) carry values,
  never verdicts.

Decision rules, after ILAC-G8:09/2019: *simple acceptance* compares the measured value
with the limit and reports the uncertainty beside it; *guarded acceptance* (guard band
w = U) passes only a value that clears the limit by its expanded uncertainty and fails
only one that misses it by as much. The uncertainty comes from the channel's accuracy
(:class:`ChannelAccuracy`), when it is known; the calibration status is reported with
every entry from labdaq's calibration records (labdaq.calibrations): calibrated, expired
or missing on the day the run started.

An entry's verdict: ``fail`` if a confirmed criterion fails; otherwise ``not_evaluable``
if any criterion is; otherwise ``provisional`` if any is; otherwise ``pass`` (``reported``
when it has only report criteria). Nothing here reads the database: :mod:`.rundata`
builds the :class:`RunData` from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from labdaq.analysis import (
    capacity_retention,
    cell_state_at,
    pulse_resistances,
    rest_current_for,
    summarise_cycles,
)
from labdaq.analysis.cycles import CycleSummary
from labdaq.benchmarks.catalogue import (
    METRICS,
    Catalogue,
    Criterion,
    Entry,
    shipped_catalogue,
)
from labdaq.protocol import CellLimits, ResolvedProtocol

__all__ = [
    "ChannelAccuracy",
    "RunData",
    "CriterionResult",
    "EntryResult",
    "NotEvaluable",
    "RunView",
    "evaluate_run",
    "ocv_of",
    "SIMPLE",
    "GUARDED",
]

Verdict = Literal["pass", "fail", "provisional", "not_evaluable", "reported"]
Rule = Literal["simple", "guarded"]

SIMPLE = ("simple acceptance (ILAC-G8:09/2019 §4.2.1): the measured value is compared "
          "with the limit; its uncertainty is reported beside it, not subtracted")
GUARDED = ("guarded acceptance (ILAC-G8:09/2019 §4.2.2), guard band w = U (k = 2): pass "
           "only if the value clears the limit by U, fail only if it misses it by U")
OBSERVED = "observation recorded by a technician"
CALIBRATION_MISSING = "not_evaluable: labdaq holds no calibration records for the channel"

# Steps the stress of a clause happens in (tags of the clause templates).
STRESS_TAGS = ("cv_hold", "short", "stress", "hold", "overcharge", "forced_discharge")


@dataclass(frozen=True)
class ChannelAccuracy:
    """Expanded (k = 2) accuracy of the channel: relative for V and I, absolute for T."""

    voltage_rel: float
    current_rel: float
    temperature_c: float


@dataclass
class StepData:
    step_index: int
    kind: str
    start_t_s: float
    end_t_s: float
    end_reason: str
    capacity_ah: float
    tag: str | None


@dataclass
class RunData:
    """Everything an evaluation reads about one run (built by :mod:`.rundata`)."""

    run_id: int | None
    plan: ResolvedProtocol
    samples: dict[str, np.ndarray]
    steps: list[StepData]
    spectra: list[dict[str, Any]] = field(default_factory=list)
    # Technician's observations and numbers from other equipment, by metric name.
    observations: dict[str, float | bool] = field(default_factory=dict)
    # The cell's datasheet ratings when the run was registered with other limits (an
    # abuse envelope); default: the limits the plan was resolved for.
    rated: CellLimits | None = None
    accuracy: ChannelAccuracy | None = None
    calibrated: bool = False
    # The channel's calibration status as reported (labdaq.calibrations.status_of_run);
    # None: from ``calibrated`` alone.
    calibration: str | None = None
    # Datasheet cycle count at which capacity retention is judged.
    spec_cycles: int | None = None
    # Identity for reports: cell, channel, instrument, run state and times.
    meta: dict[str, Any] = field(default_factory=dict)
    # UN 38.3 T.1-T.4: the OCV of the check run immediately before the stress, when this
    # run is the check after it (see ocv_of).
    ocv_before_v: float | None = None
    # An imported run (labdaq.imports) has no labdaq plan: its entries are those of the
    # template declared for it (``template``; None: none declared, and ``template_note``
    # says so). Built by labdaq.imports.template.run_template.
    imported: bool = False
    template: str | None = None
    template_note: str | None = None

    @property
    def protocol(self) -> str | None:
        """The protocol name the catalogue entries are picked by: the plan's, or an
        imported run's declared template (None: it has none)."""
        return self.template if self.imported else self.plan.name

    @property
    def cell(self) -> CellLimits:
        return self.rated or self.plan.cell


class NotEvaluable(Exception):
    """A criterion cannot be judged from this run; the message says why."""


@dataclass(frozen=True)
class Measured:
    value: float | bool | dict[str, float]
    uncertainty: float | None = None
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class CriterionResult:
    metric: str
    comparison: str
    limit: float | bool | None
    unit: str
    kind: str
    confidence: str
    verdict: Verdict
    outcome: Literal["pass", "fail"] | None = None
    value: float | bool | dict[str, float] | None = None
    uncertainty: float | None = None
    decision_rule: str | None = None
    reason: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class EntryResult:
    entry_id: str
    title: str
    standard: str
    clause: str
    designations: list[str]
    jurisdictions: list[str]
    verdict: Verdict
    criteria: list[CriterionResult]
    calibration: str
    run_id: int | None

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["criteria"] = [dict(c.__dict__) for c in self.criteria]
        return out


# --------------------------------------------------------------------------- context


class RunView:
    """Lazily computed views of one run's data, shared by the metric functions and the
    report (the cycle summary is computed once)."""

    def __init__(self, run: RunData) -> None:
        self.run = run
        s = run.samples
        self.t, self.v, self.i = s["t_s"], s["voltage_v"], s["current_a"]
        self.si = s["step_index"]
        self._cycles: CycleSummary | None = None

    @property
    def cycles(self) -> CycleSummary:
        if self._cycles is None:
            cell = self.run.plan.cell
            s = self.run.samples
            self._cycles = summarise_cycles(
                s["t_s"], s["voltage_v"], s["current_a"], s["cycle_index"],
                flags=s.get("flags"), charge_cutoff_v=cell.charge_cutoff_v,
                discharge_cutoff_v=cell.discharge_cutoff_v,
                rest_current_a=rest_current_for(cell.capacity_ah))
        return self._cycles

    def tagged(self, *tags: str) -> list[StepData]:
        return [st for st in self.run.steps if st.tag in tags]

    def one_tagged(self, *tags: str) -> StepData:
        found = self.tagged(*tags)
        if not found:
            raise NotEvaluable(f"the run has no step tagged {' or '.join(tags)}")
        return found[0]

    def in_step(self, st: StepData) -> np.ndarray:
        return (self.si == st.step_index) & (self.t >= st.start_t_s - 1e-9) & (
            self.t <= st.end_t_s + 1e-9)

    def step_charge_ah(self, st: StepData) -> float:
        """|Ah| moved in the step, integrated from the samples (intervals ending in it)."""
        sel = np.flatnonzero(self.in_step(st))
        sel = sel[sel > 0]
        dq = 0.5 * (self.i[sel] + self.i[sel - 1]) * (self.t[sel] - self.t[sel - 1]) / 3600
        return float(abs(dq.sum()))

    def step_current(self, st: StepData) -> float:
        sel = self.in_step(st)
        cur = self.i[sel]
        cur = cur[np.abs(cur) > 1e-4]
        if cur.size == 0:
            raise NotEvaluable(f"no current in the step tagged {st.tag}")
        return float(np.median(cur))

    def state_before(self, st: StepData) -> str:
        first = np.flatnonzero(self.in_step(st))
        if first.size == 0:
            raise NotEvaluable(f"no samples in the step tagged {st.tag}")
        cell = self.run.plan.cell
        return cell_state_at(self.v, self.i, int(first[0]) - 1,
                             charge_cutoff_v=cell.charge_cutoff_v,
                             discharge_cutoff_v=cell.discharge_cutoff_v)

    def rel(self, value: float, which: str) -> float | None:
        acc = self.run.accuracy
        if acc is None:
            return None
        return abs(value) * (acc.current_rel if which == "current" else acc.voltage_rel)


def _ev(st: StepData) -> dict[str, Any]:
    return {"steps": [st.step_index], "t_s": [st.start_t_s, st.end_t_s], "tag": st.tag}


# --------------------------------------------------------------------------- metrics


def _case_temperature_max(c: RunView) -> Measured:
    temp = c.run.samples.get("temperature_c")
    if temp is None or not np.isfinite(temp).any():
        raise NotEvaluable("no temperature was logged")
    k = int(np.nanargmax(temp))
    acc = c.run.accuracy
    return Measured(float(temp[k]), acc.temperature_c if acc else None,
                    {"t_s": [float(c.t[0]), float(c.t[-1])], "max_at_t_s": float(c.t[k])})


def _soak_temperature(c: RunView) -> Measured:
    st = c.one_tagged("soak")
    temp = c.run.samples["temperature_c"][c.in_step(st)]
    if temp.size == 0 or not np.isfinite(temp).any():
        raise NotEvaluable("no temperature logged during the soak")
    acc = c.run.accuracy
    return Measured(float(np.nanmin(temp[-max(1, temp.size // 10):])),
                    acc.temperature_c if acc else None, _ev(st))


def _duration_h(*tags: str) -> Callable[[RunView], Measured]:
    def f(c: RunView) -> Measured:
        st = c.one_tagged(*tags)
        return Measured((st.end_t_s - st.start_t_s) / 3600.0, None, _ev(st))
    return f


def _current_ratio(tag: str, of: str) -> Callable[[RunView], Measured]:
    def f(c: RunView) -> Measured:
        st = c.one_tagged(tag)
        cur = abs(c.step_current(st))
        cell = c.run.cell
        base = {"max_charge": cell.max_charge_current_a,
                "max_discharge": cell.max_discharge_current_a,
                "it": cell.capacity_ah}[of]
        if not base:
            raise NotEvaluable("the cell has no rated capacity")
        unc = c.rel(cur, "current")
        return Measured(cur / base, None if unc is None else unc / base, _ev(st))
    return f


def _start_state(want: str) -> Callable[[RunView], Measured]:
    def f(c: RunView) -> Measured:
        tagged = c.tagged(*STRESS_TAGS)
        if not tagged:
            raise NotEvaluable("the run has no stress step to check the start state of")
        st = tagged[0]
        state = c.state_before(st)
        return Measured(state == want, None, {**_ev(st), "state": state})
    return f


def _capacity_step(c: RunView) -> tuple[float, StepData]:
    st = c.one_tagged("capacity_check")
    if st.end_reason not in ("voltage_below", "voltage_above"):
        raise NotEvaluable(f"the capacity check ended on {st.end_reason}, not the cut-off")
    return c.step_charge_ah(st), st


def _discharge_capacity(c: RunView) -> Measured:
    q, st = _capacity_step(c)
    return Measured(q, c.rel(q, "current"), _ev(st))


def _capacity_over_rated(c: RunView) -> Measured:
    q, st = _capacity_step(c)
    rated = c.run.cell.capacity_ah
    if not rated:
        raise NotEvaluable("the cell has no rated capacity")
    unc = c.rel(q, "current")
    return Measured(q / rated, None if unc is None else unc / rated, _ev(st))


def _capacity_over_reference(c: RunView) -> Measured:
    """Discharge capacity of each step tagged ``capacity_<T>c`` over the 25 °C one."""
    caps = {st.tag: c.step_charge_ah(st) for st in c.run.steps
            if st.tag and st.tag.startswith("capacity_") and st.tag.endswith("c")
            and st.end_reason in ("voltage_below", "voltage_above")}
    ref = caps.get("capacity_25c")
    if not ref:
        raise NotEvaluable("no complete capacity check at 25 °C (tag capacity_25c)")
    return Measured({k: v / ref for k, v in caps.items()}, None,
                    {"capacity_ah": caps})


def _efficiency(which: str) -> Callable[[RunView], Measured]:
    def f(c: RunView) -> Measured:
        cy = c.cycles
        ok = cy.efficiency_valid
        if not ok.any():
            raise NotEvaluable("no complete cycle that started and ended at a defined state "
                               "(full or empty)")
        values = getattr(cy, which)[ok]
        return Measured(float(values.mean()), None,
                        {"cycles": cy.cycle_index[ok].tolist(),
                         "excluded": {int(k): str(n) for k, n in
                                      zip(cy.cycle_index[~ok], cy.note[~ok], strict=True)}})
    return f


def _dcir(c: RunView) -> Measured:
    pulses = [st for st in c.run.steps if st.kind == "pulse"]
    if not pulses:
        raise NotEvaluable("the run has no pulse steps")
    res = pulse_resistances(c.t, c.v, c.i, c.si, steps=[st.step_index for st in pulses])
    # Mean edge resistance per pulse tag (e.g. dcir_soc90: its discharge and charge pulse).
    edges: dict[str, list[float]] = {}
    for st in pulses:
        sel = (res.t_s >= st.start_t_s) & (res.t_s <= st.end_t_s)
        edges.setdefault(st.tag or f"step{st.step_index}", []).extend(
            res.resistance_ohm[sel].tolist())
    out = {k: float(np.mean(v)) for k, v in edges.items() if v}
    if not out:
        raise NotEvaluable("no current steps found in the pulse steps")
    return Measured(out, None, {"steps": sorted({st.step_index for st in pulses})})


def _pulse_power(c: RunView) -> Measured:
    pulses = [st for st in c.run.steps if st.kind == "pulse"]
    if not pulses:
        raise NotEvaluable("the run has no pulse steps")
    out: dict[str, float] = {}
    for st in pulses:
        sel = np.flatnonzero(c.in_step(st) & (c.i < -1e-4))
        if sel.size:
            k = sel[-1]  # the last reading of the (first) discharge pulse
            out.setdefault(st.tag or f"step{st.step_index}", float(abs(c.v[k] * c.i[k])))
    if not out:
        raise NotEvaluable("no discharge pulses")
    return Measured(out, None, {"steps": sorted({st.step_index for st in pulses})})


def _acir(c: RunView) -> Measured:
    out: dict[str, float] = {}
    for k, sp in enumerate(c.run.spectra):
        f = np.asarray(sp["frequency_hz"], float)
        j = int(np.argmin(np.abs(np.log(f / 1000.0))))
        if abs(f[j] / 1000.0 - 1) <= 0.05:
            out[sp.get("tag") or f"spectrum{k + 1}"] = float(sp["z_real_ohm"][j])
    if not out:
        raise NotEvaluable("no spectrum with a point at 1 kHz")
    return Measured(out, None, {"spectra": len(c.run.spectra)})


def _retention(c: RunView) -> Measured:
    n = c.run.spec_cycles
    if n is None:
        raise NotEvaluable("needs the datasheet's cycle count (spec_cycles) to judge at")
    ret = capacity_retention(c.cycles)
    sel = np.flatnonzero(ret.cycle_index <= n)
    if ret.cycle_index.size == 0 or ret.cycle_index.max() < n:
        raise NotEvaluable(f"the run has no full discharge at cycle {n}")
    k = sel[-1]
    return Measured(float(ret.retention[k]), None,
                    {"cycles": ret.cycle_index[: k + 1].tolist(),
                     "reference_ah": ret.reference_ah})


def _cycles_to_80(c: RunView) -> Measured:
    ret = capacity_retention(c.cycles)
    if ret.cycles_to_80pct is None:
        raise NotEvaluable("the capacity never fell below 80 % of the first full discharge")
    return Measured(float(ret.cycles_to_80pct), None,
                    {"cycles": ret.cycle_index.tolist(),
                     "fade_pct_per_cycle": ret.fade_pct_per_cycle})


def _ratio_of_tags(num: str, den: str) -> Callable[[RunView], Measured]:
    def f(c: RunView) -> Measured:
        a, b = c.one_tagged(num), c.one_tagged(den)
        qa, qb = c.step_charge_ah(a), c.step_charge_ah(b)
        if qb <= 0:
            raise NotEvaluable(f"no capacity in the step tagged {den}")
        return Measured(qa / qb, None, {"steps": [b.step_index, a.step_index]})
    return f


def _c3_cycles(c: RunView) -> Measured:
    cy = c.cycles
    rated = c.run.cell.capacity_ah
    if not rated:
        raise NotEvaluable("the cell has no rated capacity")
    count = 0
    used = []
    for k, ci in enumerate(cy.cycle_index.tolist()):
        if not cy.full_discharge[k]:
            continue
        sel = (c.run.samples["cycle_index"] == ci) & (c.i < -1e-4)
        if sel.any() and abs(abs(float(np.median(c.i[sel]))) / rated - 1 / 3) < 0.05:
            count += 1
            used.append(ci)
    return Measured(float(count), None, {"cycles": used})


def ocv_of(run: RunData) -> float:
    """The OCV a check run measured: its last reading in the step tagged ``ocv``."""
    c = RunView(run)
    sel = np.flatnonzero(c.in_step(c.one_tagged("ocv")))
    if sel.size == 0 or np.any(np.abs(c.i[sel]) > 1e-4):
        raise NotEvaluable("the OCV step has no readings at open circuit")
    return float(c.v[sel[-1]])


def _ocv_ratio(c: RunView) -> Measured:
    before = c.run.ocv_before_v
    if before is None:
        raise NotEvaluable("needs the OCV runs immediately before and after the stress: "
                           "evaluate the after-run with the before-run's OCV")
    after = ocv_of(c.run)
    acc = c.run.accuracy
    # Both readings carry the relative voltage accuracy; they add for a ratio.
    unc = None if acc is None else 2 * acc.voltage_rel * after / before
    st = c.one_tagged("ocv")
    return Measured(after / before, unc, {**_ev(st), "ocv_before_v": before,
                                          "ocv_after_v": after})


METRIC_FUNCS: dict[str, Callable[[RunView], Measured]] = {
    "case_temperature_max_c": _case_temperature_max,
    "soak_temperature_c": _soak_temperature,
    "soak_duration_h": _duration_h("soak"),
    "test_duration_h": _duration_h("overcharge", "forced_discharge"),
    "cv_hold_duration_h": _duration_h("cv_hold"),
    "charge_current_over_max_continuous": _current_ratio("overcharge", "max_charge"),
    "discharge_current_over_max": _current_ratio("forced_discharge", "max_discharge"),
    "charge_current_over_it": _current_ratio("overcharge", "it"),
    "reverse_current_over_it": _current_ratio("forced_discharge", "it"),
    "start_state_full": _start_state("full"),
    "start_state_empty": _start_state("empty"),
    "discharge_capacity_ah": _discharge_capacity,
    "capacity_over_rated": _capacity_over_rated,
    "capacity_over_reference": _capacity_over_reference,
    "energy_efficiency": _efficiency("energy_efficiency"),
    "coulombic_efficiency": _efficiency("coulombic_efficiency"),
    "dcir_ohm": _dcir,
    "pulse_power_w": _pulse_power,
    "acir_1khz_ohm": _acir,
    "capacity_retention": _retention,
    "cycles_to_80pct": _cycles_to_80,
    "charge_retention": _ratio_of_tags("retained_capacity", "capacity_check"),
    "charge_recovery": _ratio_of_tags("recovered_capacity", "capacity_check"),
    "cycles_at_c3_recorded": _c3_cycles,
    "ocv_ratio_after_before": _ocv_ratio,
}


# --------------------------------------------------------------------------- verdicts


def _compare(value: float | bool, comparison: str, limit: float | bool, margin: float) -> bool:
    """value meets the limit with ``margin`` on the safe side (0 = simple)."""
    if comparison == "==":
        return value == limit
    v, lim = float(value), float(limit)
    if comparison == ">=":
        return v - margin >= lim
    if comparison == ">":
        return v - margin > lim
    if comparison == "<=":
        return v + margin <= lim
    if comparison == "<":
        return v + margin < lim
    raise ValueError(comparison)


def _judge(cr: Criterion, c: RunView, rule: Rule) -> CriterionResult:
    out = CriterionResult(metric=cr.metric, comparison=cr.comparison,
                          limit=cr.value, unit=cr.unit, kind=cr.kind,
                          confidence=cr.confidence, verdict="not_evaluable")
    source = METRICS[cr.metric]["source"]
    try:
        if cr.metric in c.run.observations:
            m = Measured(c.run.observations[cr.metric], None, {"observation": True})
            out.decision_rule = OBSERVED
        elif source == "observation":
            raise NotEvaluable(f"needs a technician's observation: {METRICS[cr.metric]['what']}")
        elif source == "external":
            raise NotEvaluable(f"needs a measurement labdaq does not log: "
                               f"{METRICS[cr.metric]['what']}")
        else:
            m = METRIC_FUNCS[cr.metric](c)
    except NotEvaluable as exc:
        out.reason = str(exc)
        return out
    out.value, out.uncertainty, out.evidence = m.value, m.uncertainty, m.evidence
    if cr.comparison == "report":
        out.verdict = "reported"
        return out
    if isinstance(m.value, dict):
        out.reason = "a value per point: no single verdict"
        return out
    limit = cr.value
    if limit is None and cr.bands and cr.band_quantity in c.run.observations:
        # A banded limit (UN 38.3 mass loss by cell mass): the band the quantity is in.
        q = float(c.run.observations[cr.band_quantity])
        for band in cr.bands:
            if (band.lower is None or q >= band.lower) and (band.upper is None
                                                            or q < band.upper):
                limit = band.value
        out.limit = limit
        out.evidence = {**out.evidence, cr.band_quantity: q}
    if limit is None:
        out.reason = f"the limit depends on {cr.band_quantity}, which is not on record"
        return out
    if out.decision_rule is None:
        guarded = rule == "guarded" and m.uncertainty is not None
        out.decision_rule = GUARDED if guarded else SIMPLE
        if guarded:
            u = float(m.uncertainty or 0.0)
            if _compare(m.value, cr.comparison, limit, u):
                outcome: Literal["pass", "fail"] = "pass"
            elif not _compare(m.value, cr.comparison, limit, -u):
                outcome = "fail"
            else:
                out.reason = "within the measurement uncertainty of the limit"
                return out
        else:
            outcome = "pass" if _compare(m.value, cr.comparison, limit, 0.0) else "fail"
    else:
        outcome = "pass" if _compare(m.value, cr.comparison, limit, 0.0) else "fail"
    out.outcome = outcome
    out.verdict = outcome if cr.confidence == "seen" else "provisional"
    return out


def _entry_verdict(results: list[CriterionResult]) -> Verdict:
    if any(r.verdict == "fail" for r in results):
        return "fail"
    if any(r.verdict == "not_evaluable" for r in results):
        return "not_evaluable"
    if any(r.verdict == "provisional" for r in results):
        return "provisional"
    if all(r.verdict == "reported" for r in results):
        return "reported"
    return "pass"


def applicable_entries(catalogue: Catalogue, protocol: str | None) -> list[Entry]:
    """Entries whose data the protocol template produces (none without a protocol)."""
    if protocol is None:
        return []
    return [e for e in catalogue.entries if e.protocol == protocol]


def evaluate_run(run: RunData, catalogue: Catalogue | None = None,
                 entries: list[str] | None = None, rule: Rule = "simple",
                 ) -> list[EntryResult]:
    """Verdicts for the entries the run's protocol serves (or the ``entries`` given)."""
    cat = catalogue or shipped_catalogue()
    chosen = ([cat.get(e) for e in entries] if entries is not None
              else applicable_entries(cat, run.protocol))
    ctx = RunView(run)
    out = []
    for e in chosen:
        results = [_judge(cr, ctx, rule) for cr in e.criteria]
        out.append(EntryResult(
            entry_id=e.id, title=e.title, standard=e.standard, clause=e.clause,
            designations=[d.designation for d in e.designations],
            jurisdictions=list(e.jurisdictions), verdict=_entry_verdict(results),
            criteria=results,
            calibration=run.calibration or (
                "calibrated" if run.calibrated else CALIBRATION_MISSING),
            run_id=run.run_id,
        ))
    return out
