"""Readers of commercial cyclers' files, one function per format, each returning
:class:`~labdaq.imports.data.ImportedData` in labdaq's units with current positive while
charging.

=============  ===============================  ====================================
format         reader                           licence
=============  ===============================  ====================================
``biologic``   galvani (``.mpr``, ``.mpt``)     GPL-3.0-or-later: optional extra
                                                ``labdaq[import]``, imported lazily
``neware``     NewareNDA (``.nda``, ``.ndax``)  BSD-3-Clause (``labdaq[import]``)
``arbin-res``  mdbtools' ``mdb-export``         GPL (a separate program, run as a
               (Access tables of ``.res``)      subprocess; Debian package ``mdbtools``)
``arbin-csv``  labdaq's own (pyarrow CSV)       labdaq's
``maccor``     labdaq's own (tab-separated      labdaq's
               text export; :mod:`.maccor`)
``bdf``        labdaq's own (Battery Data       labdaq's
               Format CSV or Parquet)
=============  ===============================  ====================================

No maintained Python reader of Arbin CSV, Maccor text exports or Battery Data Format
files was found that labdaq could depend on, so those three are labdaq's own. Sign
conventions: Arbin, BioLogic (anodic positive: charging for a cell wired cathode to the
working electrode), Neware and BDF already count charge positive; Maccor writes the
magnitude and the direction in its ``State`` column (``D`` is discharge).
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from collections.abc import Callable
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from labdaq.errors import Invalid, LabdaqError
from labdaq.imports.columns import OWN, OWN_LICENCE, Columns, ints, numbered
from labdaq.imports.data import (
    FloatArray,
    ImportedData,
    IntArray,
    VendorCounters,
    vendor_cycle_summary,
)
from labdaq.imports.maccor import read_maccor

__all__ = ["FORMATS", "detect_format", "read_file", "MissingReader"]

class MissingReader(Invalid):
    """The format's reader is an optional dependency that is not installed."""


def _version(dist: str) -> str:
    try:
        return f"{dist} {metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        return dist


def _table_columns(table: pa.Table) -> dict[str, Any]:
    return {name: table.column(name).to_numpy(zero_copy_only=False)
            for name in table.column_names}


# --- Battery Data Format -----------------------------------------------------------------


def read_bdf(path: Path) -> ImportedData:
    """Battery Data Format (CSV or Parquet) by its preferred labels, labdaq's own reader."""
    if path.suffix.lower() == ".parquet":
        table = pq.read_table(path)
    else:
        table = pacsv.read_csv(path)
    c = Columns(_table_columns(table))
    t = c.need("time", "Test Time / s", "test_time_second")
    v = c.need("voltage", "Voltage / V", "voltage_volt")
    i = c.need("current", "Current / A", "current_ampere")
    cycle = c.get("Cycle Count / 1", "cycle_count", "Cycle Index / 1")
    step = c.get("Step Count / 1", "step_count", "Step Index / 1", "step_index")
    temp = c.get("Surface Temperature T1 / degC", "Temperature T1 / degC",
                 "Ambient Temperature / degC")
    unix = c.get("Unix Time / s", "unix_time_second")
    cyc, stp = numbered(i, cycle, step)
    qc = c.get("Charging Capacity / Ah", "charging_capacity_ampere_hour")
    qd = c.get("Discharging Capacity / Ah", "discharging_capacity_ampere_hour")
    vendor = None
    if qc is not None and qd is not None:
        vendor = vendor_cycle_summary(cyc, stp, VendorCounters(
            np.abs(qc), np.abs(qd), _abs(c.get("Charging Energy / Wh")),
            _abs(c.get("Discharging Energy / Wh"))))
    return ImportedData(
        format="bdf", reader=OWN, reader_licence=OWN_LICENCE, t_s=t - t[0], voltage_v=v,
        current_a=i, cycle_index=cyc, step_index=stp, temperature_c=temp,
        start_utc=None if unix is None else float(unix[0]), vendor_cycles=vendor)


def _abs(x: FloatArray | None) -> FloatArray | None:
    return None if x is None else np.abs(x)


# --- Arbin -----------------------------------------------------------------------------

_ARBIN = {
    "t": ("Test_Time(s)", "Test_Time", "Test Time (s)"),
    "v": ("Voltage(V)", "Voltage", "Voltage (V)"),
    "i": ("Current(A)", "Current", "Current (A)"),
    "cycle": ("Cycle_Index", "Cycle Index"),
    "step": ("Step_Index", "Step Index"),
    "qc": ("Charge_Capacity(Ah)", "Charge_Capacity", "Charge Capacity (Ah)"),
    "qd": ("Discharge_Capacity(Ah)", "Discharge_Capacity", "Discharge Capacity (Ah)"),
    "ec": ("Charge_Energy(Wh)", "Charge_Energy", "Charge Energy (Wh)"),
    "ed": ("Discharge_Energy(Wh)", "Discharge_Energy", "Discharge Energy (Wh)"),
    "temp": ("Aux_Temperature_1(C)", "Temperature (C)_1", "Aux_Temperature_1",
             "Temperature(C)"),
    "step_time": ("Step_Time(s)", "Step_Time", "Step Time (s)"),
}


def _arbin(columns: dict[str, Any], fmt: str, reader: str, licence: str) -> ImportedData:
    c = Columns(columns)
    t = c.need("test time", *_ARBIN["t"])
    v = c.need("voltage", *_ARBIN["v"])
    i = c.need("current", *_ARBIN["i"])
    order = np.argsort(t, kind="stable")  # mdb-export gives no order guarantee
    t, v, i = t[order], v[order], i[order]

    def opt(key: str) -> FloatArray | None:
        got = c.get(*_ARBIN[key])
        return None if got is None else got[order]

    cyc, stp = numbered(i, opt("cycle"), opt("step"))
    qc, qd = opt("qc"), opt("qd")
    vendor = None
    if qc is not None and qd is not None:
        vendor = vendor_cycle_summary(cyc, stp, VendorCounters(
            qc, qd, opt("ec"), opt("ed")))
    return ImportedData(
        format=fmt, reader=reader, reader_licence=licence, t_s=t - t[0], voltage_v=v,
        current_a=i, cycle_index=cyc, step_index=stp, temperature_c=opt("temp"),
        vendor_cycles=vendor, step_time_s=opt("step_time"))


def read_arbin_csv(path: Path) -> ImportedData:
    """An Arbin CSV export (MITS Pro / MITS 8 column names), labdaq's own reader."""
    table = pacsv.read_csv(path)
    return _arbin(_table_columns(table), "arbin-csv", OWN, OWN_LICENCE)


def read_arbin_res(path: Path) -> ImportedData:
    """An Arbin ``.res`` file (a Microsoft Access database): its ``Channel_Normal_Table``
    through mdbtools' ``mdb-export``."""
    exe = shutil.which("mdb-export")
    if exe is None:
        raise MissingReader("Arbin .res needs mdbtools' mdb-export (apt-get install mdbtools)",
                            [{"loc": "format", "msg": "mdb-export not found"}])
    out = subprocess.run([exe, str(path), "Channel_Normal_Table"], check=True,
                         capture_output=True).stdout
    table = pacsv.read_csv(io.BytesIO(out))
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
    data = _arbin(_table_columns(table), "arbin-res", f"mdbtools {version or '?'}", "GPL-2.0 "
                  "(mdbtools, run as a separate program)")
    stats = subprocess.run([exe, str(path), "Channel_Statistic_Table"], capture_output=True)
    if stats.returncode == 0 and stats.stdout.strip():
        _merge_arbin_statistics(data, _table_columns(table),
                                _table_columns(pacsv.read_csv(io.BytesIO(stats.stdout))))
    return data


#: Channel_Statistic_Table columns kept in the cycler's per-cycle summary.
_ARBIN_STATS = {"Charge_Time": "charge_time_s", "Discharge_Time": "discharge_time_s",
                "Vmax_On_Cycle": "max_voltage_v"}


def _merge_arbin_statistics(data: ImportedData, normal: dict[str, Any],
                            stats: dict[str, Any]) -> None:
    """Arbin's own per-cycle statistics (one row per cycle, at the cycle's last data
    point): their times and voltages join the summary from the counters, by cycle."""
    c, st = Columns(normal), Columns(stats)
    point, cycle = c.get("Data_Point"), c.get("Cycle_Index")
    at = st.get("Data_Point")
    if point is None or cycle is None or at is None or data.vendor_cycles is None:
        return
    cycle_of = dict(zip(point.astype(np.int64).tolist(), cycle.astype(np.int64).tolist(),
                        strict=True))
    rows = {r["cycle_index"]: r for r in data.vendor_cycles}
    for k, p in enumerate(at.astype(np.int64).tolist()):
        row = rows.get(cycle_of.get(p, -1))
        if row is None:
            continue
        for src, name in _ARBIN_STATS.items():
            col = st.get(src)
            if col is not None and np.isfinite(col[k]):
                row[name] = float(col[k])
    data.details["arbin_statistic_rows"] = int(at.size)


# --- Neware ----------------------------------------------------------------------------


def _continued(step_time_s: FloatArray, step: IntArray, cycle: IntArray) -> FloatArray:
    """Test time from a step time that restarts at each step."""
    starts = np.flatnonzero(np.r_[True, (np.diff(step) != 0) | (np.diff(cycle) != 0)])
    if starts.size == 1:
        return step_time_s - step_time_s[0]
    ends = np.r_[starts[1:] - 1, step_time_s.size - 1]
    span = step_time_s[ends] - step_time_s[starts]
    offset = np.r_[0.0, np.cumsum(span)[:-1]]
    seg = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, step_time_s.size]))
    return offset[seg] + step_time_s - step_time_s[starts][seg]


def read_neware(path: Path) -> ImportedData:
    """Neware ``.nda``/``.ndax`` through NewareNDA (currents already signed)."""
    try:
        import NewareNDA
    except ImportError as exc:
        raise MissingReader("Neware files need NewareNDA: pip install 'labdaq[import]'",
                            [{"loc": "format", "msg": str(exc)}]) from exc
    df = NewareNDA.read(str(path))
    cols = {str(k): df[k].to_numpy() for k in df.columns}
    c = Columns(cols)
    t = c.need("time", "Time")
    v = c.need("voltage", "Voltage")
    i = c.need("current", "Current(mA)") / 1000.0
    cyc, stp = numbered(i, c.get("Cycle"), c.get("Step"))
    mah = 1e-3
    vendor = None
    qc, qd = c.get("Charge_Capacity(mAh)"), c.get("Discharge_Capacity(mAh)")
    if qc is not None and qd is not None:
        ec, ed = c.get("Charge_Energy(mWh)"), c.get("Discharge_Energy(mWh)")
        vendor = vendor_cycle_summary(cyc, stp, VendorCounters(
            qc * mah, qd * mah, None if ec is None else ec * mah,
            None if ed is None else ed * mah))
    # NewareNDA's Time restarts at every step (the Timestamp column is whole seconds):
    # each step starts where the one before it ended.
    step_t = t
    t = _continued(t, stp, cyc)
    stamp = c.find("Timestamp")
    start = None
    if stamp is not None:
        ts = np.asarray(df[stamp].to_numpy(), dtype="datetime64[ns]").astype(np.int64) / 1e9
        start = float(ts[0])
    return ImportedData(
        format="neware", reader=_version("NewareNDA"), reader_licence="BSD-3-Clause",
        t_s=t, voltage_v=v, current_a=i, cycle_index=cyc, step_index=stp,
        temperature_c=c.get("T1", "Aux_Temperature_1"), start_utc=start,
        vendor_cycles=vendor, step_time_s=step_t)


# --- BioLogic --------------------------------------------------------------------------


def read_biologic(path: Path) -> ImportedData:
    """BioLogic EC-Lab ``.mpr`` (binary) or ``.mpt`` (text) through galvani. A file
    without a measured current (e.g. an OCV technique) is imported all the same: the
    current comes from its charge column ``(Q-Qo)/mA.h`` where it has one, otherwise it
    is zero, and ``current_measured`` is false."""
    try:
        from galvani import BioLogic
    except ImportError as exc:
        raise MissingReader("BioLogic files need galvani (GPL-3.0): pip install "
                            "'labdaq[import]'", [{"loc": "format", "msg": str(exc)}]) from exc
    start: float | None = None
    if path.suffix.lower() == ".mpt":
        records, _comments = BioLogic.MPTfile(str(path))
    else:
        mpr = BioLogic.MPRfile(str(path))
        records = mpr.data
        stamp = getattr(mpr, "timestamp", None) or getattr(mpr, "startdate", None)
        if isinstance(stamp, datetime):
            start = stamp.timestamp()
    cols = {name: records[name] for name in records.dtype.names}
    c = Columns(cols)
    t = c.need("time", "time/s")
    v = c.need("voltage", "Ewe/V", "<Ewe>/V", "Ecell/V", "<Ecell>/V")
    i_ma = c.get("I/mA", "<I>/mA", "control/mA")
    measured = c.find("I/mA", "<I>/mA") is not None
    q_mah = c.get("(Q-Qo)/mA.h", "(Q-Qo)/mAh")
    if i_ma is None and q_mah is not None:
        # mA·h per s is 3600 mA: the mean current between readings, from the charge passed.
        dt = np.diff(t)
        with np.errstate(divide="ignore", invalid="ignore"):
            i_mid = np.where(dt > 0, np.diff(q_mah) / dt * 3600.0, 0.0)
        i_ma = np.concatenate([[0.0], i_mid])
    i = (np.zeros_like(t) if i_ma is None else i_ma) / 1000.0
    cycle = c.get("cycle number")
    half = c.get("half cycle")
    if cycle is None and half is not None:
        cycle = np.floor(half / 2.0)
    cyc, stp = numbered(i, cycle, c.get("Ns"))
    vendor = None
    q_half = c.get("Q charge/discharge/mA.h")
    if q_half is not None and half is not None:
        # EC-Lab's own counter of each half cycle: positive while charging, negative
        # while discharging, reset when the half cycle changes.
        vendor = vendor_cycle_summary(cyc, ints(half), VendorCounters(
            np.clip(q_half, 0.0, None) / 1000.0, np.clip(-q_half, 0.0, None) / 1000.0))
    return ImportedData(
        format="biologic", reader=_version("galvani"), reader_licence="GPL-3.0-or-later",
        t_s=t - t[0], voltage_v=v, current_a=i, cycle_index=cyc, step_index=stp,
        temperature_c=c.get("Temperature/°C", "Temperature/C"), start_utc=start,
        current_measured=measured, vendor_cycles=vendor,
        details={"columns": sorted(cols)})


FORMATS: dict[str, Callable[[Path], ImportedData]] = {
    "biologic": read_biologic,
    "neware": read_neware,
    "arbin-res": read_arbin_res,
    "arbin-csv": read_arbin_csv,
    "maccor": read_maccor,
    "bdf": read_bdf,
}


def detect_format(path: Path) -> str:
    """The format from the file's name and first bytes."""
    suffix = path.suffix.lower()
    name = path.name.lower()
    by_suffix = {".mpr": "biologic", ".mpt": "biologic", ".nda": "neware", ".ndax": "neware",
                 ".res": "arbin-res", ".parquet": "bdf"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    with path.open("rb") as fh:
        head = fh.read(4096).decode("latin-1")
    if name.endswith(".bdf.csv") or "Test Time / s" in head:
        return "bdf"
    if "Test_Time" in head and "Cycle_Index" in head:
        return "arbin-csv"
    if re.search(r"Rec#|Cyc#", head) or re.fullmatch(r"\.\d{3}", suffix):
        return "maccor"
    raise Invalid("the file's format is not recognised", [
        {"loc": "format", "msg": f"give one of {sorted(FORMATS)}"}])


def read_file(path: Path, fmt: str | None = None) -> ImportedData:
    """Read ``path`` as ``fmt`` (default: :func:`detect_format`). A file its reader cannot
    read is :class:`~labdaq.errors.Invalid` (422), whatever the reader raised."""
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise Invalid("unknown import format", [
            {"loc": "format", "msg": f"{fmt!r}; one of {sorted(FORMATS)}"}])
    try:
        return FORMATS[fmt](path).finite().with_step_starts()
    except LabdaqError:
        raise
    except Exception as exc:  # noqa: BLE001 - third-party readers raise anything on bad input
        raise Invalid(f"the file could not be read as {fmt}", [
            {"loc": "file", "msg": f"{type(exc).__name__}: {str(exc)[:300]}"}]) from exc
