"""Analysis of stored run data, recomputable from the samples and spectra alone:
per-cycle summaries with the state each cycle started from (:mod:`.cycles`), capacity
retention and fade, DC internal resistance from pulses (:mod:`.dcir`), incremental
capacity (:mod:`.dqdv`) and equivalent-circuit fits of impedance spectra with parameter
uncertainties (:mod:`.eis`). Everything works on numpy arrays; :mod:`.load` reads them
from the database."""

from labdaq.analysis.cycles import (
    STATES,
    CycleSummary,
    Retention,
    capacity_retention,
    cell_state_at,
    rest_current_for,
    summarise_cycles,
)
from labdaq.analysis.dcir import PulseResistance, pulse_resistances
from labdaq.analysis.dqdv import IncrementalCapacity, incremental_capacity
from labdaq.analysis.eis import EisFit, circuit_impedance, fit_spectrum

__all__ = [
    "STATES",
    "CycleSummary",
    "Retention",
    "capacity_retention",
    "cell_state_at",
    "rest_current_for",
    "summarise_cycles",
    "PulseResistance",
    "pulse_resistances",
    "IncrementalCapacity",
    "incremental_capacity",
    "EisFit",
    "circuit_impedance",
    "fit_spectrum",
]
