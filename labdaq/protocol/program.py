"""Resolution: a protocol bound to a cell becomes a flat program an engine runs with a pc."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from labdaq.protocol.checks import _check_structure
from labdaq.protocol.document import (
    SCHEMA_VERSION,
    CCCVStep,
    CCStep,
    CVStep,
    EISStep,
    EndConditions,
    LoopStep,
    LoopUntil,
    Protocol,
    PulseStep,
    RestStep,
    Safety,
    SetTemperatureStep,
    Step,
    _Strict,
)
from labdaq.protocol.errors import _join, _Problems
from labdaq.protocol.limits import (
    CellLimits,
    EffectiveLimits,
    InstrumentLimits,
    effective_limits,
    missing_abuse_bounds,
)


class ResolvedUntil(_Strict):
    """End conditions in SI units with explicit directions; first one met ends the step.

    ``capacity_ah`` is the magnitude of charge moved in the step; ``current_below_a`` and
    ``dvdt_below_v_per_s`` compare magnitudes.
    """

    voltage_above_v: float | None = None
    voltage_below_v: float | None = None
    current_below_a: float | None = None
    duration_s: float | None = None
    capacity_ah: float | None = None
    dvdt_below_v_per_s: float | None = None
    temperature_above_c: float | None = None


class _ResolvedBase(_Strict):
    index: int  # position in ResolvedProtocol.program; what the engine records as step_index
    path: str  # where it came from in the document, e.g. "steps[2].body[0]"
    tag: str | None = None
    label: str | None = None


class ResolvedRest(_ResolvedBase):
    step: Literal["rest"] = "rest"
    until: ResolvedUntil


class ResolvedCC(_ResolvedBase):
    step: Literal["cc"] = "cc"
    current_a: float  # signed: positive = charge
    until: ResolvedUntil


class ResolvedCV(_ResolvedBase):
    step: Literal["cv"] = "cv"
    voltage_v: float
    current_limit_a: float  # magnitude, applies in both directions
    until: ResolvedUntil


class ResolvedCCCV(_ResolvedBase):
    step: Literal["cccv"] = "cccv"
    current_a: float  # signed CC phase current
    voltage_v: float  # CC phase ends / CV phase holds here
    until: ResolvedUntil  # current_below_a is always set (the CV cut-off)


class ResolvedPulse(_ResolvedBase):
    step: Literal["pulse"] = "pulse"
    current_a: float  # signed pulse current
    pulse_duration_s: float
    rest_duration_s: float
    count: int
    until: ResolvedUntil  # optional early end of the whole train; may be empty


class ResolvedEIS(_ResolvedBase):
    step: Literal["eis"] = "eis"
    start_frequency_hz: float
    stop_frequency_hz: float
    points_per_decade: int
    amplitude_v: float | None = None
    amplitude_a: float | None = None


class ResolvedSetTemperature(_ResolvedBase):
    step: Literal["set_temperature"] = "set_temperature"
    temperature_c: float
    tolerance_c: float
    stable_for_s: float
    timeout_s: float


class ResolvedLoopStart(_ResolvedBase):
    """Entering a loop: reset its iteration counter and per-iteration capacity."""

    step: Literal["loop_start"] = "loop_start"
    end_index: int
    max_iterations: int


class ResolvedLoopEnd(_ResolvedBase):
    """End of one loop iteration: jump to ``start_index + 1`` or fall through."""

    step: Literal["loop_end"] = "loop_end"
    start_index: int
    max_iterations: int
    until: LoopUntil | None = None

    def repeat(self, iterations_done: int, discharge_ah: float | None = None,
               first_discharge_ah: float | None = None) -> bool:
        """Whether to run the body again after ``iterations_done`` iterations.

        ``discharge_ah`` is the (positive) Ah discharged in the iteration just finished;
        ``first_discharge_ah`` the same for the loop's first iteration.
        """
        if iterations_done >= self.max_iterations:
            return False
        u = self.until
        if u is None or discharge_ah is None:
            return True
        if u.discharge_capacity_below_ah is not None and \
                discharge_ah < u.discharge_capacity_below_ah:
            return False
        if (u.discharge_capacity_below_pct_of_first is not None and first_discharge_ah
                and discharge_ah < first_discharge_ah
                * u.discharge_capacity_below_pct_of_first / 100.0):
            return False
        return True


ResolvedStep = Annotated[
    ResolvedRest | ResolvedCC | ResolvedCV | ResolvedCCCV | ResolvedPulse | ResolvedEIS
    | ResolvedSetTemperature | ResolvedLoopStart | ResolvedLoopEnd,
    Field(discriminator="step"),
]


class ResolvedProtocol(_Strict):
    """A protocol bound to one cell: what an engine executes and a run stores.

    ``program`` is flat. Run it with a program counter ``pc`` from 0:

    * ``loop_start``: set ``iterations[pc] = 0`` (and clear that loop's capacity
      accumulators), ``pc += 1``.
    * ``loop_end``: ``iterations[start_index] += 1``; if
      ``step.repeat(iterations, discharge_ah, first_discharge_ah)`` jump to
      ``start_index + 1``, else ``pc += 1``.
    * any other step: execute it until its ``until`` (or its own timing) ends it, add the
      Ah it discharged to every open loop's iteration total, ``pc += 1``.

    ``(pc, iteration counters)`` is the whole position, so a restarted engine can resume
    a run from the database. Each completed ``loop_end`` iteration is a natural cycle
    boundary.
    """

    schema_version: int = SCHEMA_VERSION
    name: str
    protocol_hash: str
    cell: CellLimits
    instrument: InstrumentLimits | None = None
    limits: EffectiveLimits
    program: list[ResolvedStep]


class _Resolver:
    """Walks the document once, building the program and collecting every problem."""

    def __init__(self, cell: CellLimits, limits: EffectiveLimits, problems: _Problems,
                 abuse: bool = False):
        self.cell = cell
        self.limits = limits
        self.abuse = abuse
        self.problems = problems
        self.program: list[Any] = []

    # -- values

    def amps_from_rate(self, rate_c: float, loc: str) -> float | None:
        if self.cell.capacity_ah is None:
            self.problems.add(loc, "a C-rate needs the cell's capacity, and the cell has no "
                              "capacity_ah; give the current in A or set the capacity")
            return None
        return rate_c * self.cell.capacity_ah

    def signed_current(self, path: str, current_a: float | None, rate_c: float | None,
                       ) -> float | None:
        """Setpoint in A from current_a or rate_c, checked against the current limits."""
        if current_a is not None:
            field, value = "current_a", current_a
        elif rate_c is not None:
            field = "rate_c"
            converted = self.amps_from_rate(rate_c, _join(path, field))
            if converted is None:
                return None
            value = converted
        else:
            return None
        self.check_current(_join(path, field), value)
        return value

    def check_current(self, loc: str, value: float, both_ways: bool = False) -> None:
        lim = self.limits
        checks = []
        if both_ways or value > 0:
            checks.append(("charge", "max_charge_current_a", lim.max_charge_current_a))
        if both_ways or value < 0:
            checks.append(("discharge", "max_discharge_current_a",
                           lim.max_discharge_current_a))
        for direction, field, limit in checks:
            if abs(value) > limit * (1 + 1e-9):
                source = lim.sources.get(field, "")
                self.problems.add(loc, f"{abs(value):.4g} A exceeds the {source} limit for "
                                  f"{direction} current, {limit:.4g} A")

    def volts(self, loc: str, value: float | str) -> float:
        """Resolve a voltage (symbolic or numeric) and check it against cell and safety."""
        cell, lim = self.cell, self.limits
        if value == "charge_cutoff":
            return cell.charge_cutoff_v
        if value == "discharge_cutoff":
            return cell.discharge_cutoff_v
        v = float(value)
        tol = 1e-9
        # An abuse test's set points and end conditions may lie beyond the cell's window
        # (that is the test); the safety window below (channel, protocol, lab) still holds.
        if not self.abuse and not cell.discharge_cutoff_v - tol <= v <= cell.charge_cutoff_v + tol:
            self.problems.add(loc, f"{v:.4g} V is outside the cell's window "
                              f"{cell.discharge_cutoff_v:.4g}–{cell.charge_cutoff_v:.4g} V")
        elif not lim.min_voltage_v - tol <= v <= lim.max_voltage_v + tol:
            self.problems.add(loc, f"{v:.4g} V is outside the safety window "
                              f"{lim.min_voltage_v:.4g}–{lim.max_voltage_v:.4g} V; the "
                              "interlock would trip before the step ends")
        return v

    def until(self, path: str, until: EndConditions, sign: float) -> ResolvedUntil:
        """Explicit, SI end conditions; ``sign`` is the step current's sign (0 = none)."""
        loc = _join(path, "until")
        above: list[float] = []
        below: list[float] = []
        if until.voltage_v is not None:
            v = self.volts(_join(loc, "voltage_v"), until.voltage_v)
            # The step current's sign says which way the voltage moves.
            (above if sign > 0 else below).append(v)
        if until.voltage_above_v is not None:
            above.append(self.volts(_join(loc, "voltage_above_v"), until.voltage_above_v))
        if until.voltage_below_v is not None:
            below.append(self.volts(_join(loc, "voltage_below_v"), until.voltage_below_v))
        currents: list[float] = []
        if until.current_below_a is not None:
            currents.append(until.current_below_a)
        if until.current_below_c is not None:
            amps = self.amps_from_rate(until.current_below_c, _join(loc, "current_below_c"))
            if amps is not None:
                currents.append(amps)
        capacities: list[float] = []
        if until.capacity_ah is not None:
            capacities.append(until.capacity_ah)
        if until.capacity_c is not None:
            ah = self.amps_from_rate(until.capacity_c, _join(loc, "capacity_c"))
            if ah is not None:
                capacities.append(ah)
        lim = self.limits
        if capacities and lim.max_capacity_ah is not None \
                and min(capacities) > lim.max_capacity_ah:
            field = "capacity_ah" if until.capacity_ah is not None else "capacity_c"
            self.problems.add(_join(loc, field), f"{min(capacities):.4g} Ah exceeds the "
                              f"safety max_capacity_ah {lim.max_capacity_ah:.4g} Ah")
        t_above = until.temperature_above_c
        if t_above is not None and lim.max_temperature_c is not None \
                and t_above >= lim.max_temperature_c:
            self.problems.add(_join(loc, "temperature_above_c"),
                              f"{t_above:.4g} °C is not below the safety limit "
                              f"{lim.max_temperature_c:.4g} °C; the interlock would trip first")
        # Several conditions of one kind: the one reached first is the one that matters.
        return ResolvedUntil(
            voltage_above_v=min(above) if above else None,
            voltage_below_v=max(below) if below else None,
            current_below_a=max(currents) if currents else None,
            duration_s=until.duration_s,
            capacity_ah=min(capacities) if capacities else None,
            dvdt_below_v_per_s=until.dvdt_below_v_per_s,
            temperature_above_c=t_above,
        )

    # -- steps

    def emit(self, cls: type[_ResolvedBase], path: str, step: Any, **fields: Any) -> None:
        self.program.append(cls(index=len(self.program), path=path, tag=step.tag,
                                label=step.label, **fields))

    def steps(self, steps: list[Step], prefix: str) -> None:
        for i, step in enumerate(steps):
            self.step(step, f"{prefix}[{i}]")

    def step(self, step: Step, path: str) -> None:
        if isinstance(step, LoopStep):
            self.loop(step, path)
        elif isinstance(step, RestStep):
            self.emit(ResolvedRest, path, step, until=self.until(path, step.until, 0))
        elif isinstance(step, CCStep | CCCVStep | PulseStep):
            current = self.signed_current(path, step.current_a, step.rate_c)
            sign = 0.0 if current is None else (1.0 if current > 0 else -1.0)
            until = self.until(path, step.until, sign)
            if current is None:
                return  # already reported; keep resolving the rest for more problems
            if isinstance(step, CCStep):
                self.emit(ResolvedCC, path, step, current_a=current, until=until)
            elif isinstance(step, CCCVStep):
                voltage = self.volts(_join(path, "voltage_v"), step.voltage_v)
                if until.current_below_a is not None \
                        and until.current_below_a >= abs(current):
                    field = ("current_below_a" if step.until.current_below_a is not None
                             else "current_below_c")
                    self.problems.add(_join(_join(path, "until"), field),
                                      "the CV cut-off must be below the CC current")
                self.emit(ResolvedCCCV, path, step, current_a=current, voltage_v=voltage,
                          until=until)
            else:
                self.emit(ResolvedPulse, path, step, current_a=current,
                          pulse_duration_s=step.pulse_duration_s,
                          rest_duration_s=step.rest_duration_s, count=step.count,
                          until=until)
        elif isinstance(step, CVStep):
            voltage = self.volts(_join(path, "voltage_v"), step.voltage_v)
            if step.current_limit_a is not None:
                limit: float | None = step.current_limit_a
                field = "current_limit_a"
            else:
                field = "rate_c"
                limit = self.amps_from_rate(step.rate_c or 0.0, _join(path, field))
            if limit is not None:
                # A hold may source or sink current, so both directions' limits apply.
                self.check_current(_join(path, field), limit, both_ways=True)
            until = self.until(path, step.until, 0)
            if limit is not None:
                self.emit(ResolvedCV, path, step, voltage_v=voltage, current_limit_a=limit,
                          until=until)
        elif isinstance(step, EISStep):
            if step.amplitude_a is not None:
                self.check_current(_join(path, "amplitude_a"), step.amplitude_a,
                                   both_ways=True)
            self.emit(ResolvedEIS, path, step, start_frequency_hz=step.start_frequency_hz,
                      stop_frequency_hz=step.stop_frequency_hz,
                      points_per_decade=step.points_per_decade,
                      amplitude_v=step.amplitude_v, amplitude_a=step.amplitude_a)
        elif isinstance(step, SetTemperatureStep):
            lim, t = self.limits, step.temperature_c
            if (lim.min_temperature_c is not None and t < lim.min_temperature_c) or (
                    lim.max_temperature_c is not None and t > lim.max_temperature_c):
                self.problems.add(_join(path, "temperature_c"),
                                  f"{t:.4g} °C is outside the temperature window "
                                  f"{lim.min_temperature_c}–{lim.max_temperature_c} °C")
            self.emit(ResolvedSetTemperature, path, step, temperature_c=t,
                      tolerance_c=step.tolerance_c, stable_for_s=step.stable_for_s,
                      timeout_s=step.timeout_s)

    def loop(self, step: LoopStep, path: str) -> None:
        bound = step.count if step.count is not None else step.max_count
        if bound is None:
            # Reported by the structural check; compile the body anyway for its problems.
            bound = 0
        start = len(self.program)
        self.program.append(None)  # placeholder until the end index is known
        self.steps(step.body, _join(path, "body"))
        end = len(self.program)
        self.program[start] = ResolvedLoopStart(index=start, path=path, tag=step.tag,
                                                label=step.label, end_index=end,
                                                max_iterations=bound)
        self.program.append(ResolvedLoopEnd(index=end, path=path, tag=step.tag,
                                            label=step.label, start_index=start,
                                            max_iterations=bound, until=step.until))


def resolve(protocol: Protocol, cell: CellLimits, instrument: InstrumentLimits | None = None,
            lab: Safety | None = None) -> ResolvedProtocol:
    """Bind a protocol to a cell: C-rates to amps, checks against every limit, a flat program.

    Raises :class:`ProtocolError` with every problem found (structural ones included, for
    a :class:`Protocol` built in code rather than through :func:`parse_protocol`).
    """
    problems = _Problems()
    _check_structure(protocol, problems)
    limits = effective_limits(cell, protocol.safety, instrument, lab, abuse=protocol.abuse)
    for field in missing_abuse_bounds(limits) if protocol.abuse else []:
        side = "safety.max_abs_current_a" if field.endswith("current_a") else f"safety.{field}"
        problems.add(side, f"an abuse protocol ignores the cell's ratings, and neither the "
                     f"channel nor the lab limits {field}; set {side} in the protocol")
    for low, high, what in (("min_voltage_v", "max_voltage_v", "voltage"),
                            ("min_temperature_c", "max_temperature_c", "temperature")):
        lo, hi = getattr(limits, low), getattr(limits, high)
        if lo is not None and hi is not None and lo >= hi:
            problems.add(f"safety.{high}", f"the combined {what} window is empty: "
                         f"{lo:.4g} ({limits.sources.get(low)}) to {hi:.4g} "
                         f"({limits.sources.get(high)})")
    if cell.discharge_cutoff_v >= cell.charge_cutoff_v:
        problems.add("cell.charge_cutoff_v", "the cell's charge cut-off must be above its "
                     "discharge cut-off")
    resolver = _Resolver(cell, limits, problems, abuse=protocol.abuse)
    resolver.steps(protocol.steps, "steps")
    problems.raise_if_any()
    return ResolvedProtocol(
        name=protocol.name,
        protocol_hash=protocol.content_hash(),
        cell=cell,
        instrument=instrument,
        limits=limits,
        program=resolver.program,
    )

