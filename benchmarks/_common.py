"""Shared output format: each benchmark ends with one JSON line."""

from __future__ import annotations

import json
from typing import Any


def result(name: str, value: float, unit: str, baseline: float | None, **extra: Any) -> None:
    ratio = value / baseline if baseline else None
    out = {
        "name": name,
        "value": round(value, 3),
        "unit": unit,
        "baseline": None if baseline is None else round(baseline, 3),
        "ratio": None if ratio is None else round(ratio, 3),
        **extra,
    }
    print(json.dumps(out), flush=True)
