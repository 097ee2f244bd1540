"""A simulated lab: instruments with their cells, served over real transports, one clock.

``labdaq sim`` and ``labdaq serve --sim`` use this. A lab has Keithley SMUs (one cell
each), multi-channel cycler cabinets (one cell per channel), Hioki BT4560 impedance meters
and Keysight DAQ970A thermocouple loggers wired to those cells, and an ESPEC chamber that
every cell sits in (the chamber sets the cells' ambient temperature). Each instrument is
served over TCP or a pseudo-terminal, chosen per instrument.

``start()`` returns a description (name, driver, resource string, channels and the
simulated cell on each) that the supervisor registers in the database and a technician
can paste into configuration; :meth:`SimLab.instruments_toml` renders the same lab as an
instruments file (with each cycler channel's cell and wiring, and ``[[cells]]``) for
``labdaq instruments check`` and ``labdaq instruments apply``. Cycler channels carry their cell;
other instruments have ``"channels": []`` (the supervisor registers channels with cells
only) and say in ``"wiring"`` what they are connected to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labdaq.sims.clock import Clock, SimClock
from labdaq.sims.keithley2450 import MODEL_LIMITS, Keithley2450Sim
from labdaq.sims.server import SimServer

if TYPE_CHECKING:
    from labdaq.sims.faults import FaultScheduler

KINDS = ("smu", "cabinet", "impedance", "logger", "chamber")
TRANSPORTS = ("tcp", "pty")
CRLF = "\r\n"


def make_cell_bank(spec_name: str, k: int, soc: float, seed: int) -> Any:
    """The cell on SMU ``k``; tests build the same cell to compute expected results."""
    from labdaq.sims.cell import CellBank, load_cell_spec

    return CellBank(load_cell_spec(spec_name), n=1, soc=soc, ambient_c=25.0, seed=seed + k)


def make_cabinet_bank(spec_name: str, c: int, channels: int, soc: float, seed: int) -> Any:
    """The cells of cabinet ``c`` (one per channel), reproducible from the lab's seed."""
    from labdaq.sims.cell import CellBank, load_cell_spec

    return CellBank(load_cell_spec(spec_name), n=channels, soc=soc, ambient_c=25.0,
                    seed=seed + 1000 * c)


@dataclass
class SimInstrument:
    """One simulated instrument of the lab and how it is served."""

    name: str
    kind: str
    driver: str
    model: str
    sim: Any
    transport: str
    termination: str = "\n"
    watchdog_s: float | None = None
    channels: list[dict[str, Any]] = field(default_factory=list)
    wiring: dict[str, str] = field(default_factory=dict)
    driver_options: dict[str, Any] = field(default_factory=dict)
    server: Any = None

    @property
    def resource(self) -> str:
        return str(self.server.resource) if self.server is not None else ""


@dataclass(frozen=True)
class _Cell:
    """A cell in the lab: which bank, which index, and its description for registration."""

    bank: Any
    index: int
    info: dict[str, Any]


class SimLab:
    """Build, serve and stop a simulated lab on one :class:`SimClock`.

    ``transport`` is ``"tcp"`` or ``"pty"`` for every instrument, or a mapping from an
    instrument name (``"smu2"``) or kind (``"smu"``, ``"cabinet"``, ``"impedance"``,
    ``"logger"``, ``"chamber"``) to one of those, with ``"default"`` for the rest.
    ``watchdog_s`` (wall seconds) turns cycler outputs off when the host stops talking.
    """

    def __init__(
        self,
        speed: float = 1.0,
        smus: int = 1,
        cell_spec: str = "nmc811",
        soc: float = 0.5,
        seed: int = 1,
        smu_model: str = "2460",
        watchdog_s: float | None = 30.0,
        *,
        cabinets: int = 0,
        cabinet_channels: int = 8,
        cabinet_current_max_a: float = 10.0,
        impedance: int = 0,
        loggers: int = 0,
        logger_channels: int = 4,
        chamber: bool | int = False,
        room_c: float = 25.0,
        transport: str | Mapping[str, str] = "tcp",
        clock: Clock | None = None,
        ports: Mapping[str, int] | None = None,
    ) -> None:
        from labdaq.sims.cell import load_cell_spec

        for label, count in (("smus", smus), ("cabinets", cabinets), ("impedance", impedance),
                             ("loggers", loggers)):
            if count < 0:
                raise ValueError(f"{label} must be >= 0, got {count!r}")
        if int(chamber) not in (0, 1):
            raise ValueError(f"a lab has at most one chamber, got {chamber!r}")
        if not 1 <= cabinet_channels <= 64:
            raise ValueError(f"cabinet_channels must be 1..64, got {cabinet_channels!r}")
        if not 1 <= logger_channels <= 20:
            raise ValueError(f"logger_channels must be 1..20, got {logger_channels!r}")
        if smu_model not in MODEL_LIMITS:
            raise ValueError(f"smu_model must be one of {sorted(MODEL_LIMITS)}")
        self._transport = self._check_transport(transport)
        # Instrument name -> TCP port (0 or absent: any free one). A lab restarted on the
        # ports it had keeps its resource strings, so its clients simply reconnect.
        self._ports = dict(ports or {})
        # A ManualClock makes a lab deterministic (tests, benchmarks); `speed` is then unused.
        self.clock: Any = clock if clock is not None else SimClock(speed)
        self._faults: FaultScheduler | None = None
        self.spec = load_cell_spec(cell_spec)
        self.smu_model = smu_model
        self.seed = seed
        self.instruments: list[SimInstrument] = []
        self.cells: list[_Cell] = []
        self._started = False

        for k in range(1, smus + 1):
            self._add_smu(k, cell_spec, soc, seed, watchdog_s)
        for c in range(1, cabinets + 1):
            self._add_cabinet(c, cell_spec, cabinet_channels, cabinet_current_max_a, soc,
                              seed, watchdog_s)
        chamber_sim = self._make_chamber(room_c) if chamber else None
        for h in range(1, impedance + 1):
            self._add_impedance(h, seed)
        for g in range(1, loggers + 1):
            self._add_logger(g, logger_channels, seed, chamber_sim)
        if chamber_sim is not None:
            self._add_chamber(chamber_sim)

    # -- construction ---------------------------------------------------------------------
    @staticmethod
    def _check_transport(transport: str | Mapping[str, str]) -> dict[str, str]:
        choice = {"default": transport} if isinstance(transport, str) else dict(transport)
        choice.setdefault("default", "tcp")
        for key, value in choice.items():
            if value not in TRANSPORTS:
                raise ValueError(f"transport for {key!r} is {value!r}; expected one of "
                                 f"{TRANSPORTS}")
        return choice

    def transport_for(self, name: str, kind: str) -> str:
        return self._transport.get(name, self._transport.get(kind, self._transport["default"]))

    def _cell_info(self, serial: str) -> dict[str, Any]:
        spec = self.spec
        return {
            "serial": serial,
            "chemistry": spec.chemistry,
            "spec_name": spec.name,
            "capacity_ah": spec.capacity_ah,
            "nominal_voltage_v": spec.nominal_voltage_v,
            "charge_cutoff_v": spec.charge_cutoff_v,
            "discharge_cutoff_v": spec.discharge_cutoff_v,
            "max_charge_current_a": spec.max_charge_current_a,
            "max_discharge_current_a": spec.max_discharge_current_a,
        }

    def _add(self, inst: SimInstrument) -> SimInstrument:
        if any(other.name == inst.name for other in self.instruments):
            raise ValueError(f"duplicate instrument name {inst.name!r}")
        self.instruments.append(inst)
        return inst

    def _add_smu(self, k: int, cell_spec: str, soc: float, seed: int,
                 watchdog_s: float | None) -> None:
        bank = make_cell_bank(cell_spec, k, soc, seed)
        sim = Keithley2450Sim(cell_bank=bank, clock=self.clock, model=self.smu_model,
                              serial=f"SIM{k:05d}")
        name = f"smu{k}"
        limits = MODEL_LIMITS[self.smu_model]
        cell = _Cell(bank, 0, self._cell_info(f"SIM-{self.spec.name.upper()}-{k:03d}"))
        self.cells.append(cell)
        self._add(SimInstrument(
            name=name, kind="smu", driver="keithley2450",
            model=f"Keithley {self.smu_model} (simulated)", sim=sim,
            transport=self.transport_for(name, "smu"),
            # A watchdog like a real tester's: outputs off if the host stops talking.
            watchdog_s=watchdog_s,
            channels=[{
                "index": 1, "name": f"{name}/1",
                "max_current_a": float(limits["i_max"]),
                "max_voltage_v": float(limits["v_max"]),
                "cell": cell.info,
            }],
            driver_options={"model": self.smu_model},
        ))

    def _add_cabinet(self, c: int, cell_spec: str, channels: int, current_max_a: float,
                     soc: float, seed: int, watchdog_s: float | None) -> None:
        from labdaq.sims.cabinet import VOLTAGE_MAX_V, CabinetSim

        bank = make_cabinet_bank(cell_spec, c, channels, soc, seed)
        sim = CabinetSim(channels=channels, cell_spec=bank, clock=self.clock,
                         current_max_a=current_max_a, serial=f"CYCSIM{c:04d}")
        name = f"cabinet{c}"
        chans = []
        for ch in range(1, channels + 1):
            serial = f"SIM-{self.spec.name.upper()}-C{c}-{ch:03d}"
            cell = _Cell(bank, ch - 1, self._cell_info(serial))
            self.cells.append(cell)
            chans.append({
                "index": ch, "name": f"{name}/{ch}",
                "max_current_a": float(current_max_a), "max_voltage_v": float(VOLTAGE_MAX_V),
                "cell": cell.info,
            })
        self._add(SimInstrument(
            name=name, kind="cabinet", driver="cabinet",
            model=f"LABDAQ CYC-{channels} (simulated)", sim=sim,
            transport=self.transport_for(name, "cabinet"), watchdog_s=watchdog_s,
            channels=chans,
            driver_options={"channels": channels, "current_max_a": float(current_max_a),
                            "voltage_max_v": float(VOLTAGE_MAX_V)},
        ))

    def _add_impedance(self, h: int, seed: int) -> None:
        from labdaq.sims.hioki_bt4560 import HiokiBT4560Sim

        name = f"eis{h}"
        # Meter h is clipped to cell h of the lab (a meter with no cell reads "no contact").
        cell = self.cells[h - 1] if h - 1 < len(self.cells) else None
        sim = HiokiBT4560Sim(cell.bank if cell else None, index=cell.index if cell else 0,
                             clock=self.clock, seed=seed + 2000 + h, serial=f"SIM{h:06d}")
        self._add(SimInstrument(
            name=name, kind="impedance", driver="hioki_bt4560",
            model="Hioki BT4560 (simulated)", sim=sim,
            transport=self.transport_for(name, "impedance"), termination=CRLF,
            wiring={"leads": f"cell {cell.info['serial']}" if cell else "open"},
        ))

    def _add_logger(self, g: int, channels: int, seed: int, chamber_sim: Any) -> None:
        from labdaq.sims.keysight_daq970a import DAQ970ASim

        name = f"logger{g}"
        sources: dict[int, Callable[[], float]] = {}
        wiring: dict[str, str] = {}
        numbers = [101 + i for i in range(channels)]
        # Thermocouples on the cells in lab order; the last one measures the chamber air
        # when there is a chamber (the reference a test report quotes next to the cells).
        cell_slots = numbers[:-1] if chamber_sim is not None else numbers
        for number, cell in zip(cell_slots, self.cells, strict=False):
            sources[number] = _cell_temperature(cell.bank, cell.index)
            wiring[str(number)] = f"cell {cell.info['serial']}"
        if chamber_sim is not None:
            sources[numbers[-1]] = _chamber_air(chamber_sim)
            wiring[str(numbers[-1])] = "chamber air"
        for number in numbers:
            wiring.setdefault(str(number), "open")
        sim = DAQ970ASim(sources, clock=self.clock, seed=seed + 3000 + g,
                         serial=f"MYSIM{g:05d}")
        self._add(SimInstrument(
            name=name, kind="logger", driver="keysight_daq970a",
            model="Keysight DAQ970A + DAQM901A (simulated)", sim=sim,
            transport=self.transport_for(name, "logger"), wiring=wiring,
            driver_options={"channels": numbers, "tc_type": "K"},
        ))

    def _make_chamber(self, room_c: float) -> Any:
        from labdaq.sims.espec_chamber import EspecChamberSim

        banks: list[Any] = []
        for cell in self.cells:
            if all(cell.bank is not b for b in banks):
                banks.append(cell.bank)
        # Starts in STANDBY at room temperature: the cells keep the ambient they were
        # built with until a test asks for another condition.
        return EspecChamberSim(banks, self.clock, room_c=room_c, initial_c=room_c)

    def _add_chamber(self, sim: Any) -> None:
        name = "chamber1"
        self._add(SimInstrument(
            name=name, kind="chamber", driver="espec_chamber",
            model=f"ESPEC {sim.model} (simulated)", sim=sim,
            transport=self.transport_for(name, "chamber"), termination=CRLF,
            wiring={"contains": ", ".join(c.info["serial"] for c in self.cells) or "empty"},
            driver_options={"min_c": sim.min_c, "max_c": sim.max_c},
        ))

    # -- lifecycle ---------------------------------------------------------------------------
    def _serve(self, inst: SimInstrument) -> Any:
        kwargs: dict[str, Any] = {"name": inst.name, "read_termination": inst.termination,
                                  "write_termination": inst.termination}
        if inst.watchdog_s is not None:
            kwargs["watchdog_s"] = inst.watchdog_s
        if inst.transport == "pty":
            return SimServer.pty(inst.sim, **kwargs)
        return SimServer.tcp(inst.sim, port=self._ports.get(inst.name, 0), **kwargs)

    def start(self) -> dict[str, Any]:
        if not self._started:
            try:
                for inst in self.instruments:
                    inst.server = self._serve(inst)
                    inst.server.start()
            except Exception:
                self.stop()
                raise
            self._started = True
            if self._faults is not None:
                self._faults.start()  # faults injected before start() fire now
        return self.description()

    def description(self) -> dict[str, Any]:
        """The lab as data (the format the supervisor registers)."""
        instruments = []
        for inst in self.instruments:
            entry: dict[str, Any] = {
                "name": inst.name, "driver": inst.driver, "model": inst.model,
                "resource": inst.resource, "transport": inst.transport,
                "channels": inst.channels,
            }
            if inst.wiring:
                entry["wiring"] = inst.wiring
            options: dict[str, Any] = dict(inst.driver_options)
            if inst.termination != "\n":
                options["transport"] = {"read_termination": inst.termination,
                                        "write_termination": inst.termination}
            entry["options"] = options
            instruments.append(entry)
        return {"speed": self.clock.speed, "instruments": instruments}

    def channel_wiring(self, serial: str) -> dict[str, Any]:
        """What is wired to cell ``serial``, as an instruments file's channel says it."""
        wiring: dict[str, Any] = {}
        for inst in self.instruments:
            if inst.kind == "impedance" and inst.wiring.get("leads") == f"cell {serial}":
                wiring.setdefault("impedance", inst.name)
            elif inst.kind == "chamber" and serial in inst.wiring.get("contains", "").split(", "):
                wiring.setdefault("chamber", inst.name)
            elif inst.kind == "logger":
                for number, target in inst.wiring.items():
                    if target == f"cell {serial}":
                        wiring.setdefault("thermocouple", {
                            "logger": inst.name, "channel": int(number),
                            "type": inst.driver_options.get("tc_type", "K"),
                            "placement": "cell surface (simulated)"})
        return wiring

    def instruments_config(self) -> list[dict[str, Any]]:
        """The lab as ``[[instruments]]`` tables (see labdaq.instruments_config)."""
        tables = []
        for inst in self.instruments:
            # No transport options: the opener frames each link as its driver declares
            # (CR+LF for the Hioki and the ESPEC controller), as a technician's file would.
            options: dict[str, Any] = dict(inst.driver_options)
            tables.append({
                "name": inst.name, "driver": inst.driver, "resource": inst.resource,
                "description": inst.model, "options": options,
                "channels": [
                    {"index": ch["index"], "name": ch["name"],
                     "max_current_a": ch["max_current_a"], "max_voltage_v": ch["max_voltage_v"],
                     "cell": ch["cell"]["serial"],
                     **self.channel_wiring(ch["cell"]["serial"])}
                    for ch in inst.channels
                ],
            })
        return tables

    def cells_config(self) -> list[dict[str, Any]]:
        """The lab's cells as ``[[cells]]`` tables (each channel's ``cell`` names one)."""
        return [dict(cell.info) for cell in self.cells]

    def instruments_toml(self, extra: Sequence[Mapping[str, Any]] = ()) -> str:
        """The lab as an instruments file; ``extra``: tables of instruments served beside
        it (``labdaq sim --neware``)."""
        from labdaq.instruments_config import dump_instruments_toml

        header = (f"Simulated lab (labdaq sim, speed {self.clock.speed:g}, seed {self.seed}).\n"
                  "Resources are valid while that `labdaq sim` process runs.")
        return dump_instruments_toml([*self.instruments_config(), *extra], header=header,
                                     cells=self.cells_config())

    def by_name(self, name: str) -> SimInstrument:
        for inst in self.instruments:
            if inst.name == name:
                return inst
        raise KeyError(name)


    @property
    def faults(self) -> FaultScheduler:
        """Fault injection and scenarios on this lab's clock (labdaq.sims.faults)."""
        if self._faults is None:
            from labdaq.sims.faults import FaultScheduler

            self._faults = FaultScheduler(self)
        return self._faults

    def stop(self) -> None:
        if self._faults is not None:
            self._faults.stop()
        for inst in self.instruments:
            if inst.server is not None:
                inst.server.stop()
        self._started = False

    def __enter__(self) -> dict[str, Any]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cell_temperature(bank: Any, index: int) -> Callable[[], float]:
    def read() -> float:
        return float(bank.temperature_c[index])

    return read


def _chamber_air(chamber: Any) -> Callable[[], float]:
    def read() -> float:
        return float(chamber.air_c)

    return read
