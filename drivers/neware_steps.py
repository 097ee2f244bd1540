"""Translate a resolved labdaq protocol into a Neware BTS 8.0 step file (XML).

One job: the program a Neware channel runs for a delegated run. We write our own
translator rather than call aurora-unicycler's (``aurora_unicycler/_formats/neware.py``,
MIT, PyPI ``aurora-unicycler`` 0.4.6): its converter takes its own protocol document
(it would mean a second protocol model), has no rest-with-end-conditions, pulse,
capacity end or CC-CV step of ours, and dates the file with the wall clock. The XML
shapes are taken from it: ``root/config[type="Step File" version="17"]`` with
``Head_Info``, ``Whole_Prt`` (``Protect/Main/Volt|Curr|Cap/Upper|Lower``, ``Delay_Time``,
``Record/Main/Time``), ``Step_Info/Step<n>[Step_ID, Step_Type]/Limit/Main`` and a final
end step; step types 1 CC charge, 2 CC discharge, 3 CC-CV charge, 19 CC-CV discharge,
4 rest, 5 loop (``Limit/Other/Start_Step``, ``Cycle_Count``), 6 end; units 0.1 mV for
voltages, mA for currents, ms for times, mAs for capacities.

Ours beyond unicycler's shapes, NOT confirmed against a real server: ``Cap`` as a step
end condition (type 1/2/3/19), a pulse written as CC and rest steps, ``Curr`` on a CV
step written from its current limit. Anything without a Neware equivalent raises
:class:`UntranslatableStep` naming the step (the API answers it with 422). Chamber steps are
not written: the BTS API has no command or confirmed step type that holds another
instrument, so :func:`translate` cuts the protocol at each chamber step into
*segments*, each a chamber hold (the engine's, labdaq/engine/delegated.py) followed by a
step file of its own, with the map from Neware step ids back to the program's steps that
harvesting needs. A chamber step inside a loop is refused: the loop would have to span
two programs.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET  # noqa: S405 - builds XML, parses nothing
from dataclasses import dataclass, field
from typing import Any

from labdaq.protocol import (
    ResolvedCC,
    ResolvedCCCV,
    ResolvedCV,
    ResolvedLoopEnd,
    ResolvedLoopStart,
    ResolvedProtocol,
    ResolvedPulse,
    ResolvedRest,
    ResolvedSetTemperature,
)

MIN_CURRENT_A = 1e-6


class UntranslatableStep(ValueError):
    """A step or end condition Neware cannot run; ``path`` is where it is in the document."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _v(value: float) -> str:
    return f"{value * 10000:f}"  # 0.1 mV


def _ma(value_a: float) -> str:
    return f"{abs(value_a) * 1000:f}"


def _ms(value_s: float) -> str:
    return f"{value_s * 1000:f}"


def _mas(value_ah: float) -> str:
    return f"{value_ah * 1000 * 3600:f}"


def _only(until: Any, allowed: set[str], path: str, what: str) -> None:
    for name, value in until.model_dump().items():
        if value is not None and name not in allowed:
            raise UntranslatableStep(path, f"end condition {name} on a {what} step has no "
                                     "Neware equivalent")


class _Writer:
    def __init__(self) -> None:
        self.info = ET.Element("Step_Info")
        self.n = 0
        self.first_of: dict[int, int] = {}  # labdaq program index -> first Neware step id

    def step(self, step_type: int) -> ET.Element:
        self.n += 1
        el = ET.SubElement(self.info, f"Step{self.n}", Step_ID=str(self.n),
                           Step_Type=str(step_type))
        return el

    @staticmethod
    def main(el: ET.Element) -> ET.Element:
        return ET.SubElement(ET.SubElement(el, "Limit"), "Main")


@dataclass
class Segment:
    """One part of a protocol cut at its chamber steps: the chamber steps the engine holds
    first (``chamber_steps``), then the step file the cycler runs (``xml``; None when
    only chamber steps end the protocol) and which labdaq program step each of its
    Neware step ids runs (``step_map``)."""

    chamber_steps: list[ResolvedSetTemperature] = field(default_factory=list)
    xml: str | None = None
    step_map: dict[int, int] = field(default_factory=dict)


@dataclass
class StepFile:
    """A translated protocol: its segments, in order. ``xml``, ``step_map`` and
    ``chamber_steps`` are the first segment's (a protocol without a chamber step after
    the cycler's first step has one segment)."""

    segments: list[Segment] = field(default_factory=list)

    @property
    def xml(self) -> str:
        return self.segments[0].xml or ""

    @property
    def step_map(self) -> dict[int, int]:
        return self.segments[0].step_map

    @property
    def chamber_steps(self) -> list[ResolvedSetTemperature]:
        return self.segments[0].chamber_steps


def to_neware_xml(resolved: ResolvedProtocol, *, sample_name: str,
                  record_period_s: float = 1.0) -> str:
    """The step file for ``resolved`` (its limits become the program's protection); for a
    protocol cut at a chamber step, the first segment's."""
    return translate(resolved, sample_name=sample_name, record_period_s=record_period_s).xml


def translate(resolved: ResolvedProtocol, *, sample_name: str,  # noqa: C901 - a branch a step type
              record_period_s: float = 1.0) -> StepFile:
    """The segments of ``resolved``: chamber holds and step files, and how each file's
    step ids map back to the program.

    Chamber steps (``set_temperature``) are left out of the files: the engine carries
    them out on the chamber, then starts the next file. One inside a loop is refused
    (the loop would span two programs).
    """
    out = StepFile([Segment()])
    w = _Writer()
    step_map: dict[int, int] = {}
    depth = 0  # loops open at this step

    def close_segment() -> None:
        seg = out.segments[-1]
        if w.n:
            seg.xml = _document(w, resolved, sample_name, record_period_s)
            seg.step_map = dict(step_map)

    for s in resolved.program:
        path, kind = s.path, s.step
        if isinstance(s, ResolvedSetTemperature) and depth == 0:
            if w.n:  # after cycler steps: they are a program of their own
                close_segment()
                out.segments.append(Segment())
                w, step_map = _Writer(), {}
            out.segments[-1].chamber_steps.append(s)
            continue
        w.first_of[s.index] = w.n + 1
        n_before = w.n
        if isinstance(s, ResolvedRest):
            _only(s.until, {"duration_s"}, path, "rest")
            if s.until.duration_s is None:
                raise UntranslatableStep(path, "a rest needs a duration on Neware")
            ET.SubElement(w.main(w.step(4)), "Time", Value=_ms(s.until.duration_s))
        elif isinstance(s, ResolvedCC | ResolvedCCCV):
            charge = s.current_a > 0
            if abs(s.current_a) < MIN_CURRENT_A:
                raise UntranslatableStep(path, "zero current")
            if isinstance(s, ResolvedCC):
                _only(s.until, {"voltage_above_v" if charge else "voltage_below_v",
                                "duration_s", "capacity_ah"}, path, "charge CC" if charge
                      else "discharge CC")
                main = w.main(w.step(1 if charge else 2))
                ET.SubElement(main, "Curr", Value=_ma(s.current_a))
                stop_v = s.until.voltage_above_v if charge else s.until.voltage_below_v
                if stop_v is not None:
                    ET.SubElement(main, "Stop_Volt", Value=_v(stop_v))
            else:
                _only(s.until, {"current_below_a", "duration_s", "capacity_ah"}, path, "CC-CV")
                main = w.main(w.step(3 if charge else 19))
                ET.SubElement(main, "Volt", Value=_v(s.voltage_v))
                ET.SubElement(main, "Curr", Value=_ma(s.current_a))
                if s.until.current_below_a is not None:
                    ET.SubElement(main, "Stop_Curr", Value=_ma(s.until.current_below_a))
            if s.until.duration_s is not None:
                ET.SubElement(main, "Time", Value=_ms(s.until.duration_s))
            if s.until.capacity_ah is not None:
                ET.SubElement(main, "Cap", Value=_mas(s.until.capacity_ah))
        elif isinstance(s, ResolvedCV):
            _only(s.until, {"current_below_a", "duration_s", "capacity_ah"}, path, "CV")
            # Neware has no direction-free CV: a CC-CV whose CC phase is the current
            # limit. Discharge when the previous step discharged to this voltage.
            prev = resolved.program[s.index - 1] if s.index > 0 else None
            discharge = (isinstance(prev, ResolvedCC) and prev.current_a < 0
                         and prev.until.voltage_below_v == s.voltage_v)
            main = w.main(w.step(19 if discharge else 3))
            ET.SubElement(main, "Volt", Value=_v(s.voltage_v))
            ET.SubElement(main, "Curr", Value=_ma(s.current_limit_a))
            if s.until.current_below_a is not None:
                ET.SubElement(main, "Stop_Curr", Value=_ma(s.until.current_below_a))
            if s.until.duration_s is not None:
                ET.SubElement(main, "Time", Value=_ms(s.until.duration_s))
            if s.until.capacity_ah is not None:
                ET.SubElement(main, "Cap", Value=_mas(s.until.capacity_ah))
        elif isinstance(s, ResolvedPulse):
            if any(v is not None for v in s.until.model_dump().values()):
                raise UntranslatableStep(path, "an end condition on a whole pulse train has "
                                         "no Neware equivalent")
            for _ in range(s.count):
                main = w.main(w.step(1 if s.current_a > 0 else 2))
                ET.SubElement(main, "Curr", Value=_ma(s.current_a))
                ET.SubElement(main, "Time", Value=_ms(s.pulse_duration_s))
                if s.rest_duration_s > 0:
                    ET.SubElement(w.main(w.step(4)), "Time", Value=_ms(s.rest_duration_s))
        elif isinstance(s, ResolvedLoopStart):
            depth += 1
        elif isinstance(s, ResolvedLoopEnd):
            depth -= 1
            if s.until is not None and any(v is not None for v in s.until.model_dump().values()):
                raise UntranslatableStep(path, "a loop ending on discharge capacity has no "
                                         "Neware equivalent")
            el = w.step(5)
            other = ET.SubElement(ET.SubElement(el, "Limit"), "Other")
            ET.SubElement(other, "Start_Step", Value=str(w.first_of[s.start_index + 1]))
            ET.SubElement(other, "Cycle_Count", Value=str(s.max_iterations))
        else:
            why = (" inside a loop (labdaq holds the chamber between two programs of the "
                   "cycler; a loop cannot span two programs)"
                   if kind == "set_temperature" else "")
            raise UntranslatableStep(path, f"step {kind!r} has no Neware equivalent{why}")
        for n in range(n_before + 1, w.n + 1):
            step_map[n] = s.index
    close_segment()
    return out


def _document(w: _Writer, resolved: ResolvedProtocol, sample_name: str,
              record_period_s: float) -> str:
    """The step file: head, whole-program protection, the steps written, an end step."""
    w.step(6)  # end
    w.info.set("Num", str(w.n))

    root = ET.Element("root")
    config = ET.SubElement(root, "config", type="Step File", version="17",
                           client_version="BTS Client 8.0.0.478(2024.06.24)(R3)")
    head = ET.SubElement(config, "Head_Info")
    ET.SubElement(head, "Operate", Value="66")
    ET.SubElement(head, "Scale", Value="1")
    ET.SubElement(head, "Start_Step", Value="1", Hide_Ctrl_Step="0")
    ET.SubElement(head, "Creator", Value="labdaq")
    ET.SubElement(head, "Remark", Value=sample_name)
    ET.SubElement(head, "RateType", Value="103")
    if resolved.cell.capacity_ah:
        ET.SubElement(head, "MultCap", Value=_mas(resolved.cell.capacity_ah))
    whole = ET.SubElement(config, "Whole_Prt")
    prot = ET.SubElement(ET.SubElement(whole, "Protect"), "Main")
    lim = resolved.limits
    volt = ET.SubElement(prot, "Volt")
    ET.SubElement(volt, "Upper", Value=_v(lim.max_voltage_v))
    ET.SubElement(volt, "Lower", Value=_v(lim.min_voltage_v))
    curr = ET.SubElement(prot, "Curr")
    ET.SubElement(curr, "Upper", Value=_ma(max(lim.max_charge_current_a,
                                               lim.max_discharge_current_a)))
    if lim.breach_duration_s:
        ET.SubElement(prot, "Delay_Time", Value=_ms(lim.breach_duration_s))
    if lim.max_capacity_ah:
        ET.SubElement(ET.SubElement(prot, "Cap"), "Upper", Value=_mas(lim.max_capacity_ah))
    record = ET.SubElement(ET.SubElement(whole, "Record"), "Main")
    ET.SubElement(record, "Time", Value=_ms(record_period_s))
    config.append(w.info)
    smbus = ET.SubElement(config, "SMBUS")
    ET.SubElement(smbus, "SMBUS_Info", Num="0", AdjacentInterval="0")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode")
