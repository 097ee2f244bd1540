"""The benchmark catalogue (seeds/benchmarks) validates, covers the clauses issue 16 lists,
and every protocol template it names exists, validates and resolves for a cell."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from labdaq.benchmarks.catalogue import (
    METRICS,
    CatalogueError,
    load_catalogue,
    parse_catalogue,
)
from labdaq.protocol import CellLimits, ProtocolError, load_template, resolve

SEEDS = Path(__file__).resolve().parents[1] / "seeds" / "benchmarks"

# An 18650-size NMC cell as the engine tests use (2.4 Ah, 4.2/2.5 V, 1C charge, 3C
# discharge), with a temperature window a normal test stays inside.
CELL = CellLimits(capacity_ah=2.4, charge_cutoff_v=4.2, discharge_cutoff_v=2.5,
                  max_charge_current_a=2.4, max_discharge_current_a=7.2,
                  min_temperature_c=-30, max_temperature_c=60)
# What an abuse run is registered with: the test's own envelope (twice the charge
# current, voltage up to 10 V, reversal to -12 V, no cell temperature limit) on a channel
# rated for it.
ABUSE_ENVELOPE = CellLimits(capacity_ah=2.4, charge_cutoff_v=10.0, discharge_cutoff_v=-12.0,
                            max_charge_current_a=4.8, max_discharge_current_a=7.2)
ABUSE_TEMPLATES = {"un383_t7_overcharge", "un383_t8_forced_discharge", "iec62133_2_overcharge",
                   "iec62133_2_forced_discharge", "iec62133_2_thermal_abuse"}

# The "cover at least" list of issue 16.
REQUIRED = [
    "un383-t1-altitude", "un383-t2-thermal", "un383-t3-vibration", "un383-t4-shock",
    "un383-t5-external-short", "un383-t6-impact-crush", "un383-t7-overcharge",
    "un383-t8-forced-discharge",
    "iec62133-2-7.2.1", "iec62133-2-7.3.1", "iec62133-2-7.3.2", "iec62133-2-7.3.3",
    "iec62133-2-7.3.4", "iec62133-2-7.3.5", "iec62133-2-7.3.6", "iec62133-2-7.3.7",
    "iec62133-2-7.3.8", "iec62133-2-7.3.9",
    "iec62660-1-capacity", "iec62660-1-power", "iec62660-1-cycle-life-bev",
    "iso12405-4-pulse-ir",
    "lab-rated-capacity", "lab-energy-efficiency", "lab-dcir", "lab-acir-1khz",
    "lab-capacity-retention-80", "lab-charge-retention-28d",
    "ais156-cell-precycle",
]


def documents() -> dict[str, Any]:
    return {p.name: yaml.safe_load(p.read_text()) for p in SEEDS.glob("*.yaml")}


def test_every_entry_validates_and_the_required_ones_exist() -> None:
    cat = load_catalogue()
    assert load_catalogue(SEEDS) == cat  # the shipped package data is the source tree
    ids = {e.id for e in cat.entries}
    assert not set(REQUIRED) - ids
    for e in cat.entries:
        # Every number carries a source the catalogue lists and a confidence flag.
        for n in e.numbers():
            assert n.source in cat.sources and n.confidence in ("seen", "to_verify"), e.id
        for c in e.criteria:
            assert c.unit == METRICS[c.metric]["unit"]


def test_every_required_entry_has_a_protocol_template() -> None:
    cat = load_catalogue()
    for entry_id in REQUIRED:
        assert cat.get(entry_id).protocol, entry_id


@pytest.mark.parametrize("name", sorted({e.protocol for e in load_catalogue().entries
                                         if e.protocol}))
def test_each_named_template_validates_and_resolves(name: str) -> None:
    protocol = load_template(name)  # schema and structure
    # Evaluation finds a run's entries by the protocol's name: it must be the file's.
    assert protocol.name == name
    if name in ABUSE_TEMPLATES:
        plan = resolve(protocol, ABUSE_ENVELOPE)
    else:
        plan = resolve(protocol, CELL)
    assert plan.program


def test_overcharge_templates_are_refused_within_the_cells_own_limits() -> None:
    # Twice the charge current: never runnable by accident on a normal registration.
    for name in ("un383_t7_overcharge", "iec62133_2_overcharge"):
        with pytest.raises(ProtocolError, match="limit for charge current"):
            resolve(load_template(name), CELL)
    with pytest.raises(ProtocolError, match="temperature window"):
        resolve(load_template("iec62133_2_thermal_abuse"), CELL)


def test_equivalent_designations() -> None:
    cat = load_catalogue()

    def names(entry_id: str) -> dict[str, list[str]]:
        return {d.designation: list(d.jurisdictions) for d in cat.get(entry_id).designations}

    d = names("iec62133-2-7.2.1")
    assert d["IEC 62133-2:2017"] == ["IN", "CA"]
    assert d["IS 16046 (Part 2):2018"] == ["IN"]
    assert d["CAN/CSA-C22.2 No. 62133-2"] == ["CA"]
    assert cat.get("un383-t5-external-short").jurisdictions == ["IN", "CA"]
    iso = names("iso12405-4-pulse-ir")
    assert "ISO 12405-4:2018" in iso and "IS 17855:2022" in iso
    for e in cat.entries:
        if e.id.startswith("ais156"):
            assert e.jurisdictions == ["IN"], e.id
    # IEC 62660 national adoptions are not confirmed in a public source: flagged so.
    for des in cat.get("iec62660-1-capacity").designations:
        if des.body != "IEC":
            assert des.adoption == "unconfirmed" and des.confidence == "to_verify"


def test_key_numbers() -> None:
    cat = load_catalogue()
    (t5,) = [c for c in cat.get("un383-t5-external-short").criteria
             if c.metric == "case_temperature_max_c"]
    assert (t5.comparison, t5.value, t5.unit, t5.confidence) == ("<=", 170, "degC", "seen")
    (ocv,) = [c for c in cat.get("un383-t1-altitude").criteria
              if c.metric == "ocv_ratio_after_before"]
    assert (ocv.comparison, ocv.value) == (">=", 0.90)
    acc = {a.quantity: (a.tolerance, a.unit) for a in cat.get("iec62660-1-capacity").accuracy}
    assert acc["voltage"] == (0.1, "%") and acc["current"] == (1, "%")
    assert acc["temperature"] == (2, "degC")
    # IEC 62660-1 is a measurement method: values, not verdicts.
    for e in cat.entries:
        if e.standard == "IEC 62660-1":
            assert all(c.comparison == "report" for c in e.criteria), e.id
    # Numbers from memory are never marked as seen (also enforced by the schema).
    assert cat.get("iec62133-2-7.3.4").provisional
    assert not cat.get("un383-t5-external-short").provisional


def test_entries_without_a_protocol_say_why() -> None:
    for e in load_catalogue().entries:
        if e.protocol is None:
            assert e.not_evaluable_reason, e.id


def mutate(fn: Any) -> dict[str, Any]:
    docs = copy.deepcopy(documents())
    fn(docs)
    return docs


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["un38_3.yaml"]["entries"][0]["criteria"][0].update(metric="ocv_typo"),
         "unknown metric"),
        (lambda d: d["un38_3.yaml"]["entries"][0]["criteria"][0].update(unit="%"),
         "is in 'ratio'"),
        (lambda d: d["un38_3.yaml"]["entries"][0]["criteria"][0].update(source="S99"),
         "unknown source 'S99'"),
        (lambda d: d["un38_3.yaml"]["entries"][0]["criteria"][0].update(source="memory"),
         "must be confidence to_verify"),
        (lambda d: d["un38_3.yaml"]["entries"][0].pop("protocol"),
         None),  # still has a not_evaluable_reason: valid
        (lambda d: d["un38_3.yaml"]["entries"][4].pop("protocol"),
         "must say why"),
        (lambda d: d["un38_3.yaml"]["entries"][1].update(id="un383-t1-altitude"),
         "duplicate entry ids"),
        (lambda d: d["ais156.yaml"]["entries"][0].update(jurisdictions=["IN", "CA"]),
         "no designation for jurisdiction"),
        (lambda d: d["un38_3.yaml"]["entries"][0]["criteria"][0].pop("value"),
         "exactly one of value or bands"),
    ],
)
def test_schema_rejects(change: Any, message: str | None) -> None:
    docs = mutate(change)
    if message is None:
        parse_catalogue(docs)
        return
    with pytest.raises(CatalogueError, match=message):
        parse_catalogue(docs)
