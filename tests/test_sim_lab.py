"""The simulated lab in process: description format the supervisor relies on, instruments
of every kind reachable through their drivers, the chamber driving the cells' ambient, the
logger wired to cells and chamber air, transport choice per instrument."""

from __future__ import annotations

import time

import numpy as np
import pytest

from labdaq.drivers.opener import open_configured
from labdaq.instruments_config import parse_instruments_config
from labdaq.sims.lab import SimLab, make_cell_bank

CELL_KEYS = {"serial", "chemistry", "spec_name", "capacity_ah", "nominal_voltage_v",
             "charge_cutoff_v", "discharge_cutoff_v", "max_charge_current_a",
             "max_discharge_current_a"}


def test_default_lab_description_is_unchanged() -> None:
    lab = SimLab(speed=10.0, seed=1)
    with lab as desc:
        assert desc["speed"] == 10.0
        (inst,) = desc["instruments"]
        assert inst["name"] == "smu1" and inst["driver"] == "keithley2450"
        assert inst["resource"].startswith("TCPIP::127.0.0.1::")
        (ch,) = inst["channels"]
        assert {"index", "name", "max_current_a", "max_voltage_v", "cell"} <= set(ch)
        assert ch["index"] == 1 and ch["name"] == "smu1/1"
        assert set(ch["cell"]) == CELL_KEYS
        assert ch["cell"]["serial"] == "SIM-NMC811-001"
        # The e2e test rebuilds the same cell to compute expectations.
        bank = make_cell_bank("nmc811", 1, 0.5, 1)
        assert float(bank.capacity_ah[0]) == pytest.approx(
            float(lab.by_name("smu1").sim.cell.capacity_ah[0]))


def test_full_lab_through_drivers() -> None:
    lab = SimLab(speed=1.0, smus=1, cabinets=2, cabinet_channels=3, impedance=1, loggers=1,
                 logger_channels=5, chamber=True, watchdog_s=None,
                 transport={"default": "tcp", "chamber": "pty", "logger1": "pty"})
    with lab as desc:
        names = [i["name"] for i in desc["instruments"]]
        assert names == ["smu1", "cabinet1", "cabinet2", "eis1", "logger1", "chamber1"]
        by_name = {i["name"]: i for i in desc["instruments"]}
        assert by_name["chamber1"]["resource"].startswith("ASRL/dev/")
        assert by_name["logger1"]["resource"].startswith("ASRL/dev/")
        assert by_name["cabinet2"]["resource"].startswith("TCPIP::")
        for name in ("eis1", "logger1", "chamber1"):
            assert by_name[name]["channels"] == []
        serials = [ch["cell"]["serial"] for i in desc["instruments"] for ch in i["channels"]]
        assert len(serials) == 1 + 2 * 3 and len(set(serials)) == len(serials)
        assert by_name["logger1"]["wiring"]["101"] == "cell SIM-NMC811-001"
        assert by_name["logger1"]["wiring"]["105"] == "chamber air"
        assert by_name["eis1"]["wiring"]["leads"] == "cell SIM-NMC811-001"

        cfg = parse_instruments_config({"instruments": lab.instruments_config()})
        drivers = {inst.name: open_configured(inst, timeout_s=2.0) for inst in cfg.instruments}
        try:
            chamber = drivers["chamber1"]
            assert chamber.status() == "standby"
            assert chamber.actual_c() == pytest.approx(25.0, abs=0.05)
            chamber.set_point_c(45.0)
            # Speed the clock up so the chamber settles within the test.
            lab.clock.speed = 2000.0
            deadline_s = 60.0  # a condition poll: only a hang reaches this
            t0 = time.monotonic()
            while abs(chamber.actual_c() - 45.0) > 0.2 and time.monotonic() - t0 < deadline_s:
                time.sleep(0.05)
            assert chamber.actual_c() == pytest.approx(45.0, abs=0.2)
            lab.clock.speed = 1.0
            air = lab.by_name("chamber1").sim.air_c
            # Every cell in the lab now sits in 45 °C air.
            for cell in lab.cells:
                assert float(np.asarray(cell.bank.ambient_c)[cell.index]) == pytest.approx(
                    air, abs=0.5)
            logger = drivers["logger1"]
            temps = np.asarray(logger.read_temperatures_c(), dtype=float)
            assert temps.shape == (5,)
            assert temps[-1] == pytest.approx(45.0, abs=0.5)  # chamber air thermocouple
            assert np.all(temps[:-1] > 26.0)  # cells warming towards the chamber
            z = drivers["eis1"].sweep([1000.0])
            assert np.isfinite(z).all() and z.real[0] > 0
            v = drivers["cabinet1"].measure()
            assert v.shape == (3, 3)
            assert np.all((v[:, 0] > 3.0) & (v[:, 0] < 4.3))
            row = drivers["smu1"].measure()
            assert 3.0 < row[0, 0] < 4.3
        finally:
            for d in drivers.values():
                d.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"transport": "udp"}, "transport"), ({"transport": {"chamber": "serial"}}, "chamber"),
     ({"smus": -1}, "smus"), ({"chamber": 2}, "one chamber"),
     ({"cabinet_channels": 65}, "cabinet_channels"), ({"smu_model": "2400"}, "smu_model")],
)
def test_bad_lab_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SimLab(**kwargs)  # type: ignore[arg-type]
