"""`labdaq import FILE`: bring another lab's cycler file in as a read-only run, straight
into the database (the same as ``POST /api/v1/imports``). Prints the run, the import and
whether this call stored it (the same file again is the same run)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from labdaq.config import load_settings
from labdaq.errors import LabdaqError


async def _import(url: str, path: Path, cell: str | None, fmt: str | None,
                  actor: str, template: str | None) -> dict[str, Any]:
    from labdaq.imports.store import import_file
    from labdaq.storage import models as m
    from labdaq.storage.db import create_engine, session_scope, sessionmaker

    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as session:
            result = await session.run_sync(lambda s: import_file(
                s, path, actor=actor, cell_serial=cell, fmt=fmt, template=template))
            await session.commit()
            row = await session.get(m.Import, result.import_id)
            assert row is not None
            return {"run_id": result.run_id, "import_id": result.import_id,
                    "created": result.created, "format": row.format, "reader": row.reader,
                    "reader_licence": row.reader_licence, "samples": row.n_samples,
                    "current_measured": row.current_measured,
                    "vendor_cycles": len(row.vendor_cycles or []),
                    "file_sha256": row.file_sha256, "template": row.template}
    finally:
        await engine.dispose()


def import_cmd(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True,
                                         help="the cycler's file")],
    cell: Annotated[str | None, typer.Option(
        "--cell", help="serial of the registered cell; default: a cell made from the file")
    ] = None,
    format: Annotated[str | None, typer.Option(
        "--format", "-f", help="biologic | neware | arbin-res | arbin-csv | maccor | bdf; "
                               "default: from the file")] = None,
    template: Annotated[str | None, typer.Option(
        help="the protocol template (seeds/protocols) the other lab's test followed: its "
             "catalogue entries then apply to the run")] = None,
    by: Annotated[str | None, typer.Option(help="who imports it (the audit record's name)")
                  ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="data directory")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy database URL")] = None,
) -> None:
    """Import a BioLogic, Neware, Arbin, Maccor or Battery Data Format file as a run."""
    from labdaq.audit import _local_user

    s = load_settings(data_dir=data_dir, database_url=database_url)
    try:
        out = asyncio.run(_import(s.resolved_database_url, file, cell, format,
                                  by or _local_user(), template))
    except LabdaqError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(json.dumps(out))
