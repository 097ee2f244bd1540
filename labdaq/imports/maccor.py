"""Maccor text exports (labdaq's own reader): tab- or comma-separated, a few lines of
test header, then ``Rec#``, ``Cyc#``, ``Step``, the test and step times, ``Amp-hr``,
``Watt-hr``, ``Amps``, ``Volts``, ``State`` ... Maccor writes current as a magnitude and
the direction in ``State`` (``D`` discharge, ``C`` charge, else rest). Times come in
seconds (``Test (Sec)``), minutes (``Test (Min)``) or, in some MacTest exports
(``TestTime``, ``StepTime``), as durations like ``2d 03:04:05.5``."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import numpy as np

from labdaq.errors import Invalid
from labdaq.imports.columns import OWN, OWN_LICENCE, Columns, numbered
from labdaq.imports.data import FloatArray, ImportedData, VendorCounters, vendor_cycle_summary

__all__ = ["read_maccor", "seconds"]

#: "[N d] [HH:]MM:SS[.fff]": days, then a clock that may run past 24 h in no export seen.
_DURATION = re.compile(r"^(?:(\d+)\s*d\s*)?(?:(\d+):)?(\d+):(\d+(?:\.\d*)?)$")


def seconds(text: str) -> float:
    """A time cell in seconds: a plain number, or a duration ``2d 03:04:05.5``; NaN if
    blank. ValueError for anything else."""
    x = text.strip().replace(",", "")
    if not x:
        return float("nan")
    hit = _DURATION.match(x)
    if hit is None:
        return float(x)
    days, hours, minutes, secs = hit.groups()
    return (int(days or 0) * 86400.0 + int(hours or 0) * 3600.0 + int(minutes) * 60.0
            + float(secs))


def read_maccor(path: Path) -> ImportedData:
    """A Maccor text export, as :class:`ImportedData`."""
    raw = path.read_bytes().decode("latin-1")
    lines = raw.splitlines()
    head = next((k for k, ln in enumerate(lines[:50])
                 if re.search(r"\bRec#?\b|Cyc#|Cycle P", ln) and ("\t" in ln or "," in ln)),
                None)
    if head is None:
        raise Invalid("not a Maccor text export",
                      [{"loc": "file", "msg": "no header line with Rec# / Cyc#"}])
    delim = "\t" if "\t" in lines[head] else ","
    reader = csv.reader(lines[head:], delimiter=delim)
    header = [h.strip() for h in next(reader)]
    rows = [r for r in reader if len(r) >= len(header) - 1 and r and r[0].strip()]
    cols: dict[str, Any] = {}
    for k, name in enumerate(header):
        cols[name] = [r[k].strip() if k < len(r) else "" for r in rows]
    c = Columns(cols)
    state_col = c.find("State", "Md", "MD")
    if state_col is None:
        raise Invalid("the Maccor export has no State column", [{"loc": "file", "msg": header}])
    state = np.array([s[:1].upper() for s in cols[state_col]])
    numeric = {k: v for k, v in cols.items() if k != state_col}

    def num(*names: str) -> FloatArray | None:
        hit = c.find(*names)
        if hit is None:
            return None
        return np.array([float(x.replace(",", "")) if x else np.nan for x in numeric[hit]])

    def clock(*names: str) -> FloatArray | None:
        hit = c.find(*names)
        return None if hit is None else np.array([seconds(x) for x in numeric[hit]])

    t = clock("Test (Sec)", "Test Time (sec)", "TestTime", "Test(Sec)")
    if t is None:
        minutes = num("Test (Min)", "Test(Min)")
        t = None if minutes is None else minutes * 60.0
    v = num("Volts", "Voltage", "Voltage(V)")
    amps = num("Amps", "Current", "Current(A)")
    if t is None or v is None or amps is None:
        raise Invalid("the Maccor export lacks test time, volts or amps",
                      [{"loc": "file", "msg": header}])
    sign = np.where(state == "D", -1.0, np.where(state == "C", 1.0, 0.0))
    i = np.abs(amps) * sign
    cyc, stp = numbered(i, num("Cyc#", "Cycle", "Cycle C"), num("Step", "Step#"))
    ah, wh = num("Amp-hr", "Capacity(AHr)"), num("Watt-hr", "Energy(WHr)")
    vendor = None
    if ah is not None:
        # One counter for both directions, reset at each step or not (both are seen).
        ah = np.abs(ah)
        whx = None if wh is None else np.abs(wh)
        vendor = vendor_cycle_summary(cyc, stp, VendorCounters(
            ah, ah, whx, whx, direction=sign.astype(np.int64)))
    step_t = clock("Step (Sec)", "Step Time (sec)", "StepTime", "Step(Sec)")
    if step_t is None:
        step_min = num("Step (Min)", "Step(Min)")
        step_t = None if step_min is None else step_min * 60.0
    return ImportedData(
        format="maccor", reader=OWN, reader_licence=OWN_LICENCE, t_s=t - t[0], voltage_v=v,
        current_a=i, cycle_index=cyc, step_index=stp,
        temperature_c=num("Temp 1", "Temperature", "Temp1"), vendor_cycles=vendor,
        details={"header": lines[0][:200]}, step_time_s=step_t)
