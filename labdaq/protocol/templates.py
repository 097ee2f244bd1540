"""Shipped protocol templates (``seeds/protocols/*.yaml``) and the simple cycle builder."""

from __future__ import annotations

from importlib import resources
from typing import Any

from labdaq.protocol.checks import parse_protocol
from labdaq.protocol.document import SCHEMA_VERSION, Protocol


def _templates_dir() -> Any:
    return resources.files("labdaq.seeds") / "protocols"


def list_templates() -> list[str]:
    """Names of the shipped templates (``seeds/protocols/<name>.yaml``), sorted."""
    return sorted(entry.name[: -len(".yaml")] for entry in _templates_dir().iterdir()
                  if entry.name.endswith(".yaml"))


def load_template(name: str) -> Protocol:
    """Parse the shipped template ``name``; ``KeyError`` if there is none."""
    if name not in list_templates():
        raise KeyError(f"unknown protocol template {name!r}; "
                       f"available: {', '.join(list_templates())}")
    return parse_protocol((_templates_dir() / f"{name}.yaml").read_text(encoding="utf-8"))


def cycle_protocol(*, charge_current_a: float | None = None, charge_rate_c: float | None = None,
                   discharge_current_a: float | None = None,
                   discharge_rate_c: float | None = None,
                   charge_voltage_v: float | str = "charge_cutoff",
                   discharge_voltage_v: float | str = "discharge_cutoff",
                   rest_s: float = 600.0, cycles: int = 1,
                   name: str = "basic_cycle") -> Protocol:
    """The simple cycle: CC charge to ``charge_voltage_v``, rest, CC discharge to
    ``discharge_voltage_v``, rest — ``cycles`` times.

    Currents are magnitudes (the discharge is negated here); with neither current nor
    rate given for a direction, C/2 is used. Voltages default to the cell's cut-offs.
    ``basic_cycle.yaml`` is this with ``cycles=3``.
    """
    def current(amps: float | None, rate: float | None, sign: float) -> dict[str, float]:
        if amps is not None and rate is not None:
            raise ValueError("give a current in A or a C-rate, not both")
        if amps is not None:
            return {"current_a": sign * abs(amps)}
        return {"rate_c": sign * abs(rate if rate is not None else 0.5)}

    charge = current(charge_current_a, charge_rate_c, 1.0)
    discharge = current(discharge_current_a, discharge_rate_c, -1.0)
    return parse_protocol({
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "description": "CC charge to the upper voltage, rest, CC discharge to the lower "
                       "voltage, rest; repeated for the given number of cycles.",
        "steps": [{
            "step": "loop", "count": cycles, "tag": "cycle",
            "body": [
                {"step": "cc", **charge, "until": {"voltage_v": charge_voltage_v},
                 "tag": "charge"},
                {"step": "rest", "until": {"duration_s": rest_s}},
                {"step": "cc", **discharge, "until": {"voltage_v": discharge_voltage_v},
                 "tag": "discharge"},
                {"step": "rest", "until": {"duration_s": rest_s}},
            ],
        }],
    })

