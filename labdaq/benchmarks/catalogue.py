"""The benchmark catalogue: test clauses of the standards Indian and Canadian labs share,
as data (``seeds/benchmarks/*.yaml``), validated by the pydantic schema here.

One entry is one judgeable clause (or one measurement a clause asks for): the standard,
edition and clause; the equivalent designations in each jurisdiction (IEC 62133-2:2017 ≡
IS 16046 (Part 2):2018 ≡ CAN/CSA-C22.2 No. 62133-2 ...); what is measured; the
conditions; the criteria (metric, comparison, value, unit); the protocol template in
``seeds/protocols/`` that produces the data; and for every number its source and a
confidence flag — ``seen`` (read in the cited public source) or ``to_verify`` (not yet
checked against the purchased standard; an evaluation must report such a verdict as
provisional). The standards are paywalled, so the catalogue says where each number comes
from instead of pretending to be the standard.

Why data and not code: a lab adds a clause, corrects a number or confirms a ``to_verify``
against its copy of the standard by editing YAML, and a review sees exactly which number
changed and on what authority.

``sources.yaml`` lists the cited sources; every other file holds ``entries``. Metric names
come from :data:`METRICS`, so an evaluator knows what to compute for each criterion and
the unit is fixed once.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "METRICS",
    "Jurisdiction",
    "Confidence",
    "Source",
    "Designation",
    "Condition",
    "Band",
    "Criterion",
    "Accuracy",
    "Entry",
    "Catalogue",
    "CatalogueError",
    "load_catalogue",
    "shipped_catalogue",
    "parse_catalogue",
]

Jurisdiction = Literal["IN", "CA"]
#: ``seen``: the number was read in the cited public source. ``to_verify``: from a
#: secondary summary, memory or an edition that may differ — confirm against the
#: purchased standard before a verdict on it is more than provisional.
Confidence = Literal["seen", "to_verify"]
Comparison = Literal[">=", "<=", ">", "<", "==", "report"]
CriterionKind = Literal["measured", "condition", "observation", "report"]

#: Every metric a criterion may name: its unit and where its value comes from.
#: ``analysis``: computed from stored samples/spectra by labdaq.analysis;
#: ``observation``: recorded by a technician (no fire, no leakage ...);
#: ``external``: needs equipment labdaq does not log (balance, megohmmeter, press).
METRICS: dict[str, dict[str, str]] = {
    "ocv_ratio_after_before": {"unit": "ratio", "source": "analysis",
                               "what": "OCV after the test / OCV immediately before"},
    "mass_loss_pct": {"unit": "%", "source": "external",
                      "what": "mass loss over the test (balance)"},
    "case_temperature_max_c": {"unit": "degC", "source": "analysis",
                               "what": "highest case temperature during the test and "
                                       "the observation period"},
    "soak_temperature_c": {"unit": "degC", "source": "analysis",
                           "what": "case or chamber temperature at the end of the soak"},
    "soak_duration_h": {"unit": "h", "source": "analysis",
                        "what": "time held at the soak temperature before the test"},
    "charge_current_over_max_continuous": {
        "unit": "ratio", "source": "analysis",
        "what": "applied charge current / the cell's maximum continuous charge current"},
    "discharge_current_over_max": {
        "unit": "ratio", "source": "analysis",
        "what": "applied (reverse) discharge current / the cell's maximum discharge current"},
    "charge_current_over_it": {"unit": "ratio", "source": "analysis",
                               "what": "applied charge current / ItA (rated capacity / 1 h)"},
    "reverse_current_over_it": {"unit": "ratio", "source": "analysis",
                                "what": "applied reverse-charge current / ItA"},
    "test_duration_h": {"unit": "h", "source": "analysis",
                        "what": "duration of the stress step"},
    "cv_hold_duration_h": {"unit": "h", "source": "analysis",
                           "what": "duration of the constant-voltage hold"},
    "start_state_full": {"unit": "bool", "source": "analysis",
                         "what": "the stress started from a full (CC-CV charged) cell"},
    "start_state_empty": {"unit": "bool", "source": "analysis",
                          "what": "the stress started from a discharged cell"},
    "no_fire_explosion": {"unit": "bool", "source": "observation",
                          "what": "no fire and no explosion (observed)"},
    "no_fire_explosion_leakage": {"unit": "bool", "source": "observation",
                                  "what": "no fire, explosion or leakage (observed)"},
    "no_leak_vent_disassembly_rupture_fire": {
        "unit": "bool", "source": "observation",
        "what": "no leakage, venting, disassembly, rupture or fire (observed)"},
    "no_disassembly_fire": {"unit": "bool", "source": "observation",
                            "what": "no disassembly and no fire (observed, incl. the "
                                    "observation period)"},
    "insulation_resistance_mohm": {"unit": "MOhm", "source": "external",
                                   "what": "insulation resistance at 500 V DC"},
    "discharge_capacity_ah": {"unit": "Ah", "source": "analysis",
                              "what": "discharge capacity of the tagged check"},
    "capacity_over_rated": {"unit": "ratio", "source": "analysis",
                            "what": "measured discharge capacity / rated capacity"},
    "capacity_over_reference": {"unit": "ratio", "source": "analysis",
                                "what": "capacity at the condition / capacity at 25 °C"},
    "energy_efficiency": {"unit": "ratio", "source": "analysis",
                          "what": "discharge Wh / charge Wh of a complete cycle from a "
                                  "defined state"},
    "coulombic_efficiency": {"unit": "ratio", "source": "analysis",
                             "what": "discharge Ah / charge Ah of a complete cycle from a "
                                     "defined state"},
    "dcir_ohm": {"unit": "ohm", "source": "analysis",
                 "what": "DC internal resistance ΔV/ΔI over a current pulse"},
    "pulse_power_w": {"unit": "W", "source": "analysis",
                      "what": "power at the end of a 10 s pulse"},
    "acir_1khz_ohm": {"unit": "ohm", "source": "analysis",
                      "what": "real part of the impedance at 1 kHz"},
    "capacity_retention": {"unit": "ratio", "source": "analysis",
                           "what": "discharge capacity / the first valid cycle's"},
    "cycles_to_80pct": {"unit": "cycles", "source": "analysis",
                        "what": "cycles until the discharge capacity falls below 80 % "
                                "of the first valid cycle's"},
    "charge_retention": {"unit": "ratio", "source": "analysis",
                         "what": "capacity discharged after storage / capacity before"},
    "charge_recovery": {"unit": "ratio", "source": "analysis",
                        "what": "capacity after storage and a full recharge / before"},
    "cycles_at_c3_recorded": {"unit": "cycles", "source": "analysis",
                              "what": "complete C/3 charge-discharge cycles on record"},
    "instrument_accuracy": {"unit": "mixed", "source": "external",
                            "what": "channel accuracy from calibration records"},
}

UNITS = {"ratio", "%", "degC", "h", "s", "A", "V", "Ah", "Wh", "W", "ohm", "MOhm", "bool",
         "cycles", "kPa", "kN", "mohm", "g", "mixed", "Hz", "gn", "ms", "mm", "m"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    """A cited public source (the standards themselves are paywalled)."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    title: str
    url: str | None = None
    note: str | None = None


class _Sourced(_Strict):
    source: str
    confidence: Confidence


class Designation(_Sourced):
    """The same clause under another body's number (a national adoption)."""

    designation: str
    body: str
    jurisdictions: list[Jurisdiction] = Field(min_length=1)
    # identical: adopted without change; modified: national deviations; reference: the
    # standard points to it (e.g. TDG -> UN 38.3); unconfirmed: adoption not yet found.
    adoption: Literal["base", "identical", "modified", "reference", "unconfirmed"]


class Condition(_Sourced):
    """One test condition: a value (± tolerance) or a range, with its unit."""

    quantity: str
    unit: str
    value: float | None = None
    tolerance: float | None = Field(default=None, ge=0)
    min: float | None = None
    max: float | None = None
    note: str | None = None

    @model_validator(mode="after")
    def _has_a_number(self) -> Condition:
        if self.value is None and self.min is None and self.max is None and self.note is None:
            raise ValueError("a condition needs value, min, max or a note")
        if self.unit not in UNITS:
            raise ValueError(f"unknown unit {self.unit!r}")
        return self


class Band(_Strict):
    """A criterion value that depends on another quantity (e.g. mass loss by cell mass):
    applies for ``lower <= quantity < upper``."""

    lower: float | None = None
    upper: float | None = None
    value: float


class Criterion(_Sourced):
    """``metric comparison value unit``; ``report`` criteria carry no limit (measurement
    methods such as IEC 62660-1 report values, not verdicts)."""

    metric: str
    comparison: Comparison
    value: float | bool | None = None
    bands: list[Band] | None = None
    band_quantity: str | None = None
    unit: str
    kind: CriterionKind
    note: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Criterion:
        known = METRICS.get(self.metric)
        if known is None:
            raise ValueError(f"unknown metric {self.metric!r}; add it to METRICS")
        if known["unit"] != self.unit:
            raise ValueError(f"metric {self.metric!r} is in {known['unit']!r}, not "
                             f"{self.unit!r}")
        if self.comparison == "report":
            if self.value is not None or self.bands:
                raise ValueError("a report criterion has no limit value")
        elif (self.value is None) == (self.bands is None):
            raise ValueError("give exactly one of value or bands")
        if self.bands is not None and not self.band_quantity:
            raise ValueError("bands need band_quantity")
        if self.kind == "observation" and known["source"] != "observation":
            raise ValueError(f"metric {self.metric!r} is not an observation")
        if isinstance(self.value, bool) and self.unit != "bool":
            raise ValueError("a true/false value needs unit bool")
        return self


class Accuracy(_Sourced):
    """Measurement accuracy the clause demands of the instruments."""

    quantity: Literal["voltage", "current", "temperature", "time", "mass", "dimension"]
    tolerance: float = Field(gt=0)
    unit: Literal["%", "degC"]


class Entry(_Strict):
    """One catalogue entry (a judgeable clause)."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    title: str
    standard: str
    edition: str
    clause: str
    designations: list[Designation] = Field(min_length=1)
    jurisdictions: list[Jurisdiction] = Field(min_length=1)
    measures: str
    conditions: list[Condition] = Field(default_factory=list)
    criteria: list[Criterion] = Field(min_length=1)
    accuracy: list[Accuracy] = Field(default_factory=list)
    # The template in seeds/protocols/ that produces the data (None: labdaq cannot).
    protocol: str | None = None
    # Equipment beyond cycler, chamber, logger and impedance meter the test needs.
    equipment: list[str] = Field(default_factory=list)
    # Why (part of) the entry cannot be judged from labdaq's data alone.
    not_evaluable_reason: str | None = None
    notes: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Entry:
        covered = {j for d in self.designations for j in d.jurisdictions}
        missing = set(self.jurisdictions) - covered
        if missing:
            raise ValueError(f"no designation for jurisdiction(s) {sorted(missing)}")
        if self.protocol is None and not self.not_evaluable_reason:
            raise ValueError("an entry without a protocol must say why (not_evaluable_reason)")
        return self

    def numbers(self) -> list[_Sourced]:
        """Everything in the entry that carries a source and a confidence flag."""
        return [*self.designations, *self.conditions, *self.criteria, *self.accuracy]

    @property
    def provisional(self) -> bool:
        """True if any criterion's number still has to be verified."""
        return any(c.confidence == "to_verify" for c in self.criteria)


class Catalogue(_Strict):
    """All entries plus the sources they cite."""

    sources: dict[str, Source]
    entries: list[Entry]

    @model_validator(mode="after")
    def _references(self) -> Catalogue:
        ids = [e.id for e in self.entries]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate entry ids {dupes}")
        problems = [
            f"{e.id}: unknown source {n.source!r}"
            for e in self.entries for n in e.numbers() if n.source not in self.sources
        ]
        # A number nobody saw in a source cannot claim to have been seen.
        problems += [
            f"{e.id}: a number from {n.source!r} must be confidence to_verify"
            for e in self.entries for n in e.numbers()
            if n.source == "memory" and n.confidence != "to_verify"
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def get(self, entry_id: str) -> Entry:
        for e in self.entries:
            if e.id == entry_id:
                return e
        raise KeyError(entry_id)

    def for_jurisdiction(self, jurisdiction: Jurisdiction) -> list[Entry]:
        return [e for e in self.entries if jurisdiction in e.jurisdictions]


class CatalogueError(ValueError):
    """The catalogue files do not validate; ``errors`` names file and location."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid benchmark catalogue: " + "; ".join(errors))


def parse_catalogue(documents: dict[str, Any]) -> Catalogue:
    """Validate ``{file name: parsed YAML}``: ``sources.yaml`` holds ``sources``, every
    other file ``entries``. Errors name the file and the entry."""
    errors: list[str] = []
    sources: dict[str, Source] = {}
    entries: list[Entry] = []
    for name, doc in sorted(documents.items()):
        if not isinstance(doc, dict):
            errors.append(f"{name}: expected a mapping")
            continue
        for k, raw in enumerate(doc.get("sources") or []):
            try:
                src = Source.model_validate(raw)
                sources[src.id] = src
            except ValidationError as exc:
                errors.append(f"{name}: sources[{k}]: {exc}")
        for k, raw in enumerate(doc.get("entries") or []):
            try:
                entries.append(Entry.model_validate(raw))
            except ValidationError as exc:
                where = raw.get("id", k) if isinstance(raw, dict) else k
                errors.append(f"{name}: entries[{where}]: {exc}")
        # ``x-`` keys hold YAML anchors shared by a file's entries (OpenAPI's convention).
        unknown = {k for k in doc if not str(k).startswith("x-")} - {"sources", "entries"}
        if unknown:
            errors.append(f"{name}: unknown top-level keys {sorted(unknown)}")
    if errors:
        raise CatalogueError(errors)
    try:
        return Catalogue(sources=sources, entries=entries)
    except ValidationError as exc:
        raise CatalogueError([str(exc)]) from exc


# libyaml's safe loader when PyYAML was built with it: the same documents, parsed in C.
_SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_catalogue(directory: Path | None = None) -> Catalogue:
    """Read every ``*.yaml`` of ``directory`` (default: the shipped seeds/benchmarks)."""
    root: Any = directory if directory is not None else (
        resources.files("labdaq.seeds") / "benchmarks")
    docs = {p.name: yaml.load(p.read_text(encoding="utf-8"), Loader=_SAFE_LOADER)  # noqa: S506 - a safe loader
            for p in root.iterdir() if p.name.endswith(".yaml")}
    return parse_catalogue(docs)


@functools.cache
def shipped_catalogue() -> Catalogue:
    """The shipped catalogue, read once per process: package data does not change while
    the process runs, and reading it for every run judged made a cell's evaluation (every
    run of the cell) take seconds per run (docs/performance.md)."""
    return load_catalogue()
