"""`labdaq sim`: start a simulated lab and print the resource strings of its instruments.

The printed table is the contract tests and users rely on: one line per instrument,
``<name> <driver> <resource>``, then a ``ready`` line; ``--write-config`` writes the same
lab as an instruments file (``labdaq instruments check`` accepts it and
``labdaq instruments apply`` loads it unchanged) and ``--describe``
the JSON description the supervisor registers; ``--ports-from`` restarts a lab on the TCP
ports of such a description. ``--fault`` and ``--scenario`` schedule
faults (labdaq.sims.faults); each scheduled fault adds a ``fault <id> ...`` line before
``ready``, and each one firing prints a ``t=<sim s> fault <id> applied|cleared`` line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from labdaq.signals import stop_event

_KINDS = ("smu", "cabinet", "impedance", "logger", "chamber")


def _parse_transports(values: list[str]) -> dict[str, str]:
    """``tcp`` | ``pty`` | ``<kind-or-name>=<tcp|pty>`` -> mapping for SimLab."""
    choice: dict[str, str] = {}
    for value in values:
        key, sep, kind = value.partition("=")
        if not sep:
            key, kind = "default", value
        key, kind = key.strip(), kind.strip().lower()
        if kind not in ("tcp", "pty") or not key:
            raise typer.BadParameter(
                f"{value!r}: expected tcp, pty or <instrument>=<tcp|pty> with <instrument> a "
                f"kind ({', '.join(_KINDS)}) or a name like smu2", param_hint="--transport")
        choice[key] = kind
    return choice


def _ports_from(path: Path) -> dict[str, int]:
    """Instrument name -> TCP port, from a description written by ``--describe``."""
    try:
        desc = json.loads(path.read_text())
        return {inst["name"]: int(inst["resource"].split("::")[2])
                for inst in desc["instruments"] if inst["resource"].startswith("TCPIP::")}
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise ValueError(f"--ports-from {path}: not a lab description ({exc})") from exc


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: a reader never sees half a file


def _bts_table(bts: Any, config: Path) -> dict[str, Any]:
    """The simulated BTS server as an ``[[instruments]]`` table, with every channel its
    ``getdevinfo`` reports (as ``labdaq instruments probe --toml`` writes it for a real
    one). The simulated server runs on this computer and reads step files itself: their
    folder is ``neware_steps`` beside the instruments file."""
    from labdaq.instruments_discovery import instrument_table

    host, port = bts.address
    steps = config.resolve().parent / "neware_steps"
    return instrument_table("neware1", "neware_bts", f"TCPIP::{host}::{port}::SOCKET",
                            timeout_s=10.0, description="simulated Neware BTS 8.0 API server",
                            options={"step_dir_remote": str(steps)})


def sim(
    speed: Annotated[float, typer.Option(help="simulated seconds per wall second")] = 1.0,
    smus: Annotated[int, typer.Option(help="number of simulated Keithley 2450/2460 SMUs")] = 1,
    cabinets: Annotated[int, typer.Option(help="number of multi-channel cycler cabinets")] = 0,
    cabinet_channels: Annotated[int, typer.Option(help="channels per cabinet (1-64)")] = 8,
    impedance: Annotated[int, typer.Option(
        help="number of Hioki BT4560 impedance meters (meter n on cell n)")] = 0,
    loggers: Annotated[int, typer.Option(
        help="number of Keysight DAQ970A thermocouple loggers")] = 0,
    logger_channels: Annotated[int, typer.Option(help="thermocouples per logger (1-20)")] = 4,
    neware: Annotated[int, typer.Option(
        help="channels of a simulated Neware BTS 8.0 API server (0 = none)")] = 0,
    chamber: Annotated[bool, typer.Option(
        "--chamber/--no-chamber", help="an ESPEC chamber holding every cell")] = False,
    transport: Annotated[list[str] | None, typer.Option(
        help="tcp or pty for all, or per kind/name: --transport chamber=pty "
             "(repeatable)")] = None,
    cell: Annotated[str, typer.Option(help="cell specification in seeds/cells")] = "nmc811",
    soc: Annotated[float, typer.Option(help="initial state of charge, 0..1")] = 0.5,
    seed: Annotated[int, typer.Option(help="random seed (cell spread, sensor noise)")] = 1,
    room: Annotated[float, typer.Option(help="room temperature around the chamber, °C")] = 25.0,
    watchdog: Annotated[float, typer.Option(
        help="cycler outputs off after this many wall seconds without a command "
             "(0 = never)")] = 30.0,
    describe: Annotated[
        Path | None, typer.Option(help="write the lab description (JSON) to this file")
    ] = None,
    ports_from: Annotated[Path | None, typer.Option(
        help="serve each TCP instrument on the port it has in this --describe file (a "
             "restarted lab keeps its resource strings)")] = None,
    write_config: Annotated[
        Path | None, typer.Option(help="write an instruments TOML for this lab to this file")
    ] = None,
    fault: Annotated[list[str] | None, typer.Option(
        help="inject a fault: <kind>:<target>[:key=value,...][@<t_s>], e.g. "
             "internal_short:smu1:resistance_ohm=2@600 (repeatable; docs/cells.md)")] = None,
    scenario: Annotated[str | None, typer.Option(
        help="schedule a fault scenario: a name in seeds/scenarios (internal_short, "
             "thermal_runaway, flaky_link, sensor_dropout) or a YAML file; adds the "
             "instruments it needs")] = None,
) -> None:
    """Start a simulated lab and print the resource strings of its instruments."""
    from labdaq.sims.lab import SimLab

    if speed <= 0:
        raise typer.BadParameter(f"{speed!r}: expected > 0", param_hint="--speed")
    if not 0.0 <= soc <= 1.0:
        raise typer.BadParameter(f"{soc!r}: expected 0..1", param_hint="--soc")
    try:
        from labdaq.sims.faults import ScheduledFault, load_scenario, parse_fault_option

        # Faults are validated before anything is served: a typo exits 2, lab unstarted.
        specs = [parse_fault_option(text) for text in fault or []]
        plan = load_scenario(scenario) if scenario else None
        counts = dict(smus=smus, cabinets=cabinets, cabinet_channels=cabinet_channels,
                      impedance=impedance, loggers=loggers, logger_channels=logger_channels,
                      chamber=chamber)
        if plan is not None:
            counts = plan.lab.apply(counts)
        lab = SimLab(
            speed=speed, cell_spec=cell, soc=soc, seed=seed,
            watchdog_s=watchdog if watchdog > 0 else None, room_c=room,
            transport=_parse_transports(transport or []),
            ports=_ports_from(ports_from) if ports_from is not None else None, **counts,
        )
        scheduled = lab.faults.load(plan) if plan is not None else []
        scheduled += [lab.faults.schedule(spec, source="--fault", where=f"--fault {text!r}")
                      for text, spec in zip(fault or [], specs, strict=True)]
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: labdaq sim: {exc}", err=True)
        raise typer.Exit(code=2) from None
    try:
        desc = lab.start()
    except OSError as exc:  # --ports-from: a port taken meanwhile
        typer.echo(f"error: labdaq sim: {exc}", err=True)
        raise typer.Exit(code=1) from None
    bts = None
    try:
        for inst in desc["instruments"]:
            typer.echo(f"{inst['name']:<12} {inst['driver']:<18} {inst['resource']}")
        if neware > 0:
            from labdaq.sims.neware_bts import serve

            # Its own server beside the lab (its cells run the BTS's own step programs).
            bts = serve(neware, speed=speed, cell=cell, soc=soc, seed=seed)
            host, port = bts.address
            typer.echo(f"{'neware1':<12} {'neware_bts':<18} TCPIP::{host}::{port}::SOCKET")
        if write_config is not None:
            extra = [] if bts is None else [_bts_table(bts, write_config)]
            _write_atomic(write_config, lab.instruments_toml(extra))
            typer.echo(f"instruments configuration written to {write_config}")
        if describe is not None:
            _write_atomic(describe, json.dumps(desc, indent=2))
        for f in scheduled:
            typer.echo(f"fault {f.id:<6} {f.describe()}")
        typer.echo(f"ready: {len(desc['instruments'])} simulated instrument(s) at speed "
                   f"{speed:g}; Ctrl-C stops the lab")
        sys.stdout.flush()
        if scheduled:
            def _report(f: ScheduledFault, what: str) -> None:
                t = f.fired_at_s if what == "applied" else f.cleared_at_s
                typer.echo(f"t={t or 0.0:.1f} s fault {f.id} {what}: {f.describe()}")

            lab.faults.on_event = _report
        stop = stop_event()
        while not stop.is_set():
            time.sleep(0.2)
    finally:
        if bts is not None:
            bts.stop()
        lab.stop()
