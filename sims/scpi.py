"""Reusable stateful SCPI-99 / IEEE 488.2 command parser for the instrument simulators.

One job: turn a received line into calls of registered handlers and one response line,
with the conventions real instruments honour (short/long forms, optional nodes, the `;`
path rule, common commands, the error queue and the event status register), so every
simulator speaks SCPI the same way and drivers are tested against realistic behaviour.

Patterns use SCPI manual notation::

    parser.register("[:SOURce[1]]:CURRent[:LEVel][:IMMediate]", on_set=f, on_query=g)
    parser.register(":MEASure:VOLTage[:DC]?", on_query=h)        # query-only
    parser.register(":ROUTe:CHANnel#:STATe", on_set=k)           # '#' captures a suffix

Handlers receive the parameter strings (``list[str]``); patterns containing ``#`` also get
``suffixes=[...]`` (ints). Query handlers return the response text. Handlers signal
problems by raising :class:`ScpiError`; the parser queues it and sets the ESR bit.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------

STANDARD_ERRORS: dict[int, str] = {
    0: "No error",
    -100: "Command error",
    -101: "Invalid character",
    -102: "Syntax error",
    -103: "Invalid separator",
    -104: "Data type error",
    -108: "Parameter not allowed",
    -109: "Missing parameter",
    -113: "Undefined header",
    -114: "Header suffix out of range",
    -120: "Numeric data error",
    -131: "Invalid suffix",
    -200: "Execution error",
    -221: "Settings conflict",
    -222: "Data out of range",
    -224: "Illegal parameter value",
    -300: "Device-specific error",
    -350: "Queue overflow",
    -400: "Query error",
    -410: "Query INTERRUPTED",
    -420: "Query UNTERMINATED",
    -430: "Query DEADLOCKED",
}

# Event Status Register bits (IEEE 488.2).
ESR_OPC = 1
ESR_QYE = 4
ESR_DDE = 8
ESR_EXE = 16
ESR_CME = 32
ESR_URQ = 64
ESR_PON = 128

# Status Byte bits (SCPI-99).
STB_EAV = 4  # error/event queue not empty
STB_MAV = 16
STB_ESB = 32
STB_MSS = 64

OVERRANGE = 9.9e37
NOT_A_NUMBER = 9.91e37


class ScpiError(Exception):
    """Raised by handlers (and the parser) to queue a SCPI error ``code,"text"``."""

    def __init__(self, code: int, text: str | None = None) -> None:
        self.code = int(code)
        self.text = text if text is not None else STANDARD_ERRORS.get(self.code, "Error")
        super().__init__(f'{self.code},"{self.text}"')


def esr_bit_for(code: int) -> int:
    """ESR bit an error code sets: -1xx CME, -2xx EXE, -4xx QYE, else (-3xx, vendor) DDE."""
    if -199 <= code <= -100:
        return ESR_CME
    if -299 <= code <= -200:
        return ESR_EXE
    if -499 <= code <= -400:
        return ESR_QYE
    return ESR_DDE


# ---------------------------------------------------------------------------------------
# Value formatting and parsing helpers (for simulator handlers)
# ---------------------------------------------------------------------------------------


def format_nr3(value: float) -> str:
    """SCPI NR3 real: ``+3.71234500E+00``; NaN becomes the SCPI NaN ``+9.91000000E+37``."""
    if math.isnan(value):
        value = NOT_A_NUMBER
    elif math.isinf(value):
        value = math.copysign(OVERRANGE, value)
    return f"{value:+.8E}"


def format_block(payload: bytes) -> str:
    """IEEE 488.2 definite-length block ``#<n><length><payload>`` as a latin-1 string
    (one character per byte), so a binary reply travels the text reply path unchanged:
    the servers encode replies as latin-1."""
    length = str(len(payload))
    return f"#{len(length)}{length}" + payload.decode("latin-1")


def format_nr1(value: int) -> str:
    return str(int(value))


def format_bool(value: bool) -> str:
    """Booleans are queried back as ``1``/``0``."""
    return "1" if value else "0"


_NUMBER_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_NUMBER_PREFIX_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_SPECIAL = {"MIN": "min", "MINIMUM": "min", "MAX": "max", "MAXIMUM": "max",
            "DEF": "def", "DEFAULT": "def"}


def parse_number(
    text: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    default: float | None = None,
) -> float:
    """Parse an NR1/NR2/NR3 numeric parameter, honouring ``MIN|MAX|DEF``.

    Unit suffixes are rejected with -131 (the simulators accept base units only), text
    with -104, malformed numbers with -120 and values outside [minimum, maximum] with -222.
    """
    t = text.strip()
    if not t:
        raise ScpiError(-109)
    special = _SPECIAL.get(t.upper())
    if special is not None:
        chosen = {"min": minimum, "max": maximum, "def": default}[special]
        if chosen is None:
            raise ScpiError(-224)
        return float(chosen)
    if _NUMBER_RE.match(t):
        value = float(t)
    else:
        prefix = _NUMBER_PREFIX_RE.match(t)
        if prefix is None:
            # Starts with a letter or quote: it is not numeric data at all.
            raise ScpiError(-104 if t[0].isalpha() or t[0] in "\"'" else -120)
        rest = t[prefix.end():].strip()
        # "1.5V" / "2 mA" carry a unit suffix; "1e" / "1e+" are broken exponents.
        if rest and rest.isalpha() and not re.fullmatch(r"[eE][+-]?", rest):
            raise ScpiError(-131)
        raise ScpiError(-120)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ScpiError(-222)
    return value


def parse_int(text: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Parse an integer parameter (NRf rounded, as IEEE 488.2 allows)."""
    value = parse_number(text, minimum=minimum, maximum=maximum)
    return int(round(value))


def parse_bool(text: str) -> bool:
    """``ON|OFF|1|0`` (any numeric: non-zero is true); anything else is -224."""
    t = text.strip().upper()
    if t == "ON":
        return True
    if t == "OFF":
        return False
    if not t:
        raise ScpiError(-109)
    if _NUMBER_RE.match(t):
        return round(float(t)) != 0
    raise ScpiError(-224)


def _short_form(mnemonic: str) -> str:
    short = "".join(ch for ch in mnemonic if ch.isupper() or ch.isdigit())
    return short or mnemonic.upper()


def parse_choice(text: str, choices: Sequence[str]) -> str:
    """Match a character (or quoted string) parameter against SCPI-notation choices.

    ``choices`` like ``["CURRent", "VOLTage"]``; returns the short upper form (``"CURR"``).
    """
    t = text.strip().strip("\"'").upper()
    if not t:
        raise ScpiError(-109)
    for choice in choices:
        short = _short_form(choice)
        if t in (short, choice.upper()):
            return short
    raise ScpiError(-224)


def parse_string(text: str) -> str:
    """A quoted string parameter without its quotes."""
    t = text.strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        return t[1:-1]
    return t


def expect_args(args: Sequence[str], count: int) -> None:
    """-109 when parameters are missing, -108 when there are too many."""
    if len(args) < count:
        raise ScpiError(-109)
    if len(args) > count:
        raise ScpiError(-108)


# ---------------------------------------------------------------------------------------
# Command tree
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Node:
    short: str
    long: str
    optional: bool
    suffix: str  # "" = none allowed, "opt1" = optional literal digits, "#" = captured int
    literal_suffix: str = ""

    def match(self, token: str) -> tuple[bool, int | None]:
        """(matches, captured suffix) for one header token (already upper-cased)."""
        base = token.rstrip("0123456789")
        digits = token[len(base):]
        if self.suffix == "":
            if digits and (token == self.short or token == self.long):
                return True, None  # mnemonic that itself ends in digits
            if digits:
                return False, None
        elif self.suffix == "opt":
            if digits and digits != self.literal_suffix:
                return False, None
        elif self.suffix == "#":
            if base in (self.short, self.long):
                return True, int(digits) if digits else 1
            return False, None
        return base in (self.short, self.long), None


_NODE_TEXT = r"[A-Za-z_][A-Za-z_0-9]*?(?:\[\d+\]|#)?"
_SEGMENT_RE = re.compile(rf"\[:?(?P<opt>{_NODE_TEXT}):?\]|:?(?P<req>{_NODE_TEXT})(?=$|:|\[)")
_NODE_RE = re.compile(r"^([A-Za-z_][A-Za-z_0-9]*?)(\[(\d+)\]|#)?$")


def _parse_pattern(pattern: str) -> tuple[list[_Node], bool]:
    """Turn ``[:SOURce[1]]:CURRent[:LEVel]?`` into nodes; returns (nodes, query_only)."""
    p = pattern.strip()
    query_only = p.endswith("?")
    if query_only:
        p = p[:-1]
    nodes: list[_Node] = []
    pos = 0
    while pos < len(p):
        seg = _SEGMENT_RE.match(p, pos)
        if seg is None or seg.end() == pos:
            raise ValueError(f"bad SCPI pattern {pattern!r} at {p[pos:]!r}")
        pos = seg.end()
        optional = seg.group("opt") is not None
        text = seg.group("opt") if optional else seg.group("req")
        m = _NODE_RE.match(text)
        if m is None:  # pragma: no cover - guarded by _SEGMENT_RE
            raise ValueError(f"bad SCPI pattern node {text!r} in {pattern!r}")
        mnemonic, suffix_part, literal = m.group(1), m.group(2), m.group(3)
        suffix = "#" if suffix_part == "#" else ("opt" if suffix_part else "")
        nodes.append(
            _Node(
                short=_short_form(mnemonic),
                long=mnemonic.upper(),
                optional=optional,
                suffix=suffix,
                literal_suffix=literal or "",
            )
        )
    if not nodes:
        raise ValueError(f"empty SCPI pattern {pattern!r}")
    return nodes, query_only


SetHandler = Callable[..., None]
QueryHandler = Callable[..., str]


@dataclass
class _Command:
    pattern: str
    nodes: list[_Node]
    on_set: SetHandler | None
    on_query: QueryHandler | None
    wants_suffixes: bool

    def match(self, tokens: list[str]) -> list[int] | None:
        """Captured suffixes if the tokens match this command, else None."""
        captured: list[int] = []

        def rec(ti: int, ni: int) -> bool:
            if ni == len(self.nodes):
                return ti == len(tokens)
            node = self.nodes[ni]
            if ti < len(tokens):
                ok, value = node.match(tokens[ti])
                if ok:
                    if value is not None:
                        captured.append(value)
                    if rec(ti + 1, ni + 1):
                        return True
                    if value is not None:
                        captured.pop()
            if node.optional:
                if node.suffix == "#":
                    captured.append(1)
                    if rec(ti, ni + 1):
                        return True
                    captured.pop()
                    return False
                return rec(ti, ni + 1)
            return False

        return captured if rec(0, 0) else None


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    """Split on ``sep`` except inside quotes or parentheses (channel lists ``(@101,102)``)."""
    parts: list[str] = []
    buf: list[str] = []
    quote: str | None = None
    depth = 0
    for ch in text:
        if quote:
            buf.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif ch == sep and depth == 0:
            parts.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    parts.append("".join(buf))
    return parts


@dataclass
class ScpiParser:
    """Stateful SCPI parser: command registry + IEEE 488.2 status model + error queue.

    ``idn`` is the ``*IDN?`` reply (or a callable producing it); ``on_reset`` runs on
    ``*RST`` (the error queue survives ``*RST``, as SCPI requires); ``on_trigger`` on
    ``*TRG``.
    """

    idn: str | Callable[[], str] = "LABDAQ,SIMULATOR,0,0.1"
    on_reset: Callable[[], None] | None = None
    on_trigger: Callable[[], None] | None = None
    error_queue_depth: int = 10
    esr: int = ESR_PON
    ese: int = 0
    sre: int = 0
    _commands: list[_Command] = field(default_factory=list)
    _errors: deque[tuple[int, str]] = field(default_factory=deque)
    _extra_common: dict[str, Callable[..., Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Every SCPI instrument has the error queue subsystem; register it once here.
        self.register(":SYSTem:ERRor[:NEXT]?", on_query=self._q_error_next)
        self.register(":SYSTem:ERRor:COUNt?", on_query=self._q_error_count)
        self.register(":SYSTem:ERRor:ALL?", on_query=self._q_error_all)

    def _q_error_next(self, args: list[str]) -> str:
        expect_args(args, 0)
        code, text = self.pop_error()
        return f'{code},"{text}"'

    def _q_error_count(self, args: list[str]) -> str:
        expect_args(args, 0)
        return format_nr1(len(self._errors))

    def _q_error_all(self, args: list[str]) -> str:
        expect_args(args, 0)
        items = [self.pop_error() for _ in range(len(self._errors))] or [self.pop_error()]
        return ",".join(f'{code},"{text}"' for code, text in items)

    # -- registry ------------------------------------------------------------------
    def register(
        self,
        pattern: str,
        *,
        on_set: SetHandler | None = None,
        on_query: QueryHandler | None = None,
    ) -> None:
        """Register a command; a pattern ending in ``?`` is query-only.

        Patterns starting with ``*`` add instrument-specific common commands (``*LANG?``).
        """
        if pattern.startswith("*"):
            key = pattern.strip().upper()
            if key.endswith("?"):
                if on_query is None or on_set is not None:
                    raise ValueError(f"{pattern!r} is a query: give on_query only")
                self._extra_common[key] = on_query
            else:
                if on_set is None:
                    raise ValueError(f"{pattern!r} is a command: give on_set")
                self._extra_common[key] = on_set
                if on_query is not None:
                    self._extra_common[key + "?"] = on_query
            return
        nodes, query_only = _parse_pattern(pattern)
        if query_only and on_set is not None:
            raise ValueError(f"{pattern!r} is query-only but has a set handler")
        if on_set is None and on_query is None:
            raise ValueError(f"{pattern!r} needs a set or query handler")
        self._commands.append(
            _Command(pattern, nodes, on_set, on_query, wants_suffixes="#" in pattern)
        )

    def register_value(
        self,
        pattern: str,
        get: Callable[[], Any],
        put: Callable[[Any], None],
        *,
        kind: str = "number",
        minimum: float | None = None,
        maximum: float | None = None,
        default: float | None = None,
        choices: Sequence[str] = (),
    ) -> None:
        """Shortcut for a plain settable value of ``kind`` number|bool|choice|string."""

        def on_set(args: list[str]) -> None:
            expect_args(args, 1)
            if kind == "number":
                put(parse_number(args[0], minimum=minimum, maximum=maximum, default=default))
            elif kind == "bool":
                put(parse_bool(args[0]))
            elif kind == "choice":
                put(parse_choice(args[0], choices))
            elif kind == "string":
                put(parse_string(args[0]))
            else:  # pragma: no cover - programming error in a simulator
                raise ValueError(kind)

        def on_query(args: list[str]) -> str:
            if args and kind == "number":
                # "X? MIN|MAX|DEF" reports the limit instead of the setting.
                expect_args(args, 1)
                return format_nr3(
                    parse_number(args[0], minimum=minimum, maximum=maximum, default=default)
                )
            expect_args(args, 0)
            value = get()
            if kind == "number":
                return format_nr3(float(value))
            if kind == "bool":
                return format_bool(bool(value))
            if kind == "string":
                return f'"{value}"'
            return str(value)

        self.register(pattern, on_set=on_set, on_query=on_query)

    # -- error queue ----------------------------------------------------------------
    def push_error(self, code: int, text: str | None = None) -> None:
        """Queue an error; when the queue is full the newest slot becomes -350."""
        err = ScpiError(code, text)
        self.esr |= esr_bit_for(err.code)
        if len(self._errors) >= self.error_queue_depth:
            self._errors[-1] = (-350, STANDARD_ERRORS[-350])
            return
        self._errors.append((err.code, err.text))

    def pop_error(self) -> tuple[int, str]:
        if self._errors:
            return self._errors.popleft()
        return 0, STANDARD_ERRORS[0]

    @property
    def errors(self) -> list[tuple[int, str]]:
        """Snapshot of the error queue (oldest first) without consuming it."""
        return list(self._errors)

    def clear_status(self) -> None:
        """``*CLS``: clear the error queue and the event status register."""
        self._errors.clear()
        self.esr = 0

    @property
    def stb(self) -> int:
        value = 0
        if self._errors:
            value |= STB_EAV
        if self.esr & self.ese:
            value |= STB_ESB
        if value & self.sre & ~STB_MSS:
            value |= STB_MSS
        return value

    # -- parsing --------------------------------------------------------------------
    def handle_line(self, line: str) -> str | None:
        """Execute one program message; return the response line or None if no query."""
        responses: list[str] = []
        prefix: list[str] = []
        for unit in _split_outside_quotes(line.strip(), ";"):
            unit = unit.strip()
            if not unit:
                continue
            try:
                reply, prefix = self._execute(unit, prefix)
            except ScpiError as exc:
                self.push_error(exc.code, exc.text)
                continue
            if reply is not None:
                responses.append(reply)
        return ";".join(responses) if responses else None

    def _execute(self, unit: str, prefix: list[str]) -> tuple[str | None, list[str]]:
        parts = unit.split(None, 1)
        header = parts[0]
        params_text = parts[1].strip() if len(parts) > 1 else ""
        args = (
            [a.strip() for a in _split_outside_quotes(params_text, ",")] if params_text else []
        )
        if any(a == "" for a in args):
            raise ScpiError(-109)
        is_query = header.endswith("?")
        if is_query:
            header = header[:-1]
        if header.startswith("*"):
            return self._common(header.upper(), is_query, args), prefix
        if header.startswith(":"):
            tokens = header[1:].split(":")
        else:
            tokens = prefix + header.split(":")
        tokens = [t.upper() for t in tokens]
        if not tokens or any(not t for t in tokens) or any(
            not re.fullmatch(r"[A-Z_][A-Z_0-9]*", t) for t in tokens
        ):
            raise ScpiError(-102)
        new_prefix = tokens[:-1]
        for cmd in self._commands:
            captured = cmd.match(tokens)
            if captured is None:
                continue
            handler = cmd.on_query if is_query else cmd.on_set
            if handler is None:
                continue  # e.g. query form of a set-only command: try later patterns
            kwargs: dict[str, Any] = {"suffixes": captured} if cmd.wants_suffixes else {}
            if is_query:
                return str(handler(args, **kwargs)), new_prefix
            handler(args, **kwargs)
            return None, new_prefix
        raise ScpiError(-113)

    def _common(self, header: str, is_query: bool, args: list[str]) -> str | None:
        key = header + ("?" if is_query else "")
        extra = self._extra_common.get(key)
        if extra is not None:
            result = extra(args)
            return None if not is_query else str(result)
        if key == "*IDN?":
            expect_args(args, 0)
            return self.idn() if callable(self.idn) else self.idn
        if key == "*RST":
            expect_args(args, 0)
            if self.on_reset is not None:
                self.on_reset()
            return None
        if key == "*CLS":
            expect_args(args, 0)
            self.clear_status()
            return None
        if key == "*ESE":
            expect_args(args, 1)
            self.ese = parse_int(args[0], minimum=0, maximum=255)
            return None
        if key == "*ESE?":
            return format_nr1(self.ese)
        if key == "*ESR?":
            value, self.esr = self.esr, 0  # read-and-clear
            return format_nr1(value)
        if key == "*SRE":
            expect_args(args, 1)
            self.sre = parse_int(args[0], minimum=0, maximum=255)
            return None
        if key == "*SRE?":
            return format_nr1(self.sre)
        if key == "*STB?":
            return format_nr1(self.stb)
        if key == "*OPC":
            self.esr |= ESR_OPC  # every simulated operation completes immediately
            return None
        if key == "*OPC?":
            return "1"
        if key == "*WAI":
            return None
        if key == "*TST?":
            return "0"
        if key == "*TRG":
            if self.on_trigger is None:
                raise ScpiError(-113)
            self.on_trigger()
            return None
        raise ScpiError(-113)
