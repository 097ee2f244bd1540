"""Writing an instruments file: the TOML that ``labdaq sim --write-config`` prints, which
round-trips through :mod:`labdaq.instruments_config`'s loader."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"TOML cannot hold {value!r} here")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def dump_instruments_toml(instruments: Sequence[Mapping[str, Any]], header: str = "",
                          cells: Sequence[Mapping[str, Any]] = ()) -> str:
    """TOML text for ``[[instruments]]`` and ``[[cells]]`` tables (round-trips through
    the loader)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for inst in instruments:
        if lines:
            lines.append("")
        lines.append("[[instruments]]")
        for key in ("name", "driver", "resource", "node", "description", "enabled",
                    "options", "channels"):
            if key in inst and inst[key] is not None:
                value = inst[key]
                if key == "channels" and value:
                    items = ",\n".join(f"  {_toml_value(ch)}" for ch in value)
                    lines.append(f"channels = [\n{items},\n]")
                else:
                    lines.append(f"{key} = {_toml_value(value)}")
    for cell in cells:
        lines.append("")
        lines.append("[[cells]]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in cell.items()
                     if v is not None)
    return "\n".join(lines) + "\n"
