"""Evaluation, observations and reports of a stored run for the HTTP API: async wrappers
around :mod:`.rundata`, :mod:`.evaluate`, :mod:`.store` and :mod:`.report` that raise the
project's domain errors (labdaq.errors) and write the audit events. The CLI
(labdaq.cli_evaluate) calls the same library functions directly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from labdaq import run_states
from labdaq.benchmarks.catalogue import METRICS
from labdaq.benchmarks.evaluate import (
    ChannelAccuracy,
    EntryResult,
    NotEvaluable,
    RunData,
    evaluate_run,
    ocv_of,
)
from labdaq.benchmarks.rundata import load_run_data
from labdaq.benchmarks.store import (
    _jsonable,
    catalogue_sha256,
    data_sha256,
    latest_evaluation,
    record_observation,
    store_evaluation,
)
from labdaq.errors import Invalid, LabdaqError, NotFound
from labdaq.imports.template import run_template
from labdaq.storage import models as m

__all__ = [
    "Evaluated",
    "accuracy_of",
    "evaluate",
    "evaluate_out",
    "evaluate_cell",
    "store",
    "stored",
    "add_observations",
    "list_observations",
    "report_html",
    "html_to_pdf",
    "PdfUnavailable",
]

Rule = Literal["simple", "guarded"]


class PdfUnavailable(LabdaqError):
    """WeasyPrint (or its system libraries, pango) is not installed on the server."""

    status_code = 501


@dataclass
class Evaluated:
    """One evaluation of a run, fresh or as stored, ready to serialise."""

    run_id: int
    rule: str | None
    stored: bool
    data_sha256: str
    catalogue_sha256: str
    software_version: str | None
    entries: list[dict[str, Any]]
    # The protocol name the entries were picked by (None: an imported run without a
    # template) and, for an imported run, what that means (labdaq.imports.template).
    template: str | None = None
    note: str | None = None


async def _ocv_before(session: AsyncSession, before_run: int) -> float:
    """UN 38.3 T.1-T.4: the OCV of the check run made before the stress."""
    try:
        ref = await session.run_sync(lambda s: load_run_data(s, before_run))
        return ocv_of(ref)
    except (KeyError, NotEvaluable) as exc:
        why = f"no run {before_run}" if isinstance(exc, KeyError) else str(exc)
        raise Invalid("no OCV before the stress", [
            {"loc": "ocv_before_run", "msg": why}]) from exc


async def _load(session: AsyncSession, run_id: int, spec_cycles: int | None,
                accuracy: ChannelAccuracy | None = None,
                ocv_before_run: int | None = None) -> RunData:
    options: dict[str, Any] = {}
    if spec_cycles is not None:
        options["spec_cycles"] = spec_cycles
    if accuracy is not None:
        options["accuracy"] = accuracy
    # An unknown run is a 404 before a bad ocv_before_run is a 422.
    if await session.get(m.Run, run_id) is None:
        raise NotFound(f"no run {run_id}")
    if ocv_before_run is not None:
        options["ocv_before_v"] = await _ocv_before(session, ocv_before_run)
    try:
        return await session.run_sync(lambda s: load_run_data(s, run_id, **options))
    except KeyError as exc:
        raise NotFound(f"no run {run_id}") from exc


def accuracy_of(voltage_rel: float | None, current_rel: float | None,
                temperature_c: float | None) -> ChannelAccuracy | None:
    """The channel accuracy from its three parts: none, or all three."""
    parts = {"voltage_accuracy_rel": voltage_rel, "current_accuracy_rel": current_rel,
             "temperature_accuracy_c": temperature_c}
    missing = [k for k, v in parts.items() if v is None]
    if len(missing) == 3:
        return None
    if missing:
        raise Invalid("the channel accuracy needs all three parts", [
            {"loc": k, "msg": "required with the other accuracy parameters"} for k in missing])
    assert voltage_rel is not None and current_rel is not None and temperature_c is not None
    return ChannelAccuracy(voltage_rel, current_rel, temperature_c)


def _judge(data: RunData, rule: Rule, entries: list[str] | None) -> list[EntryResult]:
    try:
        return evaluate_run(data, rule=rule, entries=entries)
    except KeyError as exc:
        raise Invalid("unknown catalogue entry", [
            {"loc": "entries", "msg": f"no catalogue entry {exc.args[0]!r}"}]) from exc


async def evaluate(session: AsyncSession, run_id: int, rule: Rule = "simple",
                   spec_cycles: int | None = None, entries: list[str] | None = None,
                   accuracy: ChannelAccuracy | None = None,
                   ocv_before_run: int | None = None,
                   ) -> tuple[RunData, list[EntryResult]]:
    """Judge the run now (with its recorded observations); nothing is written. Without
    ``accuracy`` no uncertainty is known, so the guarded rule falls back to simple
    acceptance (each criterion names the rule it was judged by). ``ocv_before_run``: for
    a UN 38.3 OCV check after the stress, the check run made before it."""
    data = await _load(session, run_id, spec_cycles, accuracy, ocv_before_run)
    return data, _judge(data, rule, entries)


def _fresh(data: RunData, results: list[EntryResult], rule: Rule) -> Evaluated:
    from labdaq.benchmarks.store import _version

    return Evaluated(run_id=int(data.run_id or 0), rule=rule, stored=False,
                     data_sha256=data_sha256(data.samples),
                     catalogue_sha256=catalogue_sha256(), software_version=_version(),
                     entries=[_jsonable(r.as_dict()) for r in results],
                     template=data.protocol, note=data.template_note)


async def evaluate_out(session: AsyncSession, run_id: int, rule: Rule = "simple",
                       spec_cycles: int | None = None, entries: list[str] | None = None,
                       accuracy: ChannelAccuracy | None = None,
                       ocv_before_run: int | None = None) -> Evaluated:
    data, results = await evaluate(session, run_id, rule, spec_cycles, entries, accuracy,
                                   ocv_before_run)
    return _fresh(data, results, rule)


async def evaluate_cell(session: AsyncSession, cell_id: int, rule: Rule = "simple",
                        spec_cycles: int | None = None,
                        accuracy: ChannelAccuracy | None = None) -> list[Evaluated]:
    """Every run of the cell judged now, oldest run first (each against the entries its
    protocol serves); NotFound for an unknown cell."""
    if await session.get(m.Cell, cell_id) is None:
        raise NotFound(f"no cell {cell_id}")
    run_ids = list(await session.scalars(
        select(m.Run.id).where(m.Run.cell_id == cell_id).order_by(m.Run.id)))
    return [await evaluate_out(session, rid, rule, spec_cycles, accuracy=accuracy)
            for rid in run_ids]


async def store(session: AsyncSession, run_id: int, actor: str, rule: Rule = "simple",
                spec_cycles: int | None = None, entries: list[str] | None = None,
                accuracy: ChannelAccuracy | None = None,
                ocv_before_run: int | None = None) -> Evaluated:
    """Judge the run and keep the result (one ``evaluations`` row per entry) with an audit
    event naming who stored it under which rule (the caller commits)."""
    data, results = await evaluate(session, run_id, rule, spec_cycles, entries, accuracy,
                                   ocv_before_run)
    await session.run_sync(lambda s: store_evaluation(s, data, results))
    session.add(m.Event(
        run_id=run_id, kind="audit", actor=actor,
        message=f"evaluation stored ({len(results)} entries, rule {rule})",
        data={"rule": rule, "spec_cycles": spec_cycles, "entries": entries,
              "accuracy": None if accuracy is None else accuracy.__dict__,
              "ocv_before_run": ocv_before_run,
              "verdicts": {r.entry_id: r.verdict for r in results}}))
    out = _fresh(data, results, rule)
    out.stored = True
    return out


async def stored(session: AsyncSession, run_id: int) -> Evaluated:
    """The newest stored result per entry; NotFound if the run has none."""
    if await session.get(m.Run, run_id) is None:
        raise NotFound(f"no run {run_id}")
    rows = await session.run_sync(lambda s: latest_evaluation(s, run_id))
    if not rows:
        raise NotFound(f"run {run_id} has no stored evaluation")
    run = await session.get(m.Run, run_id)
    assert run is not None
    how = await session.run_sync(lambda s: run_template(s, run))
    # Rows stored together share their hashes; report the newest row's.
    newest = max(rows, key=lambda r: r.id)
    return Evaluated(run_id=run_id, rule=None, stored=True, data_sha256=newest.data_sha256,
                     catalogue_sha256=newest.catalogue_sha256,
                     software_version=newest.software_version,
                     entries=[r.result for r in rows], template=how.protocol, note=how.note)


async def add_observations(session: AsyncSession, run_id: int,
                           values: dict[str, float | bool], observed_by: str,
                           note: str | None, actor: str) -> list[m.Observation]:
    """Record a technician's observations for the run, with an audit event (the caller
    commits). Unknown metrics are refused, naming each. A hazard observed while the run
    is acquiring stops it for safety (:func:`_stop_on_hazard`)."""
    run = await session.get(m.Run, run_id)
    if run is None:
        raise NotFound(f"no run {run_id}")

    def add_all(s: Session) -> list[m.Observation]:
        rows, bad = [], []
        for metric, value in values.items():
            try:
                rows.append(record_observation(s, run_id, metric, value, observed_by, note))
            except ValueError as exc:
                bad.append({"loc": f"values.{metric}", "msg": str(exc)})
        if bad:
            raise Invalid("unknown observation metric", bad)
        s.flush()
        return rows

    rows = await session.run_sync(add_all)
    session.add(m.Event(
        run_id=run_id, kind="audit", actor=actor,
        message=f"observations recorded: {', '.join(f'{k}={v}' for k, v in values.items())}",
        data={"values": values, "observed_by": observed_by, "note": note}))
    await _stop_on_hazard(session, run, values, observed_by, note, actor)
    return rows


def hazards(values: dict[str, float | bool]) -> list[str]:
    """The observation metrics in ``values`` that report a hazard: a "no fire, no
    venting ..." criterion observed false."""
    return [k for k, v in values.items()
            if METRICS.get(k, {}).get("source") == "observation" and v is False]


async def _stop_on_hazard(session: AsyncSession, run: m.Run,
                          values: dict[str, float | bool], observed_by: str,
                          note: str | None, actor: str) -> None:
    """Fire, disassembly, rupture, venting, gas or leakage seen on a run that is still
    acquiring: a safety event (an alarm until acknowledged) and a safety stop, which the
    engine carries out at the run's next tick (output off, ``aborted_safety``).

    Why a stop and not only an alarm: the abuse tests (UN 38.3 T7/T8, IEC 62133-2
    over-charge and forced discharge) judge no disassembly and no fire during the test
    and the observation period after it; once a cell vents or burns, more current
    decides nothing and feeds the hazard. The observation period goes on with the
    output off; later observations are recorded the same way."""
    seen = hazards(values)
    if not seen or run_states.command_refusal(run.state, "safety_stop") is not None:
        return
    protocol = await session.get(m.Protocol, run.protocol_id)
    abuse = bool(protocol is not None and (protocol.document or {}).get("abuse"))
    what = ", ".join(f"{k}=false ({METRICS[k]['what']})" for k in seen)
    session.add(m.Event(
        run_id=run.id, kind="safety", severity="critical",
        message=f"hazard observed by {observed_by}: {what}; the run is stopped for safety",
        data={"limit": "observation", "observations": seen, "value": False, "bound": None,
              "source": "technician", "observed_by": observed_by, "note": note,
              "abuse": abuse},
        actor=actor))
    run.requested_action = "safety_stop"
    session.add(m.Event(run_id=run.id, kind="audit", actor=actor,
                        message=f"safety stop requested: {', '.join(seen)} observed"))


async def list_observations(session: AsyncSession, run_id: int) -> list[m.Observation]:
    """Every observation recorded for the run, oldest first (the newest per metric counts)."""
    if await session.get(m.Run, run_id) is None:
        raise NotFound(f"no run {run_id}")
    return list(await session.scalars(
        select(m.Observation).where(m.Observation.run_id == run_id)
        .order_by(m.Observation.id)))


async def report_html(session: AsyncSession, run_id: int, rule: Rule = "simple",
                      spec_cycles: int | None = None,
                      accuracy: ChannelAccuracy | None = None,
                      ocv_before_run: int | None = None) -> str:
    """The HTML test report of the run, judged now under ``rule``."""
    from labdaq.benchmarks.report import render_report

    data, results = await evaluate(session, run_id, rule, spec_cycles, accuracy=accuracy,
                                   ocv_before_run=ocv_before_run)
    return render_report(data, results)


def html_to_pdf(page: str) -> bytes:
    """The report as PDF through WeasyPrint; the page is self-contained (data-URI images),
    so no URL is fetched."""
    try:
        import weasyprint
    except (ImportError, OSError) as exc:  # OSError: pango missing
        raise PdfUnavailable(f"PDF output needs WeasyPrint and pango: {exc}") from exc

    # Refuse every URL but data: ones (the page embeds its images), so rendering a report
    # never reaches the network or the server's files.
    fetcher_cls = getattr(weasyprint.urls, "URLFetcher", None)
    if fetcher_cls is not None:  # WeasyPrint >= 68
        fetcher: Any = fetcher_cls(allowed_protocols={"data"})
    else:
        def fetcher(url: str, *args: Any, **kwargs: Any) -> Any:
            if url.startswith("data:"):
                return weasyprint.default_url_fetcher(url, *args, **kwargs)
            raise ValueError(f"the report fetches nothing from outside: {url}")

    pdf = weasyprint.HTML(string=page, url_fetcher=fetcher).write_pdf()
    assert pdf is not None  # write_pdf without a target returns the bytes
    return bytes(pdf)
