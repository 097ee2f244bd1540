"""`labdaq export RUN`: write a run's samples to a file, straight from the database.

The same export as ``GET /api/v1/runs/{id}/export`` (labdaq.export), without the API:
for the lab's own scripts and for archiving a run before anything else happens to it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from labdaq.config import load_settings
from labdaq.errors import LabdaqError


async def _plan(url: str, run_id: int, fmt: str) -> Any:
    from labdaq import export
    from labdaq.storage.db import create_engine, session_scope, sessionmaker

    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as session:
            return await export.plan_run_export(session, run_id, fmt)
    finally:
        await engine.dispose()


def export_cmd(
    run: Annotated[int, typer.Argument(help="run id")],
    format: Annotated[str, typer.Option("--format", "-f", help="csv | parquet | bdf")] = "csv",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="file to write; default run-<id>.<ext>")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="data directory")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy database URL")] = None,
) -> None:
    """Export a run's samples (CSV, Parquet or Battery Data Format) with its description."""
    from labdaq import export

    s = load_settings(data_dir=data_dir, database_url=database_url)
    url = s.resolved_database_url
    try:
        plan = asyncio.run(_plan(url, run, format))
    except LabdaqError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    path = output or Path(f"run-{run}{export.SUFFIXES[format]}")
    meta = export.export_to_file(url, plan, format, str(path))
    typer.echo(json.dumps({
        "path": str(path), "format": format, "rows": int(meta["rows"]),
        "data_sha256": meta["data_sha256"],
    }))
