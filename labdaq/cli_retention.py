"""`labdaq retention archive`: archived exports and downsampled copies of ended runs
(labdaq.retention). Raw samples are kept; each run archived is an audit event with the
local user's name and the role ``cli``."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from labdaq.cli_auth import DataDir, DbUrl
from labdaq.config import load_settings
from labdaq.errors import LabdaqError

retention_app = typer.Typer(help="Retention: archive ended runs (raw samples are kept).")


@retention_app.command("archive")
def archive(
    run: Annotated[list[int] | None, typer.Option(
        "--run", help="this ended run (repeatable); default: every run due")] = None,
    ended_days: Annotated[float, typer.Option(
        min=0, help="runs that ended more than this many days ago are due")] = 30.0,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
) -> None:
    """Write each due run's Parquet export to the archive folder and keep a downsampled
    copy in the database; prints one JSON line per run."""
    from labdaq import retention
    from labdaq.storage.db import create_engine, sessionmaker

    s = load_settings(data_dir=data_dir, database_url=database_url)
    folder = s.archive_dir or s.data_dir / "archive"

    async def main() -> None:
        engine = create_engine(s.resolved_database_url)
        try:
            maker = sessionmaker(engine, audit_head_file=s.audit_head_file)
            runs = list(run or [])
            if not runs:
                async with maker() as session:
                    runs = await retention.due_runs(
                        session, datetime.now(UTC) - timedelta(days=ended_days))
            for run_id in runs:
                done = await retention.archive_run(maker, s.resolved_database_url, run_id,
                                                   folder, s.retention_points)
                typer.echo(json.dumps(done.__dict__))
        finally:
            await engine.dispose()

    try:
        asyncio.run(main())
    except LabdaqError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
