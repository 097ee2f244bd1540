"""Fault injection for the simulated lab, scheduled on simulated time.

One job: make a :class:`~labdaq.sims.lab.SimLab` misbehave the way a real lab does, at a
chosen simulated time, from a scenario file, the Python API or ``labdaq sim --fault``:

* cell faults (``internal_short``, ``external_short``, ``sensor_dropout``,
  ``thermal_runaway``) act on one simulated cell — a cycler channel (``smu1``,
  ``cabinet1/3``), a cell serial (``SIM-NMC811-001``) or, for a dropout, a logger
  thermocouple (``logger1/101``);
* instrument faults (``drop_connection``, ``slow_replies``, ``garbled_replies``,
  ``lost_replies``, ``error_queue``, ``frozen_readings``) act on one served instrument
  through its :class:`~labdaq.sims.server.SimServer` or simulator hooks.

Overcharge is not a fault: it is a protocol that charges past the cut-off with the
safety limits disabled; the cell model turns it into heat and, past the onset
temperature, into runaway.

Each fault fires at ``at_s`` on the lab's clock (simulated seconds since the lab was
built; omitted = at once) and, with ``duration_s``, clears that much simulated time
later. With a :class:`~labdaq.sims.clock.SimClock` a small thread fires faults within a
millisecond of wall time of their simulated time (so within ``speed`` ms of simulated
time); with a :class:`~labdaq.sims.clock.ManualClock` time only moves through
:meth:`FaultScheduler.advance`, which stops the clock at each fault, brings every
simulator to exactly that time and applies it, so a seeded run is reproducible sample
for sample.

Scenario files are YAML (``seeds/scenarios/*.yaml``, see docs/cells.md)::

    name: internal_short
    lab: {smus: 1}                  # the smallest lab the scenario needs
    faults:
      - {kind: internal_short, target: smu1, at_s: 600, resistance_ohm: 0.5}
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .clock import ManualClock
from .fault_specs import (  # noqa: F401 - re-exported: callers import them from here
    CELL_KINDS,
    FAULT_MODELS,
    INSTRUMENT_KINDS,
    DropConnection,
    ErrorQueue,
    ExternalShort,
    FaultSpec,
    FrozenReadings,
    GarbledReplies,
    InternalShort,
    LabNeeds,
    LostReplies,
    Scenario,
    ScenarioError,
    SensorDropout,
    SlowReplies,
    ThermalRunaway,
    list_scenarios,
    load_scenario,
    parse_fault,
    parse_fault_option,
    parse_scenario,
)

if TYPE_CHECKING:
    from .lab import SimInstrument, SimLab

log = logging.getLogger(__name__)

# Two faults due within this much simulated time of "now" are due now: float round-off
# in clock arithmetic must not leave a fault one ulp in the future forever.
_TIME_EPS_S = 1e-9
# Wall-time bounds of the scheduler thread's sleep (SimClock): short enough that a fault
# fires within ~speed ms of its simulated time, long enough not to spin when idle.
_POLL_MIN_S = 0.0005
_POLL_MAX_S = 0.05


# ---------------------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """Where a fault lands: the instrument and, for cell faults, the cell or channel."""

    inst: SimInstrument
    label: str
    channel: int | None = None
    bank: Any = None
    index: int = 0


@dataclass(eq=False)
class ScheduledFault:
    """One fault in a scheduler: what, where, when, and what happened to it."""

    id: int
    spec: FaultSpec
    target: str
    at_s: float
    clear_at_s: float | None
    source: str = "api"
    state: Literal["pending", "active", "done", "cleared"] = "pending"
    fired_at_s: float | None = None
    cleared_at_s: float | None = None
    _where: _Target | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return self.spec.kind

    def describe(self) -> str:
        when = f"at {self.at_s:g} s"
        if self.clear_at_s is not None:
            when += f" until {self.clear_at_s:g} s"
        params = ", ".join(f"{k}={v!r}" for k, v in self.spec.params.items()
                           if v is not None)
        return f"{self.kind} on {self.target} {when}" + (f" ({params})" if params else "")


EventCallback = Callable[[ScheduledFault, str], None]


class FaultScheduler:
    """Faults of one :class:`SimLab` on its clock; ``lab.faults`` creates it.

    ``inject`` / ``schedule`` / ``load`` validate everything (kind, fields, target) at
    once, so a bad scenario fails before anything fires. Due faults fire in time order
    (ties in the order they were scheduled). ``on_event(fault, "applied"|"cleared")`` is
    called after each transition (from the scheduler thread under a SimClock).
    """

    def __init__(self, lab: SimLab, *, on_event: EventCallback | None = None) -> None:
        self.lab = lab
        self.on_event = on_event
        self._lock = threading.RLock()
        # (time, sequence, action, fault); sequence keeps equal times in schedule order.
        self._heap: list[tuple[float, int, str, ScheduledFault]] = []
        self._waiting: list[tuple[float, int, str, ScheduledFault]] = []
        self._seq = itertools.count()
        self._ids = itertools.count(1)
        self.faults: list[ScheduledFault] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

    # -- scheduling ------------------------------------------------------------------------
    def inject(self, kind: str, target: str, *, at_s: float | None = None,
               duration_s: float | None = None, **params: Any) -> ScheduledFault:
        """Schedule one fault: ``inject("internal_short", "smu1", resistance_ohm=0.5,
        at_s=600)``; without ``at_s`` it fires at once."""
        entry: dict[str, Any] = {"kind": kind, "target": target, **params}
        if at_s is not None:
            entry["at_s"] = at_s
        if duration_s is not None:
            entry["duration_s"] = duration_s
        return self.schedule(parse_fault(entry, "inject()"), where="inject()")

    def schedule(self, spec: FaultSpec, *, source: str = "api", offset_s: float = 0.0,
                 where: str = "fault") -> ScheduledFault:
        """Schedule a validated fault; ``offset_s`` shifts its time (scenario start);
        ``where`` names the fault in errors (e.g. the ``--fault`` text)."""
        fault = self._prepare(spec, source, offset_s, where)
        self._enqueue([fault])
        return fault

    def load(self, scenario: str | Path | Scenario, *,
             offset_s: float = 0.0) -> list[ScheduledFault]:
        """Schedule every fault of a scenario (name, path or :class:`Scenario`).

        Times are on the lab clock plus ``offset_s``; pass ``offset_s=lab.clock.now()`` to
        run a scenario relative to now. All targets are checked before any is scheduled.
        """
        sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
        faults = [self._prepare(spec, sc.name, offset_s, where=f"{sc.source or sc.name}: "
                                                               f"faults[{i}]")
                  for i, spec in enumerate(sc.faults)]
        self._enqueue(faults)
        return faults

    def _prepare(self, spec: FaultSpec, source: str, offset_s: float,
                 where: str = "fault") -> ScheduledFault:
        target = self._resolve(spec, where)
        now = self.lab.clock.now()
        at = now if spec.at_s is None else spec.at_s + offset_s
        # Times are absolute on the lab clock, so a scenario means the same whatever the
        # moment it was loaded; a fault already overdue fires at once and still clears at
        # at_s + duration_s.
        clear = None if spec.duration_s is None else at + spec.duration_s
        return ScheduledFault(id=next(self._ids), spec=spec, target=target.label, at_s=at,
                              clear_at_s=clear, source=source, _where=target)

    def _enqueue(self, faults: list[ScheduledFault]) -> None:
        with self._lock:
            for fault in faults:
                self.faults.append(fault)
                heapq.heappush(self._heap, (fault.at_s, next(self._seq), "apply", fault))
        self.poll()  # immediate faults (and ones already overdue) fire now
        self._ensure_thread()
        self._wake.set()

    def clear(self, fault: ScheduledFault) -> None:
        """End an active fault now (a pending one is cancelled)."""
        with self._lock:
            if fault.state == "pending":
                fault.state = "cleared"
                fault.cleared_at_s = self.lab.clock.now()
                return
            if fault.state == "active":
                self._do_clear(fault)

    def clear_all(self) -> None:
        """Cancel pending faults and end active ones (irreversible damage stays)."""
        with self._lock:
            for fault in list(self.faults):
                self.clear(fault)

    @property
    def pending(self) -> list[ScheduledFault]:
        with self._lock:
            return [f for f in self.faults if f.state == "pending"]

    @property
    def active(self) -> list[ScheduledFault]:
        with self._lock:
            return [f for f in self.faults if f.state == "active"]

    # -- time ---------------------------------------------------------------------------------
    def next_time_s(self) -> float | None:
        """Simulated time of the next pending transition (apply or clear)."""
        with self._lock:
            return self._heap[0][0] if self._heap else None

    def poll(self) -> list[ScheduledFault]:
        """Apply (or clear) every transition due by the clock's now; returns them."""
        fired: list[ScheduledFault] = []
        with self._lock:
            now = self.lab.clock.now()
            while self._heap and self._heap[0][0] <= now + _TIME_EPS_S:
                item = heapq.heappop(self._heap)
                _, _, action, fault = item
                if action == "apply":
                    if fault.state != "pending":
                        continue  # cancelled by clear()
                    if not self._ready(fault):
                        self._waiting.append(item)  # instrument not served yet
                        continue
                    self._do_apply(fault, now)
                elif fault.state == "active":
                    self._do_clear(fault)
                else:
                    continue  # already ended by clear()
                fired.append(fault)
        return fired

    def advance(self, dt_s: float) -> float:
        """Move a ManualClock by ``dt_s``, stopping at each fault time to bring every
        simulator exactly there and apply it; every simulator is then brought to the new
        time. Returns the new time."""
        clock = self.lab.clock
        if not isinstance(clock, ManualClock):
            raise TypeError("advance() needs a lab built with a ManualClock; a SimClock "
                            "moves by itself and the scheduler thread fires faults")
        if dt_s < 0:
            raise ValueError(f"time cannot go backwards (dt_s={dt_s!r})")
        end = clock.now() + float(dt_s)
        while True:
            t_next = self.next_time_s()
            if t_next is None or t_next > end + _TIME_EPS_S:
                break
            now = clock.now()
            if t_next > now:
                clock.advance(t_next - now)
            # Everything before the fault ran without it: step every simulator up to now
            # under its server lock, then apply.
            self._advance_sims()
            self.poll()
        now = clock.now()
        if end > now:
            clock.advance(end - now)
        # Read-outs taken straight from the cell banks are then current too.
        self._advance_sims()
        return clock.now()

    def _advance_sims(self) -> None:
        for inst in self.lab.instruments:
            step = getattr(inst.sim, "advance", None)
            if step is not None:
                with self._server_lock(inst):
                    step()

    # -- thread (SimClock) ------------------------------------------------------------------
    def start(self) -> None:
        """Fire faults that waited for the lab's servers; under a SimClock also start the
        thread that fires faults as simulated time passes."""
        with self._lock:
            for item in self._waiting:
                heapq.heappush(self._heap, item)
            self._waiting.clear()
        self.poll()
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        # A ManualClock only moves in advance(), which fires faults itself: no thread, so
        # nothing can fire at a wall-clock-dependent moment.
        if isinstance(self.lab.clock, ManualClock) or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sim-faults", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    def _run(self) -> None:
        clock = self.lab.clock
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # a failing fault must not stop the others
                log.exception("fault scheduler: poll failed")
            t_next = self.next_time_s()
            speed = float(getattr(clock, "speed", 1.0)) or 1.0
            if t_next is None:
                wait = _POLL_MAX_S
            else:
                wait = min(_POLL_MAX_S, max(_POLL_MIN_S, (t_next - clock.now()) / speed))
            self._wake.wait(wait)
            self._wake.clear()

    # -- targets ------------------------------------------------------------------------------
    def _resolve(self, spec: FaultSpec, where: str) -> _Target:
        lab = self.lab
        name, slash, chan_text = spec.target.partition("/")
        name = name.strip()
        channel = spec.channel
        if slash:
            try:
                channel_t = int(chan_text)
            except ValueError:
                raise ScenarioError(f"{where} ({spec.kind}): target: channel {chan_text!r} "
                                    "is not a number") from None
            if channel is not None and channel != channel_t:
                raise ScenarioError(f"{where} ({spec.kind}): target says channel "
                                    f"{channel_t}, channel says {channel}")
            channel = channel_t
        names = [i.name for i in lab.instruments]
        inst = next((i for i in lab.instruments if i.name == name), None)
        if inst is None:
            # A cell serial: find the cycler channel that holds it.
            for cand in lab.instruments:
                for ch in cand.channels:
                    if ch.get("cell", {}).get("serial") == name and not slash:
                        inst, channel = cand, int(ch["index"])
            if inst is None:
                raise ScenarioError(
                    f"{where} ({spec.kind}): target: no instrument or cell {name!r} in this "
                    f"lab (instruments: {', '.join(names) or 'none'})")
        label = inst.name if channel is None else f"{inst.name}/{channel}"
        bad = f"{where} ({spec.kind} on {spec.target})"
        if spec.scope == "instrument":
            return self._resolve_instrument(spec, inst, channel, bad)
        if spec.kind == "sensor_dropout" and inst.kind == "logger":
            numbers = list(inst.driver_options.get("channels", []))
            if channel not in numbers:
                raise ScenarioError(f"{bad}: target: a logger dropout needs a thermocouple "
                                    f"channel, one of {numbers} (e.g. {inst.name}/"
                                    f"{numbers[0] if numbers else 101})")
            return _Target(inst, label, channel)
        if inst.kind == "smu":
            if channel not in (None, 1):
                raise ScenarioError(f"{bad}: target: {inst.name} has one channel (1)")
            return _Target(inst, f"{inst.name}", 1, inst.sim.cell, 0)
        if inst.kind == "cabinet":
            total = len(inst.channels)
            if channel is None or not 1 <= channel <= total:
                raise ScenarioError(f"{bad}: target: a cell fault on {inst.name} needs a "
                                    f"channel 1..{total}, e.g. {inst.name}/1")
            return _Target(inst, label, channel, inst.sim.bank, channel - 1)
        raise ScenarioError(f"{bad}: target: {inst.name} is a {inst.kind}, not a cycler; "
                            "cell faults target a cycler channel (smu1, cabinet1/3) or a "
                            "cell serial")

    @staticmethod
    def _resolve_instrument(spec: FaultSpec, inst: SimInstrument, channel: int | None,
                            bad: str) -> _Target:
        if channel is not None:
            raise ScenarioError(f"{bad}: target: {spec.kind} acts on the whole instrument; "
                                f"use target {inst.name} without a channel")
        if spec.kind == "drop_connection" and spec.duration_s and inst.transport != "tcp":
            raise ScenarioError(f"{bad}: duration_s: refusing connections needs a TCP "
                                f"instrument; {inst.name} is served over {inst.transport}")
        if spec.kind == "frozen_readings" and not hasattr(inst.sim, "frozen"):
            raise ScenarioError(f"{bad}: kind: {type(inst.sim).__name__} has no frozen "
                                "readings hook (SMUs and cabinets have)")
        if spec.kind == "error_queue" and not hasattr(inst.sim, "inject_error"):
            raise ScenarioError(f"{bad}: kind: {type(inst.sim).__name__} has no error "
                                "queue")
        return _Target(inst, inst.name)

    def _ready(self, fault: ScheduledFault) -> bool:
        assert fault._where is not None
        return fault.spec.scope == "cell" or fault._where.inst.server is not None

    @staticmethod
    def _server_lock(inst: SimInstrument) -> contextlib.AbstractContextManager[Any]:
        server = inst.server
        return server.lock if server is not None else contextlib.nullcontext()

    # -- effects ----------------------------------------------------------------------------
    def _do_apply(self, fault: ScheduledFault, now: float) -> None:
        where = fault._where
        assert where is not None
        spec = fault.spec
        with self._server_lock(where.inst):
            if spec.scope == "cell":
                step = getattr(where.inst.sim, "advance", None)
                if step is not None:
                    step()  # the time before the fault ran without it
            self._effect(spec, where, apply=True)
        fault.fired_at_s = now
        late = now - fault.at_s
        # A clearable fault stays active until its duration ends or clear(); a plain
        # connection drop is over once the sockets are closed.
        lasting = spec.clearable and not (spec.kind == "drop_connection"
                                          and spec.duration_s is None)
        fault.state = "active" if lasting else "done"
        if fault.clear_at_s is not None:
            heapq.heappush(self._heap, (fault.clear_at_s, next(self._seq), "clear", fault))
        log.info("fault %d: %s applied at t=%.3f s%s", fault.id, fault.describe(), now,
                 f" ({late:.3f} s late)" if late > 1e-6 else "")
        self._notify(fault, "applied")

    def _do_clear(self, fault: ScheduledFault) -> None:
        where = fault._where
        assert where is not None
        with self._server_lock(where.inst):
            if fault.spec.scope == "cell":
                step = getattr(where.inst.sim, "advance", None)
                if step is not None:
                    step()
            self._effect(fault.spec, where, apply=False)
        fault.state = "cleared"
        fault.cleared_at_s = self.lab.clock.now()
        log.info("fault %d: %s cleared at t=%.3f s", fault.id, fault.kind, fault.cleared_at_s)
        self._notify(fault, "cleared")

    def _notify(self, fault: ScheduledFault, what: str) -> None:
        if self.on_event is not None:
            try:
                self.on_event(fault, what)
            except Exception:
                log.exception("fault scheduler: on_event failed")

    @staticmethod
    def _effect(spec: FaultSpec, where: _Target, *, apply: bool) -> None:
        """Apply (or undo) ``spec`` at ``where``; the caller holds the server lock."""
        sim = where.inst.sim
        server = where.inst.server
        bank, idx = where.bank, where.index
        if isinstance(spec, InternalShort):
            bank.set_internal_short(idx, spec.resistance_ohm if apply else None)
        elif isinstance(spec, ExternalShort):
            bank.set_external_short(idx, spec.resistance_ohm if apply else None)
        elif isinstance(spec, SensorDropout):
            if where.inst.kind == "logger":
                sim.set_open(where.channel, apply)
            elif hasattr(sim, "set_sensor_dropout"):
                sim.set_sensor_dropout(where.channel, apply)  # also drops cached readings
            else:
                bank.sensor_dropout[idx] = apply
        elif isinstance(spec, ThermalRunaway):
            if apply:
                bank.trigger_thermal_runaway(idx)
        elif isinstance(spec, DropConnection):
            if spec.duration_s is not None and hasattr(server, "refuse_connections"):
                server.refuse_connections(apply)
            if apply:
                server.drop_connections()
        elif isinstance(spec, SlowReplies):
            server.set_reply_delay(spec.delay_s if apply else 0.0)
        elif isinstance(spec, GarbledReplies):
            if apply:
                server.garble_next_reply(spec.count)
        elif isinstance(spec, LostReplies):
            if apply:
                server.swallow_next_reply(spec.count)
        elif isinstance(spec, ErrorQueue):
            if apply:
                _inject_error(sim, spec)
        elif isinstance(spec, FrozenReadings):
            sim.frozen = apply
        else:  # pragma: no cover - FAULT_MODELS and this table are kept together
            raise AssertionError(spec.kind)


def _inject_error(sim: Any, spec: ErrorQueue) -> None:
    from .hioki_bt4560 import HiokiBT4560Sim

    if isinstance(sim, HiokiBT4560Sim):
        sim.inject_error(spec.esr_bits)  # the meter has only an event status register
    else:
        sim.inject_error(spec.code, spec.text)


__all__ = [
    "CELL_KINDS", "FAULT_MODELS", "INSTRUMENT_KINDS", "FaultScheduler", "FaultSpec",
    "LabNeeds", "Scenario", "ScenarioError", "ScheduledFault", "list_scenarios",
    "load_scenario", "parse_fault", "parse_fault_option", "parse_scenario",
]
