"""Tests for labdaq.protocol: parsing, error locations, hashing, resolution, templates."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from labdaq.protocol import (
    CellLimits,
    InstrumentLimits,
    Protocol,
    ProtocolError,
    ResolvedCC,
    ResolvedCCCV,
    ResolvedLoopEnd,
    ResolvedLoopStart,
    ResolvedProtocol,
    Safety,
    cycle_protocol,
    effective_limits,
    list_templates,
    load_template,
    parse_protocol,
    resolve,
)

EXPECTED_TEMPLATES = {
    "formation", "capacity_check_c3", "rate_capability", "cycle_life_1c", "hppc_dcir",
    "eis_soc", "calendar_retention", "basic_cycle",
}


@pytest.fixture
def nmc() -> CellLimits:
    """A typical 2.5 Ah NMC cell: 4.2/2.5 V, 2C charge, 3C discharge."""
    return CellLimits(capacity_ah=2.5, charge_cutoff_v=4.2, discharge_cutoff_v=2.5,
                      max_charge_current_a=5.0, max_discharge_current_a=7.5,
                      min_temperature_c=-20.0, max_temperature_c=60.0)


def doc(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"schema_version": 1, "name": "t", "steps": list(steps), **extra}


CHARGE = {"step": "cc", "current_a": 1.0, "until": {"voltage_v": 4.2}}
REST = {"step": "rest", "until": {"duration_s": 60}}


def errors_of(exc: pytest.ExceptionInfo[ProtocolError]) -> dict[str, str]:
    return {e["loc"]: e["msg"] for e in exc.value.errors}


# --------------------------------------------------------------------------- templates


def test_all_expected_templates_are_listed() -> None:
    assert EXPECTED_TEMPLATES <= set(list_templates())


@pytest.mark.parametrize("name", sorted(EXPECTED_TEMPLATES))
def test_template_parses_and_resolves_for_nmc_cell(name: str, nmc: CellLimits) -> None:
    protocol = load_template(name)
    assert protocol.name == name
    resolved = resolve(protocol, nmc)
    assert resolved.program
    assert resolved.protocol_hash == protocol.content_hash()
    # Program indices are positions; loop markers point at each other.
    for i, step in enumerate(resolved.program):
        assert step.index == i
        if isinstance(step, ResolvedLoopStart):
            end = resolved.program[step.end_index]
            assert isinstance(end, ResolvedLoopEnd) and end.start_index == i
    # Resolved output round-trips through JSON, so a run can store and reload it.
    again = ResolvedProtocol.model_validate_json(resolved.model_dump_json())
    assert again == resolved


def test_unknown_template_is_key_error() -> None:
    with pytest.raises(KeyError, match="unknown protocol template"):
        load_template("nope")


def test_basic_cycle_yaml_matches_cycle_protocol(nmc: CellLimits) -> None:
    assert load_template("basic_cycle").content_hash() == cycle_protocol(cycles=3).content_hash()


def test_cycle_protocol_parameters(nmc: CellLimits) -> None:
    p = cycle_protocol(charge_current_a=1.0, discharge_rate_c=1.0, charge_voltage_v=4.1,
                       discharge_voltage_v=3.0, rest_s=30, cycles=2)
    r = resolve(p, nmc)
    ccs = [s for s in r.program if isinstance(s, ResolvedCC)]
    assert [s.current_a for s in ccs] == [1.0, -2.5]
    assert ccs[0].until.voltage_above_v == 4.1
    assert ccs[1].until.voltage_below_v == 3.0
    assert isinstance(r.program[-1], ResolvedLoopEnd) and r.program[-1].max_iterations == 2
    with pytest.raises(ValueError):
        cycle_protocol(charge_current_a=1.0, charge_rate_c=0.5)


# --------------------------------------------------------------------------- hashing


def test_content_hash_stable_across_key_order_and_format() -> None:
    data = load_template("cycle_life_1c").model_dump(mode="json", exclude_defaults=True)
    reordered = json.loads(json.dumps(data, sort_keys=True))
    reordered = dict(reversed(list(reordered.items())))
    as_yaml = yaml.safe_dump(data, default_flow_style=True, sort_keys=False)
    as_json = json.dumps(reordered, indent=4)
    hashes = {parse_protocol(d).content_hash() for d in (data, reordered, as_yaml, as_json)}
    assert len(hashes) == 1


def test_content_hash_ignores_explicit_defaults_but_not_changes() -> None:
    base = doc({"step": "set_temperature", "temperature_c": 25})
    explicit = doc({"step": "set_temperature", "temperature_c": 25.0, "tolerance_c": 1.0})
    changed = doc({"step": "set_temperature", "temperature_c": 26})
    h = parse_protocol(base).content_hash()
    assert h.startswith("sha256:") and len(h) == len("sha256:") + 64
    assert parse_protocol(explicit).content_hash() == h
    assert parse_protocol(changed).content_hash() != h


# --------------------------------------------------------------------------- parse errors


def test_unknown_step_type_names_step() -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_protocol(doc(REST, {"step": "galvanise", "current_a": 1}))
    assert "unknown step type 'galvanise'" in errors_of(exc)["steps[1].step"]


def test_unknown_field_and_bad_type_inside_loop_body() -> None:
    bad = doc(REST, {"step": "loop", "count": 2, "body": [
        REST, {"step": "cc", "current_a": "lots", "until": {"voltag_v": 4.2}}]})
    with pytest.raises(ProtocolError) as exc:
        parse_protocol(bad)
    errs = errors_of(exc)
    assert set(errs) == {"steps[1].body[1].current_a", "steps[1].body[1].until.voltag_v"}
    assert "unknown field" in errs["steps[1].body[1].until.voltag_v"]


def test_yaml_text_errors_and_wrong_version() -> None:
    with pytest.raises(ProtocolError, match="not valid YAML"):
        parse_protocol("steps: [unclosed")
    with pytest.raises(ProtocolError) as exc:
        parse_protocol(doc(REST, schema_version=2))
    assert "schema_version" in errors_of(exc)


@pytest.mark.parametrize(("step", "loc"), [
    ({"step": "cc", "current_a": 1.0}, "steps[1].until"),
    ({"step": "cc", "current_a": 1.0, "until": {}}, "steps[1].until"),
    ({"step": "rest"}, "steps[1].until"),
    ({"step": "cv", "voltage_v": 4.2, "current_limit_a": 1.0,
      "until": {"capacity_ah": 1.0}}, "steps[1].until"),
    ({"step": "cccv", "current_a": 1.0, "voltage_v": 4.2,
      "until": {"duration_s": 100}}, "steps[1].until"),
])
def test_missing_end_condition_names_step(step: dict[str, Any], loc: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_protocol(doc(REST, step))
    assert loc in errors_of(exc)


def test_missing_end_condition_inside_loop() -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_protocol(doc({"step": "loop", "count": 2, "body": [
            CHARGE, {"step": "cc", "current_a": -1.0}]}))
    assert list(errors_of(exc)) == ["steps[0].body[1].until"]


def test_end_condition_that_does_not_fit_the_step() -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_protocol(doc({"step": "rest", "until": {"voltage_v": 3.0}},
                           {"step": "cc", "current_a": 1, "until": {"current_below_a": 0.1}}))
    errs = errors_of(exc)
    assert "voltage_above_v" in errs["steps[0].until.voltage_v"]
    assert "steps[1].until.current_below_a" in errs


@pytest.mark.parametrize(("loop", "loc"), [
    ({"step": "loop", "body": [CHARGE]}, "steps[0].count"),
    ({"step": "loop", "until": {"discharge_capacity_below_pct_of_first": 80},
      "body": [CHARGE]}, "steps[0].max_count"),
    ({"step": "loop", "count": 3, "body": [
        {"step": "loop", "until": {"discharge_capacity_below_ah": 2.0}, "body": [CHARGE]}]},
     "steps[0].body[0].max_count"),
])
def test_never_ending_loop_names_loop(loop: dict[str, Any], loc: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_protocol(doc(loop))
    assert loc in errors_of(exc)


def test_current_given_twice_or_not_at_all() -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_protocol(doc({"step": "cc", "current_a": 1, "rate_c": 0.5,
                            "until": {"duration_s": 1}},
                           {"step": "pulse", "pulse_duration_s": 10, "rest_duration_s": 10}))
    assert {"steps[0].current_a", "steps[1].current_a"} <= set(errors_of(exc))


# --------------------------------------------------------------------------- resolve


def test_c_rates_and_symbolic_voltages_resolve(nmc: CellLimits) -> None:
    p = parse_protocol(doc(
        {"step": "cccv", "rate_c": 0.5, "voltage_v": "charge_cutoff",
         "until": {"current_below_c": 0.05, "capacity_c": 1.2}},
        {"step": "cc", "rate_c": -2, "until": {"voltage_v": "discharge_cutoff",
                                               "voltage_below_v": 2.8}},
    ))
    r = resolve(p, nmc)
    cccv, cc = r.program
    assert isinstance(cccv, ResolvedCCCV) and isinstance(cc, ResolvedCC)
    assert cccv.current_a == pytest.approx(1.25)
    assert cccv.voltage_v == 4.2
    assert cccv.until.current_below_a == pytest.approx(0.125)
    assert cccv.until.capacity_ah == pytest.approx(3.0)
    assert cc.current_a == pytest.approx(-5.0)
    # Two lower voltage bounds: the first one reached (the higher) is kept.
    assert cc.until.voltage_below_v == 2.8


def test_c_rate_without_capacity_names_every_field(nmc: CellLimits) -> None:
    no_capacity = nmc.model_copy(update={"capacity_ah": None})
    p = parse_protocol(doc(CHARGE, {"step": "loop", "count": 2, "body": [
        {"step": "cc", "rate_c": -1, "until": {"voltage_v": 2.5}},
        {"step": "cccv", "current_a": 1, "voltage_v": 4.2, "until": {"current_below_c": 0.05}},
    ]}))
    with pytest.raises(ProtocolError) as exc:
        resolve(p, no_capacity)
    errs = errors_of(exc)
    assert set(errs) == {"steps[1].body[0].rate_c", "steps[1].body[1].until.current_below_c"}
    assert "capacity" in errs["steps[1].body[0].rate_c"]


def test_current_above_cell_limit(nmc: CellLimits) -> None:
    p = parse_protocol(doc(REST, {"step": "loop", "count": 2, "body": [
        {"step": "cc", "rate_c": 2.5, "until": {"voltage_v": 4.2}},  # 6.25 A > 5 A charge
        {"step": "cc", "rate_c": -3, "until": {"voltage_v": 2.5}},  # 7.5 A: at the limit
    ]}))
    with pytest.raises(ProtocolError) as exc:
        resolve(p, nmc)
    errs = errors_of(exc)
    assert list(errs) == ["steps[1].body[0].rate_c"]
    assert "cell limit for charge current" in errs["steps[1].body[0].rate_c"]


def test_current_above_instrument_limit(nmc: CellLimits) -> None:
    p = parse_protocol(doc({"step": "cc", "current_a": -4.0, "until": {"voltage_v": 2.5}}))
    resolve(p, nmc)
    with pytest.raises(ProtocolError) as exc:
        resolve(p, nmc, InstrumentLimits(max_current_a=3.0))
    assert "instrument limit for discharge" in errors_of(exc)["steps[0].current_a"]


def test_voltage_end_condition_outside_cell_window(nmc: CellLimits) -> None:
    p = parse_protocol(doc(
        {"step": "cc", "current_a": 1, "until": {"voltage_v": 4.4}},
        {"step": "cv", "voltage_v": 2.0, "current_limit_a": 1, "until": {"duration_s": 60}},
    ))
    with pytest.raises(ProtocolError) as exc:
        resolve(p, nmc)
    errs = errors_of(exc)
    assert "outside the cell's window" in errs["steps[0].until.voltage_v"]
    assert "steps[1].voltage_v" in errs


def test_all_errors_collected_together(nmc: CellLimits) -> None:
    p = parse_protocol(doc(
        {"step": "cc", "current_a": 9, "until": {"voltage_v": 4.2}},
        {"step": "cc", "current_a": -1, "until": {"voltage_v": 1.0}},
        {"step": "set_temperature", "temperature_c": 80},
    ))
    with pytest.raises(ProtocolError) as exc:
        resolve(p, nmc)
    assert set(errors_of(exc)) == {"steps[0].current_a", "steps[1].until.voltage_v",
                                   "steps[2].temperature_c"}


def test_resolve_rechecks_structure_of_protocol_built_in_code(nmc: CellLimits) -> None:
    # model_construct skips validation, as code building a Protocol by hand might.
    good = parse_protocol(doc({"step": "loop", "count": 1, "body": [CHARGE]}))
    loop = good.steps[0].model_copy(update={"count": None})
    p = Protocol.model_construct(**{**dict(good), "steps": [loop]})
    with pytest.raises(ProtocolError) as exc:
        resolve(p, nmc)
    assert "steps[0].count" in errors_of(exc)


# --------------------------------------------------------------------------- limits


def test_safety_limits_combine_to_tightest(nmc: CellLimits) -> None:
    protocol_safety = Safety(max_voltage_v=4.22, max_abs_current_a=6.0, max_temperature_c=50,
                             min_temperature_c=-30, breach_duration_s=2.0)
    lab = Safety(min_voltage_v=2.48, max_voltage_v=4.3, max_abs_current_a=4.0,
                 max_temperature_c=55, max_capacity_ah=3.0, breach_duration_s=0.5)
    inst = InstrumentLimits(max_current_a=10.0, min_voltage_v=0.0, max_voltage_v=5.0)
    lim = effective_limits(nmc, protocol_safety, inst, lab)
    assert lim.max_voltage_v == 4.22 and lim.sources["max_voltage_v"] == "protocol"
    assert lim.min_voltage_v == 2.48 and lim.sources["min_voltage_v"] == "lab"
    assert lim.max_charge_current_a == 4.0 and lim.sources["max_charge_current_a"] == "lab"
    assert lim.max_discharge_current_a == 4.0
    assert lim.max_temperature_c == 50 and lim.sources["max_temperature_c"] == "protocol"
    assert lim.min_temperature_c == -20 and lim.sources["min_temperature_c"] == "cell"
    assert lim.max_capacity_ah == 3.0
    assert lim.breach_duration_s == 0.5


def test_cell_defines_limits_with_voltage_margin(nmc: CellLimits) -> None:
    lim = effective_limits(nmc)
    assert lim.max_voltage_v == pytest.approx(4.25)
    assert lim.min_voltage_v == pytest.approx(2.45)
    assert (lim.max_charge_current_a, lim.max_discharge_current_a) == (5.0, 7.5)
    assert lim.max_abs_current_a == 7.5
    # An unset lab debounce does not erase the protocol's.
    assert effective_limits(nmc, Safety(breach_duration_s=3), lab=Safety()).breach_duration_s == 3


def test_protocol_safety_tighter_than_end_condition_is_rejected(nmc: CellLimits) -> None:
    p = parse_protocol(doc(CHARGE, safety={"max_voltage_v": 4.1}))
    with pytest.raises(ProtocolError) as exc:
        resolve(p, nmc)
    assert "safety window" in errors_of(exc)["steps[0].until.voltage_v"]


def test_empty_combined_window_is_reported(nmc: CellLimits) -> None:
    p = parse_protocol(doc(REST, safety={"min_voltage_v": 4.3}))
    with pytest.raises(ProtocolError) as exc:
        resolve(p, nmc)
    assert "safety.max_voltage_v" in errors_of(exc)


def test_resolved_limits_use_protocol_safety(nmc: CellLimits) -> None:
    p = parse_protocol(doc(CHARGE, safety={"max_abs_current_a": 0.5}))
    with pytest.raises(ProtocolError) as exc:
        resolve(p, nmc)
    assert "protocol limit" in errors_of(exc)["steps[0].current_a"]


# --------------------------------------------------------------------------- loops


def test_loop_program_and_repeat_rule(nmc: CellLimits) -> None:
    r = resolve(load_template("cycle_life_1c"), nmc)
    end = r.program[-1]
    assert isinstance(end, ResolvedLoopEnd) and end.max_iterations == 3000
    assert end.repeat(1, discharge_ah=2.5, first_discharge_ah=2.5)
    assert end.repeat(10, discharge_ah=2.01, first_discharge_ah=2.5)
    assert not end.repeat(11, discharge_ah=1.99, first_discharge_ah=2.5)
    assert not end.repeat(3000, discharge_ah=2.5, first_discharge_ah=2.5)


def test_nested_loop_indices(nmc: CellLimits) -> None:
    inner = {"step": "loop", "count": 2, "body": [CHARGE, REST]}
    p = parse_protocol(doc(REST, {"step": "loop", "count": 3, "body": [REST, inner]}))
    kinds = [s.step for s in resolve(p, nmc).program]
    assert kinds == ["rest", "loop_start", "rest", "loop_start", "cc", "rest", "loop_end",
                     "loop_end"]
    prog = resolve(p, nmc).program
    assert isinstance(prog[6], ResolvedLoopEnd) and prog[6].start_index == 3
    assert isinstance(prog[7], ResolvedLoopEnd) and prog[7].start_index == 1
    assert prog[4].path == "steps[1].body[1].body[0]"


def test_parse_does_not_mutate_input() -> None:
    data = doc(CHARGE)
    before = copy.deepcopy(data)
    parse_protocol(data)
    assert data == before
