"""The test-protocol language: a battery test is data.

A protocol is a versioned YAML/JSON document (``schema_version: 1``) of steps — ``rest``,
``cc``, ``cv``, ``cccv``, ``pulse``, ``eis``, ``set_temperature`` and ``loop`` — each with
OR-combined end conditions (``until``), plus a protocol-wide ``safety`` block. Field names
carry their unit (``current_a``, ``rate_c``, ``duration_s``); current is positive when
charging. The shape follows aurora-unicycler (pydantic, ``extra="forbid"``, a discriminated
union on ``step``, C-rates resolved from the cell's capacity when the run starts).

Three stages, each with its own errors, all reported as :class:`ProtocolError` whose
``errors`` list names the step by its index path (``steps[2].body[0].current_a``):

1. :func:`parse_protocol` — schema (types, unknown fields, unknown step types) and the
   checks that need no cell: every step can end, every loop is bounded.
2. :func:`resolve` — against a cell (and optionally an instrument and lab-wide limits):
   C-rates become amps, symbolic voltages (``charge_cutoff``) become volts, currents and
   voltages are checked against the tightest limits, and loops are compiled into a flat
   program an engine runs with a program counter (see :class:`ResolvedProtocol`).
3. The engine executes ``ResolvedProtocol.program``; this package has no I/O besides
   reading templates.

Templates live in ``seeds/protocols/*.yaml`` (package ``labdaq.seeds``) and are read with
:func:`load_template` / :func:`list_templates`; :func:`cycle_protocol` builds the simple
charge/rest/discharge/rest cycle used by the first end-to-end path.

Modules, one job each (everything is re-exported here, so ``from labdaq.protocol import X``
is the way to use them): ``document`` (the pydantic models), ``checks`` (parsing and the
structural checks), ``limits`` (cell/instrument/lab limits and their tightest),
``program`` (the resolved program and :func:`resolve`), ``templates``, ``errors``.
"""

from __future__ import annotations

from labdaq.protocol.checks import check_protocol, parse_protocol
from labdaq.protocol.document import (
    SCHEMA_VERSION,
    VOLTAGE_REFS,
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
)
from labdaq.protocol.errors import ProtocolError
from labdaq.protocol.limits import CellLimits, EffectiveLimits, InstrumentLimits, effective_limits
from labdaq.protocol.program import (
    ResolvedCC,
    ResolvedCCCV,
    ResolvedCV,
    ResolvedEIS,
    ResolvedLoopEnd,
    ResolvedLoopStart,
    ResolvedProtocol,
    ResolvedPulse,
    ResolvedRest,
    ResolvedSetTemperature,
    ResolvedStep,
    ResolvedUntil,
    resolve,
)
from labdaq.protocol.templates import cycle_protocol, list_templates, load_template

__all__ = [
    "SCHEMA_VERSION",
    "VOLTAGE_REFS",
    "ProtocolError",
    "EndConditions",
    "LoopUntil",
    "Safety",
    "RestStep",
    "CCStep",
    "CVStep",
    "CCCVStep",
    "PulseStep",
    "EISStep",
    "SetTemperatureStep",
    "LoopStep",
    "Step",
    "Protocol",
    "CellLimits",
    "InstrumentLimits",
    "EffectiveLimits",
    "ResolvedUntil",
    "ResolvedRest",
    "ResolvedCC",
    "ResolvedCV",
    "ResolvedCCCV",
    "ResolvedPulse",
    "ResolvedEIS",
    "ResolvedSetTemperature",
    "ResolvedLoopStart",
    "ResolvedLoopEnd",
    "ResolvedStep",
    "ResolvedProtocol",
    "parse_protocol",
    "check_protocol",
    "resolve",
    "effective_limits",
    "load_template",
    "list_templates",
    "cycle_protocol",
]
