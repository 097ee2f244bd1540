"""`labdaq sim`: start a simulated lab and print the resource strings of its instruments."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Annotated

import typer


def sim(
    speed: Annotated[float, typer.Option(help="simulated seconds per wall second")] = 1.0,
    smus: Annotated[int, typer.Option(help="number of simulated Keithley 2450 SMUs")] = 1,
    cell: Annotated[str, typer.Option(help="cell specification in seeds/cells")] = "nmc811",
    soc: Annotated[float, typer.Option(help="initial state of charge, 0..1")] = 0.5,
    seed: int = 1,
    describe: Annotated[
        Path | None, typer.Option(help="write the lab description (JSON) to this file")
    ] = None,
) -> None:
    """Start a simulated lab and print the resource strings of its instruments."""
    from labdaq.sims.lab import SimLab

    lab = SimLab(speed=speed, smus=smus, cell_spec=cell, soc=soc, seed=seed)
    desc = lab.start()
    for inst in desc["instruments"]:
        typer.echo(f"{inst['name']:<12} {inst['driver']:<14} {inst['resource']}")
    if describe is not None:
        tmp = describe.with_suffix(".tmp")
        tmp.write_text(json.dumps(desc, indent=2))
        tmp.replace(describe)  # atomic: the supervisor never reads half a file
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop:
            time.sleep(0.2)
    finally:
        lab.stop()
