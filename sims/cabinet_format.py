"""The cabinet's reply formats: SCPI NR3/NR1 lists and ``MEAS:ALL?`` lines and blocks.

One job: turn a cabinet's per-channel readings into the bytes its dialect sends
(docs/instruments/cabinet.md) in a few numpy passes, fast enough that a simulated
64-channel cabinet answers ``MEAS:ALL?`` at 100 Hz without the formatting being its cost.
:class:`labdaq.sims.cabinet.CabinetSim` uses it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from .scpi import NOT_A_NUMBER, OVERRANGE, format_block

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

# FORM:DATA REAL,32 byte orders: FORM:BORD NORM is big-endian (IEEE 488.2), SWAP little.
_REAL32 = {"NORM": ">f4", "SWAP": "<f4"}


# One 64-channel MEAS:ALL? reply is 192 reals + 128 integers. Measured on the 2-core dev
# machine (same run, quiet moment): one f-string per value ~275 us; one big
# "%+.8E,...,%d" % tuple(...) pass ~95 us; this pass ~60 us. Each real "+3.71234500E+00,"
# is exactly 16 bytes = two little-endian uint64 words assembled by OR-ing 1-D table
# lookups (sign+digit+point, digit groups, exponent+comma), so numpy does a handful of
# gathers instead of 2-D strided copies. Output equals f"{x:+.8E}" byte for byte (tested
# on random values across 60 decades).

_POW10 = 10.0 ** np.arange(-130, 131)  # _POW10[k + 130] == 10**k


def _word_table(count: int, fill: Callable[[int], list[tuple[int, str]]]) -> NDArray[np.uint64]:
    """``count`` uint64 words; ``fill(i)`` gives (byte position, character) pairs."""
    table = np.zeros((count, 8), np.uint8)
    for i in range(count):
        for pos, char in fill(i):
            table[i, pos] = ord(char)
    return table.view("<u8").reshape(count)


# Word 0 of a real: sign, leading digit, point, digits 1-3, digits 4-5.
_W_HEAD = _word_table(20, lambda i: [(0, "+-"[i // 10]), (1, str(i % 10)), (2, ".")])
_W_GROUP1 = _word_table(1000, lambda g: list(zip((3, 4, 5), f"{g:03d}", strict=True)))
_W_GROUP2_HEAD = _word_table(1000, lambda g: list(zip((6, 7), f"{g:03d}"[:2], strict=True)))
# Word 1: digit 6, digits 7-8, exponent, comma.
_W_GROUP2_TAIL = _word_table(1000, lambda g: [(0, f"{g:03d}"[2])])
_W_GROUP3 = _word_table(100, lambda g: list(zip((1, 2), f"{g:02d}", strict=True)))
_W_EXPONENT = _word_table(199, lambda i: list(zip((3, 4, 5, 6, 7), f"E{i - 99:+03d},",
                                                  strict=True)))
# NR1 0..999 right-aligned in 3 bytes, NUL-padded (NULs are removed after joining):
# the mode field in bytes 0-3 and the status field in bytes 4-7 of one word.
_W_MODE = _word_table(1000, lambda v: [(p, c) for p, c in zip((0, 1, 2), f"{v:>3d}",
                                                              strict=True) if c != " "]
                      + [(3, ",")])
_W_STATUS = _word_table(1000, lambda v: [(p, c) for p, c in zip((4, 5, 6), f"{v:>3d}",
                                                                strict=True) if c != " "]
                        + [(7, ",")])


def _scpi_reals(values: FloatArray) -> FloatArray:
    """NaN -> 9.91E+37 and +-inf -> +-9.9E+37, as SCPI instruments report them."""
    out = np.array(values, dtype=float)
    bad = ~np.isfinite(out)
    if bad.any():
        out[np.isnan(out)] = NOT_A_NUMBER
        inf = np.isinf(out)
        out[inf] = np.copysign(OVERRANGE, out[inf])
    return out


def nr3_words(values: FloatArray) -> NDArray[np.uint64]:
    """``(n, 2)`` uint64 whose bytes are ``%+.8E,`` of each finite value (16 bytes)."""
    x = np.asarray(values, dtype=float).reshape(-1)
    ax = np.abs(x)
    ax[ax < 1e-99] = 0.0  # exponents are two digits: flush denormal-scale noise to zero
    nz = ax > 0.0
    # log10 may be off by one next to powers of ten; the mantissa check corrects it.
    e = np.floor(np.log10(ax + ~nz)).astype(np.int64)
    m = np.rint(ax * _POW10[138 - e])
    e += m >= 1e9
    e -= (m < 1e8) & nz
    mant = np.rint(ax * _POW10[138 - e]).astype(np.int64)  # 9 significant digits
    d0, rest = np.divmod(mant, 100_000_000)
    g1, rest = np.divmod(rest, 100_000)
    g2, g3 = np.divmod(rest, 100)
    out = np.empty((x.size, 2), "<u8")  # explicit byte order: the bytes are the text
    out[:, 0] = _W_HEAD[d0 + 10 * (x < 0)] | _W_GROUP1[g1] | _W_GROUP2_HEAD[g2]
    out[:, 1] = _W_GROUP2_TAIL[g2] | _W_GROUP3[g3] | _W_EXPONENT[e + 99]
    return out


def format_nr3_list(values: FloatArray) -> str:
    """Comma-separated NR3 list (``+3.71234500E+00,...``) in one numpy pass."""
    words = nr3_words(_scpi_reals(np.asarray(values, dtype=float).reshape(-1)))
    return words.tobytes()[:-1].decode("ascii")


def format_nr1_list(values: IntArray) -> str:
    """Comma-separated NR1 list of integers 0..999."""
    words = _W_STATUS[np.asarray(values, dtype=np.int64).reshape(-1)] >> np.uint64(32)
    return words.astype("<u4").tobytes()[:-1].replace(b"\0", b"").decode("ascii")


def format_meas_all(voltage_v: FloatArray, current_a: FloatArray, temperature_c: FloatArray,
                    mode: IntArray, status: IntArray) -> str:
    """``V,I,T,mode,status`` per channel, channels joined by commas, in one numpy pass."""
    n = len(voltage_v)
    reals = _scpi_reals(np.column_stack((voltage_v, current_a, temperature_c)))
    row = np.empty((n, 7), "<u8")  # 3 reals x 2 words + 1 word for mode,status
    row[:, :6] = nr3_words(reals).reshape(n, 6)
    row[:, 6] = (_W_MODE[np.asarray(mode, dtype=np.int64)]
                 | _W_STATUS[np.asarray(status, dtype=np.int64)])
    return row.tobytes()[:-1].replace(b"\0", b"").decode("ascii")


def format_meas_all_real32(voltage_v: FloatArray, current_a: FloatArray,
                           temperature_c: FloatArray, mode: IntArray, status: IntArray,
                           byte_order: str = "NORM") -> str:
    """``MEAS:ALL?`` under ``FORM:DATA REAL,32``: one definite-length block of float32
    ``V,I,T,mode,status`` per channel in list order (mode and status are small integers,
    exact in float32), big-endian for ``FORM:BORD NORM``, little-endian for ``SWAP``."""
    reals = _scpi_reals(np.column_stack((voltage_v, current_a, temperature_c)))
    table = np.column_stack((reals, mode, status)).astype(_REAL32[byte_order])
    return format_block(table.tobytes())
