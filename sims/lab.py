"""A simulated lab: instruments with their cells, served over real transports, one clock.

``labdaq sim`` and ``labdaq serve --sim`` use this. ``start()`` returns a description
(name, driver, resource string, channels and the simulated cell on each) that the
supervisor registers in the database and a technician can paste into configuration.
"""

from __future__ import annotations

from typing import Any

from labdaq.sims.clock import SimClock
from labdaq.sims.keithley2450 import MODEL_LIMITS, Keithley2450Sim
from labdaq.sims.server import SimServer


class SimLab:
    def __init__(
        self,
        speed: float = 1.0,
        smus: int = 1,
        cell_spec: str = "nmc811",
        soc: float = 0.5,
        seed: int = 1,
        smu_model: str = "2460",
        watchdog_s: float | None = 30.0,
    ) -> None:
        from labdaq.sims.cell import CellBank, load_cell_spec

        self.clock = SimClock(speed)
        self.spec = load_cell_spec(cell_spec)
        self.servers: list[SimServer] = []
        self.sims: list[Keithley2450Sim] = []
        self._desc: list[dict[str, Any]] = []
        for k in range(1, smus + 1):
            bank = CellBank(self.spec, n=1, soc=soc, ambient_c=25.0, seed=seed + k)
            sim = Keithley2450Sim(
                cell_bank=bank, clock=self.clock, model=smu_model, serial=f"SIM{k:05d}"
            )
            self.sims.append(sim)
            # A watchdog like a real tester's: outputs off if the host stops talking.
            self.servers.append(SimServer.tcp(sim, watchdog_s=watchdog_s, name=f"smu{k}"))
        self.smu_model = smu_model

    def start(self) -> dict[str, Any]:
        limits = MODEL_LIMITS[self.smu_model]
        instruments = []
        for k, server in enumerate(self.servers, start=1):
            server.start()
            spec = self.spec
            instruments.append(
                {
                    "name": f"smu{k}",
                    "driver": "keithley2450",
                    "model": f"Keithley {self.smu_model} (simulated)",
                    "resource": server.resource,
                    "channels": [
                        {
                            "index": 1,
                            "name": f"smu{k}/1",
                            "max_current_a": float(limits["i_max"]),
                            "max_voltage_v": float(limits["v_max"]),
                            "cell": {
                                "serial": f"SIM-{spec.name.upper()}-{k:03d}",
                                "chemistry": spec.chemistry,
                                "spec_name": spec.name,
                                "capacity_ah": spec.capacity_ah,
                                "nominal_voltage_v": spec.nominal_voltage_v,
                                "charge_cutoff_v": spec.charge_cutoff_v,
                                "discharge_cutoff_v": spec.discharge_cutoff_v,
                                "max_charge_current_a": spec.max_charge_current_a,
                                "max_discharge_current_a": spec.max_discharge_current_a,
                            },
                        }
                    ],
                }
            )
        return {"speed": self.clock.speed, "instruments": instruments}

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> dict[str, Any]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
