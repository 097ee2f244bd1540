"""The Neware step files the simulated BTS server runs: the subset of the step XML that
``sims/neware_bts.py`` executes, parsed into SI units (importing nothing from labdaq)."""

from __future__ import annotations

import xml.etree.ElementTree as ET  # noqa: S405 - parses our own step files
from dataclasses import dataclass

__all__ = ["SimStep", "StepProgram", "parse_step_xml"]


@dataclass
class SimStep:
    """One parsed step of a Neware step file, in SI units."""

    step_id: int
    step_type: int
    current_a: float = 0.0
    voltage_v: float | None = None
    stop_voltage_v: float | None = None
    stop_current_a: float | None = None
    time_s: float | None = None
    capacity_ah: float | None = None
    start_step: int = 1
    cycle_count: int = 1


@dataclass
class StepProgram:
    steps: dict[int, SimStep]
    record_s: float = 1.0
    volt_upper_v: float | None = None
    volt_lower_v: float | None = None
    curr_upper_a: float | None = None
    cap_upper_ah: float | None = None
    delay_s: float = 0.0


def _value(parent: ET.Element | None, path: str) -> float | None:
    el = parent.find(path) if parent is not None else None
    return float(el.attrib["Value"]) if el is not None else None


def parse_step_xml(text: str) -> StepProgram:
    """Parse a Neware step file (the subset above); ValueError for anything else."""
    root = ET.fromstring(text)  # noqa: S314 - a local file the lab wrote
    config = root.find("config")
    if config is None:
        raise ValueError("not a Neware step file: no <config>")
    info = config.find("Step_Info")
    if info is None:
        raise ValueError("step file has no <Step_Info>")
    steps: dict[int, SimStep] = {}
    for el in info:
        sid, stype = int(el.attrib["Step_ID"]), int(el.attrib["Step_Type"])
        main = el.find("Limit/Main")
        other = el.find("Limit/Other")
        s = SimStep(sid, stype)
        if stype not in (1, 2, 3, 4, 5, 6, 19):
            raise ValueError(f"Step{sid}: step type {stype} is not simulated")
        curr = _value(main, "Curr")
        s.current_a = (curr or 0.0) / 1000.0
        if (v := _value(main, "Volt")) is not None:
            s.voltage_v = v / 10000.0
        if (v := _value(main, "Stop_Volt")) is not None:
            s.stop_voltage_v = v / 10000.0
        if (v := _value(main, "Stop_Curr")) is not None:
            s.stop_current_a = v / 1000.0
        if (v := _value(main, "Time")) is not None:
            s.time_s = v / 1000.0
        if (v := _value(main, "Cap")) is not None:
            s.capacity_ah = v / 3600.0 / 1000.0
        if stype == 5:
            s.start_step = int(_value(other, "Start_Step") or 1)
            s.cycle_count = int(_value(other, "Cycle_Count") or 1)
        steps[sid] = s
    prog = StepProgram(steps)
    whole = config.find("Whole_Prt")
    if whole is not None:
        prot = whole.find("Protect/Main")
        if (v := _value(prot, "Volt/Upper")) is not None:
            prog.volt_upper_v = v / 10000.0
        if (v := _value(prot, "Volt/Lower")) is not None:
            prog.volt_lower_v = v / 10000.0
        if (v := _value(prot, "Curr/Upper")) is not None:
            prog.curr_upper_a = v / 1000.0
        if (v := _value(prot, "Cap/Upper")) is not None:
            prog.cap_upper_ah = v / 3600.0 / 1000.0
        prog.delay_s = (_value(prot, "Delay_Time") or 0.0) / 1000.0
        if (v := _value(whole, "Record/Main/Time")) is not None:
            prog.record_s = max(v / 1000.0, 0.1)
    return prog
