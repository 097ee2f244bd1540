"""Input bounds shared by the API's request models and the protocol document.

Every number a client sends is finite and within a physical range, every integer fits the
column it is compared with, booleans are not numbers, and text has no control characters.
The rules are pydantic annotations, so they are enforced at the edge and shown in the
OpenAPI schema; limits that depend on configuration or on the channel (the minimum sample
period, the longest duration a lab allows) are checked again when a run is created.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BeforeValidator, Field, StringConstraints

# Column types: ids are INTEGER (int4 on PostgreSQL), seq is BIGINT (int8; SQLite int64).
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1



def _whole(value: object) -> object:
    # JSON has one number type: 3.0 is the integer 3 to a JSON Schema validator (and so
    # to the OpenAPI document), so it is taken as one; 3.5, "3" and true stay refused.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: An integer as JSON Schema means it (3 or 3.0), strictly: no strings, no booleans.
WholeNumber = Annotated[int, BeforeValidator(_whole), Field(strict=True)]

# Physical ranges, wide enough for any cell, module or pack a lab tests and narrow enough
# that a typo (1e308, a sign lost in a unit) is refused rather than reaching an instrument.
MAX_ABS_VOLTAGE_V = 1500.0  # above the highest-voltage EV packs (1000 V class)
MAX_ABS_CURRENT_A = 10_000.0
MAX_CAPACITY_AH = 10_000.0
MIN_TEMPERATURE_C = -100.0  # below any climate chamber's range
MAX_TEMPERATURE_C = 1000.0  # thermal-runaway abuse tests record several hundred °C
MAX_C_RATE = 1000.0
MIN_FREQUENCY_HZ = 1e-6
MAX_FREQUENCY_HZ = 1e8
# The longest single duration accepted (a step, a timeout): a calendar-ageing rest of a
# year. Settings.max_duration_s can lower it for a lab.
MAX_DURATION_S = 366 * 86400.0
# The sample period: at least 1 ms (Settings.min_sample_period_s can raise it), at most 1 h.
MIN_SAMPLE_PERIOD_S = 0.001
MAX_SAMPLE_PERIOD_S = 3600.0
# Protocol size: loops run at most this often, nest at most this deep, and a document has
# at most this many steps in all (loop bodies counted once, loops not unrolled).
MAX_LOOP_COUNT = 1_000_000
MAX_LOOP_DEPTH = 8
MAX_PROTOCOL_STEPS = 1000
MAX_TEXT_LENGTH = 10_000

# strict=True: JSON true/false are refused where a number is expected (lax pydantic reads
# true as 1.0); ints are still accepted for floats. allow_inf_nan=False: Python's JSON
# reader turns the non-standard tokens Infinity and NaN into floats, and they must not
# reach a comparison or the database.
_F = Field(strict=True, allow_inf_nan=False)

Volts = Annotated[float, _F, Field(ge=-MAX_ABS_VOLTAGE_V, le=MAX_ABS_VOLTAGE_V)]
PositiveVolts = Annotated[float, _F, Field(gt=0, le=MAX_ABS_VOLTAGE_V)]
Amps = Annotated[float, _F, Field(ge=-MAX_ABS_CURRENT_A, le=MAX_ABS_CURRENT_A)]
PositiveAmps = Annotated[float, _F, Field(gt=0, le=MAX_ABS_CURRENT_A)]
CRate = Annotated[float, _F, Field(ge=-MAX_C_RATE, le=MAX_C_RATE)]
PositiveCRate = Annotated[float, _F, Field(gt=0, le=MAX_C_RATE)]
AmpHours = Annotated[float, _F, Field(gt=0, le=MAX_CAPACITY_AH)]
Celsius = Annotated[float, _F, Field(ge=MIN_TEMPERATURE_C, le=MAX_TEMPERATURE_C)]
PositiveKelvinSpan = Annotated[float, _F, Field(gt=0, le=MAX_TEMPERATURE_C)]
Seconds = Annotated[float, _F, Field(gt=0, le=MAX_DURATION_S)]
NonNegativeSeconds = Annotated[float, _F, Field(ge=0, le=MAX_DURATION_S)]
Hertz = Annotated[float, _F, Field(ge=MIN_FREQUENCY_HZ, le=MAX_FREQUENCY_HZ)]
Percent = Annotated[float, _F, Field(gt=0, le=100)]
VoltsPerSecond = Annotated[float, _F, Field(gt=0, le=MAX_ABS_VOLTAGE_V)]
SamplePeriodS = Annotated[float, _F, Field(ge=MIN_SAMPLE_PERIOD_S, le=MAX_SAMPLE_PERIOD_S)]

LoopCount = Annotated[int, Field(strict=True, ge=1, le=MAX_LOOP_COUNT)]
RowId = Annotated[int, Field(strict=True, ge=1, le=INT32_MAX)]

# No control characters (NUL is refused by PostgreSQL text and JSONB, and the others hide
# in logs and exports). Names are one line; free text may hold tabs and newlines. A query,
# form or path parameter compared with a stored name takes ONE_LINE as its pattern.
ONE_LINE = r"^[^\x00-\x1f\x7f]*$"
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=ONE_LINE)]
Text = Annotated[
    str,
    StringConstraints(max_length=MAX_TEXT_LENGTH, pattern=r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"),
]


# A point in time a client names (a run's not_before): with its UTC offset, in the years
# a lab plans for, and stored as UTC. The year is checked before the conversion, which
# would overflow at the ends of Python's range (9999-12-31 at -14:00).
MIN_YEAR, MAX_YEAR = 2000, 2999


def _to_utc(value: datetime) -> datetime:
    if not MIN_YEAR <= value.year <= MAX_YEAR:
        raise ValueError(f"the year must be between {MIN_YEAR} and {MAX_YEAR}")
    return value.astimezone(UTC)


UtcTime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
