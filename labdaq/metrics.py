"""Prometheus metrics of the service, in the text exposition format, for ``GET /metrics``.

Three sources, one page:

* the API process's own metrics (request latency histogram, process memory and CPU),
  kept in :data:`API_REGISTRY` by prometheus-client;
* durable totals read from the database at each scrape: samples stored (the runs'
  committed ``last_seq``), sample periods missed (``runs.missed_periods``), runs by state;
* the engine's counters, which its process puts into its heartbeat row about once a
  second (labdaq.engine.stats): samples written and dropped by its writer, writer backlog,
  journal, loop lateness, instrument errors and instrument state, per node.

Reading the engine's counters from the database rather than through prometheus-client's
multiprocess mode keeps the two processes independent (no shared directory to agree on,
clean and survive restarts of either) at the cost of up to a heartbeat period of delay.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq.heartbeat import INSTRUMENT_OK, as_utc, latest
from labdaq.storage import models as m

__all__ = ["API_REGISTRY", "CONTENT_TYPE_LATEST", "REQUEST_LATENCY", "render"]

#: The API process's own metrics (one registry per process, created at import).
API_REGISTRY = CollectorRegistry()
ProcessCollector(registry=API_REGISTRY)
REQUEST_LATENCY = Histogram(
    "labdaq_api_request_duration_seconds",
    "Time from a request's arrival to the start of its response (wall seconds), by "
    "method, route template and status code",
    ["method", "route", "status"],
    registry=API_REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


class _Families(Collector):
    """Metric families built for one scrape."""

    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> Iterator[Any]:
        yield from self._families


async def _database_families(session: AsyncSession) -> list[Any]:
    stored, missed = (await session.execute(
        select(func.coalesce(func.sum(m.Run.last_seq), 0),
               func.coalesce(func.sum(m.Run.missed_periods), 0))
    )).one()
    samples = CounterMetricFamily(
        "labdaq_samples_stored", "Samples committed to the database, every run")
    samples.add_metric([], float(stored))
    gaps = CounterMetricFamily(
        "labdaq_missed_periods",
        "Sample periods the engine could not sample (lost samples), every run")
    gaps.add_metric([], float(missed))
    by_state = {state: n for state, n in (await session.execute(
        select(m.Run.state, func.count()).group_by(m.Run.state))).all()}
    runs = GaugeMetricFamily("labdaq_runs", "Runs by state", labels=["state"])
    for state in m.RunState:
        runs.add_metric([state.value], float(by_state.get(state.value, 0)))
    return [samples, gaps, runs]


def _engine_families(beats: Iterable[m.NodeHeartbeat], now: datetime) -> list[Any]:
    c_written = CounterMetricFamily(
        "labdaq_engine_samples_written", "Samples the engine's writer committed since the "
        "engine started", labels=["node"])
    c_dropped = CounterMetricFamily(
        "labdaq_engine_samples_dropped", "Samples the engine's writer dropped (journal full, "
        "refused by the database) since the engine started", labels=["node"])
    c_ticks = CounterMetricFamily(
        "labdaq_engine_loop_ticks", "Acquisition loop ticks since the engine started",
        labels=["node"])
    g_backlog = GaugeMetricFamily(
        "labdaq_engine_writer_backlog_rows", "Samples handed to the writer, not yet "
        "committed or journaled", labels=["node"])
    g_journal = GaugeMetricFamily(
        "labdaq_engine_journal_rows", "Samples in the writer's disk journal, waiting for "
        "the database", labels=["node"])
    g_late = GaugeMetricFamily(
        "labdaq_engine_loop_lateness_seconds", "How late acquisition loop ticks were "
        "(wall seconds) over the ticks of the last heartbeat period", labels=["node", "stat"])
    c_inst = CounterMetricFamily(
        "labdaq_instrument_errors", "Times an instrument stopped answering or could not be "
        "opened since the engine started", labels=["node", "instrument"])
    g_inst = GaugeMetricFamily(
        "labdaq_instrument_up", "1 when the instrument answers, 0 when lost or not "
        "connected", labels=["node", "instrument"])
    g_age = GaugeMetricFamily(
        "labdaq_engine_heartbeat_age_seconds", "Wall seconds since the node's last "
        "heartbeat", labels=["node"])
    g_up = GaugeMetricFamily(
        "labdaq_engine_running", "1 while the node's last heartbeat says running",
        labels=["node"])
    for beat in beats:
        node = beat.node
        stats: dict[str, Any] = dict(beat.metrics or {})
        c_written.add_metric([node], float(stats.get("samples_written", 0)))
        c_dropped.add_metric([node], float(stats.get("samples_dropped", 0)))
        c_ticks.add_metric([node], float(stats.get("ticks", 0)))
        g_backlog.add_metric([node], float(stats.get("writer_backlog_rows", 0)))
        g_journal.add_metric([node], float(stats.get("journal_rows", 0)))
        g_late.add_metric([node, "p99"], float(stats.get("loop_lateness_p99_s", 0.0)))
        g_late.add_metric([node, "max"], float(stats.get("loop_lateness_max_s", 0.0)))
        errors: dict[str, Any] = dict(stats.get("instrument_errors") or {})
        states: dict[str, Any] = dict(beat.instruments or {})
        for name in sorted(set(errors) | set(states)):
            c_inst.add_metric([node, name], float(errors.get(name, 0)))
        for name, state in sorted(states.items()):
            g_inst.add_metric([node, name], 1.0 if state == INSTRUMENT_OK else 0.0)
        g_age.add_metric([node], (now - as_utc(beat.beat_at)).total_seconds())
        g_up.add_metric([node], 1.0 if beat.state == "running" else 0.0)
    return [c_written, c_dropped, c_ticks, g_backlog, g_journal, g_late, c_inst, g_inst,
            g_age, g_up]


async def render(session: AsyncSession) -> bytes:
    """The whole page: the API's own metrics, then the database's and the engine's."""
    families = await _database_families(session)
    families += _engine_families(await latest(session), datetime.now(UTC))
    scrape = CollectorRegistry()
    scrape.register(_Families(families))
    return generate_latest(API_REGISTRY) + generate_latest(scrape)
