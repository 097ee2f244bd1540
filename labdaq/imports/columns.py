"""What labdaq's own readers share: finding a column by any of its vendors' names (case
and punctuation aside), numbers as numpy arrays, and cycle and step numbers for a file
that has none."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

import labdaq
from labdaq.errors import Invalid
from labdaq.imports.data import FloatArray, IntArray, cycles_from_current, steps_from_current

__all__ = ["OWN", "OWN_LICENCE", "Columns", "floats", "ints", "numbered"]

OWN = f"labdaq {labdaq.__version__}"
OWN_LICENCE = "labdaq's own"


def floats(x: Any) -> FloatArray:
    return np.asarray(x, dtype=np.float64)


def ints(x: Any) -> IntArray:
    return np.asarray(np.nan_to_num(np.asarray(x, dtype=np.float64)), dtype=np.int64)


class Columns:
    """Case- and punctuation-insensitive column lookup over a table's columns."""

    def __init__(self, columns: dict[str, Any]):
        self.columns = columns
        self.by_key = {self.key(k): k for k in columns}

    @staticmethod
    def key(name: str) -> str:
        return re.sub(r"[^a-z0-9%]+", "", name.lower())

    def find(self, *names: str) -> str | None:
        for n in names:
            hit = self.by_key.get(self.key(n))
            if hit is not None:
                return hit
        return None

    def get(self, *names: str) -> FloatArray | None:
        hit = self.find(*names)
        return None if hit is None else floats(self.columns[hit])

    def need(self, what: str, *names: str) -> FloatArray:
        got = self.get(*names)
        if got is None:
            raise Invalid(f"the file has no {what} column", [
                {"loc": "file", "msg": f"expected one of {list(names)}; "
                                       f"found {sorted(self.columns)[:40]}"}])
        return got


def numbered(current_a: FloatArray, cycle: FloatArray | None,
             step: FloatArray | None) -> tuple[IntArray, IntArray]:
    """The file's cycle and step numbers, or numbers from the current where it has none."""
    return (cycles_from_current(current_a) if cycle is None else ints(cycle),
            steps_from_current(current_a) if step is None else ints(step))
