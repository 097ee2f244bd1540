"""Response framing: where one reply ends, and IEEE 488.2 definite-length blocks.

One job: tell a transport's read loop when a whole response message has arrived, for
text replies (up to the read termination) and for binary ones sent as an IEEE 488.2
definite-length arbitrary block ``#<n><length><bytes>`` followed by the termination —
whose bytes may contain the termination character, so a line reader alone would cut
them short. Every transport (pyvisa, pyserial, asyncio stream) frames with
:func:`message_end`, so they all read blocks the same way.
"""

from __future__ import annotations

ASCII_0 = 0x30
ASCII_1 = 0x31
ASCII_9 = 0x39


class FramingError(ValueError):
    """The bytes cannot be a response message (e.g. a block longer than its header)."""


def starts_block(buf: bytes | bytearray) -> bool:
    """True when ``buf`` begins a definite-length block (``#`` and a digit 1-9).

    ``#0`` (indefinite length, ended by the termination) frames like a text line.
    """
    return len(buf) >= 2 and buf[0] == 0x23 and ASCII_1 <= buf[1] <= ASCII_9


def block_header(buf: bytes | bytearray) -> tuple[int, int] | None:
    """(header length, payload length) of the block at the start of ``buf``; None while
    the header is incomplete; FramingError when its length digits are not digits."""
    n = buf[1] - ASCII_0
    if len(buf) < 2 + n:
        return None
    digits = bytes(buf[2 : 2 + n])
    if not digits.isdigit():
        raise FramingError(f"block header {bytes(buf[: 2 + n])!r}: length is not {n} digits")
    return 2 + n, int(digits)


def message_end(buf: bytes | bytearray, term: bytes) -> int:
    """Index just past the first complete response message in ``buf``, or -1.

    A text reply ends at the termination's last byte (so ``"\\r\\n"`` also accepts a bare
    ``"\\n"``, as the line readers always have). A block ends after its payload plus the
    termination (whole, or its last byte alone). A block whose payload is followed by
    anything else raises :class:`FramingError`: the header's length was wrong and the
    link is out of step.
    """
    last = term[-1:]
    if not starts_block(buf):
        cut = buf.find(last)
        return -1 if cut < 0 else cut + 1
    header = block_header(buf)
    if header is None:
        return -1
    end = header[0] + header[1]
    tail = bytes(buf[end : end + len(term)])
    if not tail:
        return -1
    if tail == term:
        return end + len(term)
    if tail[:1] == last:
        return end + 1
    if term.startswith(tail):
        return -1  # part of the termination so far
    raise FramingError(
        f"block of {header[1]} bytes is followed by {tail!r}, not the termination "
        f"{term!r}: its header's length is wrong")


def block_payload(message: bytes) -> memoryview:
    """The payload of a block message (termination already removed), without copying.

    FramingError when ``message`` is not one whole block (too short, too long, or not a
    block at all).
    """
    if not starts_block(message):
        raise FramingError(f"not a definite-length block: starts {message[:8]!r}")
    header = block_header(message)
    if header is None:
        raise FramingError(f"truncated block header {message!r}")
    start, length = header
    if len(message) != start + length:
        raise FramingError(f"block header says {length} bytes, message holds "
                           f"{len(message) - start}")
    return memoryview(message)[start:]


def format_block(payload: bytes) -> bytes:
    """``#<n><length><payload>``: the definite-length block for ``payload``."""
    length = str(len(payload)).encode("ascii")
    if len(length) > 9:
        raise ValueError("payload too long for a definite-length block")
    return b"#" + str(len(length)).encode("ascii") + length + payload
