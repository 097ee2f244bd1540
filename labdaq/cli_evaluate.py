"""`labdaq evaluate RUN`: judge a stored run against the benchmark catalogue entries its
protocol serves and print the verdicts (``--json`` for the full result with values,
uncertainties, evidence and decision rules; ``--store`` keeps them in the database;
``--report FILE`` writes the HTML test report). Observations a technician made (no fire,
no leakage, mass loss ...) are given as ``--observe metric=value`` for one evaluation, or
recorded with the run by `labdaq observe RUN metric=value --by NAME`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

EXIT_BAD_INPUT = 2


def _value(text: str) -> float | bool:
    low = text.strip().lower()
    if low in ("true", "yes", "1"):
        return True
    if low in ("false", "no", "0"):
        return False
    return float(text)


def _parse_observations(items: list[str]) -> dict[str, float | bool]:
    from labdaq.benchmarks.store import observable_metrics

    known = observable_metrics()
    out: dict[str, float | bool] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in known:
            raise typer.BadParameter(f"{item!r}: expected name=value with a catalogue "
                                     f"metric or band quantity: {', '.join(sorted(known))}")
        try:
            out[name] = _value(value)
        except ValueError as exc:
            raise typer.BadParameter(f"{item!r}: value must be a number or true/false") from exc
    return out


async def _evaluate(url: str, run_id: int, options: dict[str, Any], rule: str,
                    store: bool, report: Path | None) -> tuple[Any, list[Any]]:
    from labdaq.benchmarks.evaluate import evaluate_run, ocv_of
    from labdaq.benchmarks.rundata import load_run_data
    from labdaq.benchmarks.store import store_evaluation
    from labdaq.storage.db import create_engine, session_scope, sessionmaker

    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as session:
            before = options.pop("ocv_before_run", None)
            if before is not None:
                ref = await session.run_sync(lambda s: load_run_data(s, before))
                options["ocv_before_v"] = ocv_of(ref)
            data = await session.run_sync(lambda s: load_run_data(s, run_id, **options))
            results = evaluate_run(data, rule=rule)  # type: ignore[arg-type]
            if store:
                await session.run_sync(lambda s: store_evaluation(s, data, results))
    finally:
        await engine.dispose()
    if report is not None:
        from labdaq.benchmarks.report import render_report

        report.write_text(render_report(data, results), encoding="utf-8")
    return data, results


def evaluate(
    run_id: Annotated[int, typer.Argument(help="run id")],
    observe: Annotated[list[str] | None, typer.Option(
        help="a technician's observation or external measurement, metric=value "
             "(repeatable), e.g. no_disassembly_fire=true")] = None,
    spec_cycles: Annotated[int | None, typer.Option(
        help="datasheet cycle count to judge capacity retention at")] = None,
    rule: Annotated[str, typer.Option(help="decision rule: simple or guarded")] = "simple",
    as_json: Annotated[bool, typer.Option("--json", help="print the full result as JSON")] = False,
    store: Annotated[bool, typer.Option(
        help="store the results in the evaluations table")] = False,
    report: Annotated[Path | None, typer.Option(
        help="write the HTML test report to this file")] = None,
    ocv_before_run: Annotated[int | None, typer.Option(
        help="UN 38.3 T.1-T.4: the OCV check run made before the stress (RUN is the one "
             "after)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="data directory")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy database URL")] = None,
) -> None:
    """Judge RUN against the benchmark catalogue."""
    from labdaq.benchmarks.evaluate import NotEvaluable
    from labdaq.config import load_settings

    if rule not in ("simple", "guarded"):
        raise typer.BadParameter("rule must be simple or guarded")
    options: dict[str, Any] = {"observations": _parse_observations(observe or [])}
    if spec_cycles is not None:
        options["spec_cycles"] = spec_cycles
    if ocv_before_run is not None:
        options["ocv_before_run"] = ocv_before_run
    url = load_settings(data_dir=data_dir, database_url=database_url).resolved_database_url
    try:
        data, results = asyncio.run(_evaluate(url, run_id, options, rule, store, report))
    except KeyError as exc:
        typer.echo(f"labdaq evaluate: {exc.args[0]}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    except NotEvaluable as exc:
        typer.echo(f"labdaq evaluate: --ocv-before-run: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in results], indent=2, default=str))
        return
    if data.template_note:
        typer.echo(f"run {run_id}: {data.template_note}")
    if not results:
        if not data.imported:
            typer.echo(f"run {run_id}: no catalogue entry names its protocol")
        return
    for r in results:
        typer.echo(f"{r.entry_id:32s} {r.verdict:14s} {r.clause} — {r.title}")
        for c in r.criteria:
            value = c.value if not isinstance(c.value, float) else f"{c.value:.6g}"
            why = f"  ({c.reason})" if c.reason else ""
            typer.echo(f"    {c.metric} {c.comparison} {c.limit} {c.unit}: {value} "
                       f"-> {c.verdict}{why}")


async def _record(url: str, run_id: int, values: dict[str, float | bool], by: str,
                  note: str | None) -> None:
    from labdaq.benchmarks.store import record_observation
    from labdaq.storage.db import create_engine, session_scope, sessionmaker

    def add_all(s: Any) -> None:
        for metric, value in values.items():
            record_observation(s, run_id, metric, value, by, note)

    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as session:
            await session.run_sync(add_all)
    finally:
        await engine.dispose()


def observe(
    run_id: Annotated[int, typer.Argument(help="run id")],
    values: Annotated[list[str], typer.Argument(
        help="metric=value, e.g. no_disassembly_fire=true mass_loss_pct=0.05")],
    by: Annotated[str, typer.Option(help="who observed it")],
    note: Annotated[str | None, typer.Option(help="free text kept with it")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="data directory")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy database URL")] = None,
) -> None:
    """Record a technician's observations for RUN (used by every later evaluation)."""
    from labdaq.config import load_settings

    parsed = _parse_observations(values)
    url = load_settings(data_dir=data_dir, database_url=database_url).resolved_database_url
    try:
        asyncio.run(_record(url, run_id, parsed, by, note))
    except KeyError as exc:
        typer.echo(f"labdaq observe: {exc.args[0]}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    typer.echo(f"run {run_id}: recorded {', '.join(f'{k}={v}' for k, v in parsed.items())}")
