"""Limits: what the cell, the instrument, the protocol and the lab allow, and their tightest."""

from __future__ import annotations

import math

from pydantic import Field

from labdaq.protocol.document import Safety, _Strict


class CellLimits(_Strict):
    """What the cell's datasheet allows; supplied when a run starts.

    ``voltage_margin_v`` widens the *safety* window beyond the cut-offs: a step that ends
    at 4.20 V by design must not trip the 4.20 V safety limit on the same sample, so the
    interlock sits a little outside (4.25 V by default). End conditions and setpoints are
    still checked against the cut-offs themselves.
    """

    capacity_ah: float | None = Field(default=None, gt=0)
    charge_cutoff_v: float
    discharge_cutoff_v: float
    max_charge_current_a: float = Field(gt=0)
    max_discharge_current_a: float = Field(gt=0)
    min_temperature_c: float | None = None
    max_temperature_c: float | None = None
    voltage_margin_v: float = Field(default=0.05, ge=0)


class InstrumentLimits(_Strict):
    """What the channel's hardware can do (from its driver or instrument profile)."""

    max_current_a: float = Field(gt=0)
    min_voltage_v: float | None = None
    max_voltage_v: float | None = None


class EffectiveLimits(_Strict):
    """The tightest of cell, instrument, protocol safety block and lab-wide limits.

    These are the safety monitor's trip thresholds (compare with ``>``/``<``, debounced by
    ``breach_duration_s``) and what the instrument's own protection is programmed to.
    ``sources`` says which input set each limit (``cell``/``instrument``/``protocol``/
    ``lab``), so a rejection or a trip can say why.
    """

    min_voltage_v: float
    max_voltage_v: float
    max_charge_current_a: float
    max_discharge_current_a: float
    min_temperature_c: float | None = None
    max_temperature_c: float | None = None
    max_capacity_ah: float | None = None
    breach_duration_s: float = 0.0
    sources: dict[str, str] = Field(default_factory=dict)

    @property
    def max_abs_current_a(self) -> float:
        """Compliance for the instrument: the larger of the two directions."""
        return max(self.max_charge_current_a, self.max_discharge_current_a)


def _tightest(candidates: list[tuple[float | None, str]], lowest: bool,
              ) -> tuple[float | None, str]:
    """Smallest (``lowest``) or largest of the given values; first source wins ties."""
    present = [(v, src) for v, src in candidates if v is not None]
    if not present:
        return None, ""
    best = present[0]
    for v, src in present[1:]:
        if (v < best[0]) if lowest else (v > best[0]):
            best = (v, src)
    return best


def effective_limits(cell: CellLimits, safety: Safety | None = None,
                     instrument: InstrumentLimits | None = None,
                     lab: Safety | None = None, *, abuse: bool = False) -> EffectiveLimits:
    """Combine every source of limits into the tightest set (no validation of emptiness).

    ``abuse``: an abuse test (overcharge, forced discharge) exists to go beyond the cell's
    ratings, so the cell contributes nothing; the instrument, protocol and lab still do.
    A voltage or current bound that nothing else gives is then missing:
    :func:`missing_abuse_bounds` names it, and :func:`~labdaq.protocol.resolve` refuses.
    """
    safety = safety or Safety()
    lab_v = lab or Safety()
    inst_max_i = instrument.max_current_a if instrument else None
    inst_min_v = instrument.min_voltage_v if instrument else None
    inst_max_v = instrument.max_voltage_v if instrument else None
    sources: dict[str, str] = {}
    values: dict[str, float | None] = {}

    def pick(field: str, lowest: bool, candidates: list[tuple[float | None, str]]) -> None:
        value, source = _tightest(candidates, lowest)
        values[field] = value
        if value is not None:
            sources[field] = source

    def of_cell(value: float | None) -> float | None:
        return None if abuse else value

    pick("min_voltage_v", False, [
        (of_cell(cell.discharge_cutoff_v - cell.voltage_margin_v), "cell"),
        (inst_min_v, "instrument"), (safety.min_voltage_v, "protocol"),
        (lab_v.min_voltage_v, "lab")])
    pick("max_voltage_v", True, [
        (of_cell(cell.charge_cutoff_v + cell.voltage_margin_v), "cell"),
        (inst_max_v, "instrument"), (safety.max_voltage_v, "protocol"),
        (lab_v.max_voltage_v, "lab")])
    for field, cell_value in (("max_charge_current_a", cell.max_charge_current_a),
                              ("max_discharge_current_a", cell.max_discharge_current_a)):
        pick(field, True, [(of_cell(cell_value), "cell"), (inst_max_i, "instrument"),
                           (safety.max_abs_current_a, "protocol"),
                           (lab_v.max_abs_current_a, "lab")])
    pick("min_temperature_c", False, [
        (of_cell(cell.min_temperature_c), "cell"), (safety.min_temperature_c, "protocol"),
        (lab_v.min_temperature_c, "lab")])
    pick("max_temperature_c", True, [
        (of_cell(cell.max_temperature_c), "cell"), (safety.max_temperature_c, "protocol"),
        (lab_v.max_temperature_c, "lab")])
    pick("max_capacity_ah", True, [
        (safety.max_capacity_ah, "protocol"), (lab_v.max_capacity_ah, "lab")])
    # A lab's debounce is a ceiling only if the lab set one: Safety's default of 0 means
    # "not configured" there, and must not silently remove a protocol's debounce.
    lab_breach = (lab.breach_duration_s
                  if lab is not None and "breach_duration_s" in lab.model_fields_set else None)
    pick("breach_duration_s", True, [(safety.breach_duration_s, "protocol"),
                                     (lab_breach, "lab")])

    def from_cell(field: str) -> float:
        # The cell always contributes these, so they are never missing; in abuse mode a
        # missing one is refused by resolve() (missing_abuse_bounds) before a run exists,
        # and the infinite placeholder only lets that report every problem at once.
        value = values[field]
        if value is None:
            assert abuse
            return -math.inf if field.startswith("min_") else math.inf
        return value

    return EffectiveLimits(
        min_voltage_v=from_cell("min_voltage_v"),
        max_voltage_v=from_cell("max_voltage_v"),
        max_charge_current_a=from_cell("max_charge_current_a"),
        max_discharge_current_a=from_cell("max_discharge_current_a"),
        min_temperature_c=values["min_temperature_c"],
        max_temperature_c=values["max_temperature_c"],
        max_capacity_ah=values["max_capacity_ah"],
        breach_duration_s=values["breach_duration_s"] or 0.0,
        sources=sources,
    )



# The bounds an abuse run must get from its channel, its protocol or the lab, since its
# cell's ratings do not count: without them nothing would stop an overcharge.
ABUSE_BOUNDS: tuple[str, ...] = ("min_voltage_v", "max_voltage_v",
                                 "max_charge_current_a", "max_discharge_current_a")


def missing_abuse_bounds(limits: EffectiveLimits) -> list[str]:
    """The fields of :data:`ABUSE_BOUNDS` that no source set (infinite placeholders)."""
    return [f for f in ABUSE_BOUNDS if not math.isfinite(getattr(limits, f))]
