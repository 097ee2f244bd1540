"""Channel lists of the cabinet's SCPI dialect: ``(@1:4,7,9:10)`` to channel indexes.

One job: parse the channel-list argument every per-channel cabinet command takes
(docs/instruments/cabinet.md), with the SCPI errors a malformed or out-of-range list
raises.
"""

from __future__ import annotations

import re

import numpy as np
from numpy.typing import NDArray

from .scpi import ScpiError

CHANNELS_MIN = 1
CHANNELS_MAX = 64

_CHANNEL_LIST_RE = re.compile(r"^\(\s*@\s*(.*?)\s*\)$")
_CHANNEL_ITEM_RE = re.compile(r"^(\d+)(?:\s*:\s*(\d+))?$")


def parse_channel_list(text: str, channels: int) -> NDArray[np.int64]:
    """``(@1:4,7,9:10)`` -> zero-based channel indexes in list order (duplicates kept).

    A range may run downwards (``(@8:5)`` = 8,7,6,5). Malformed text is -171 "Invalid
    expression"; a channel outside 1..channels is -222 "Data out of range".
    """
    m = _CHANNEL_LIST_RE.match(text.strip())
    if m is None or not m.group(1):
        raise ScpiError(-171, "Invalid expression; expected a channel list like (@1:8)")
    out: list[int] = []
    for item in m.group(1).split(","):
        im = _CHANNEL_ITEM_RE.match(item.strip())
        if im is None:
            raise ScpiError(-171, f"Invalid expression; bad channel list item {item.strip()!r}")
        first = int(im.group(1))
        last = int(im.group(2)) if im.group(2) is not None else first
        for ch in (first, last):
            if not CHANNELS_MIN <= ch <= channels:
                raise ScpiError(-222, f"Data out of range; channel {ch} not in 1:{channels}")
        step = 1 if last >= first else -1
        out.extend(range(first - 1, last - 1 + step, step))
    return np.asarray(out, dtype=np.int64)
