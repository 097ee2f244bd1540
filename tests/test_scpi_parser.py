"""SCPI parser semantics: forms, case, optional nodes, `;` path rule, common commands,
error queue, ESR bits, numeric parsing and NR3 formatting."""

from __future__ import annotations

import pytest

from labdaq.sims.scpi import (
    ESR_CME,
    ESR_DDE,
    ESR_EXE,
    ESR_OPC,
    ESR_QYE,
    STB_EAV,
    ScpiError,
    ScpiParser,
    format_nr3,
    parse_bool,
    parse_choice,
    parse_number,
)


class Device:
    """A minimal instrument on top of the parser, like a simulator would build."""

    def __init__(self) -> None:
        self.current = 0.0
        self.vlim = 21.0
        self.output = False
        self.resets = 0
        self.channels: dict[int, bool] = {}
        self.p = ScpiParser(idn="ACME,MODEL 1,123,1.0", on_reset=self.reset)
        self.p.esr = 0  # start without the power-on bit for simpler assertions
        self.p.register_value("[:SOURce[1]]:CURRent[:LEVel][:IMMediate]",
                              lambda: self.current, lambda v: setattr(self, "current", v),
                              minimum=-1.05, maximum=1.05, default=0.0)
        self.p.register_value(":SOURce:CURRent:VLIMit", lambda: self.vlim,
                              lambda v: setattr(self, "vlim", v), minimum=0.02, maximum=210)
        self.p.register_value(":OUTPut[:STATe]", lambda: self.output,
                              lambda v: setattr(self, "output", v), kind="bool")
        self.p.register(":MEASure:VOLTage[:DC]?", on_query=lambda a: format_nr3(3.7123450))
        self.p.register(":ROUTe:CHANnel#:STATe", on_set=self._chan_set,
                        on_query=lambda a, suffixes: "1" if self.channels.get(suffixes[0])
                        else "0")

    def _chan_set(self, args: list[str], suffixes: list[int]) -> None:
        self.channels[suffixes[0]] = parse_bool(args[0])

    def reset(self) -> None:
        self.resets += 1
        self.current = 0.0

    def q(self, line: str) -> str | None:
        return self.p.handle_line(line)


@pytest.fixture
def dev() -> Device:
    return Device()


@pytest.mark.parametrize(
    "line",
    [
        ":SOURce:CURRent:LEVel:IMMediate 0.5",
        ":SOUR:CURR:LEV:IMM 0.5",
        ":sour:curr 0.5",
        "SOUR:CURR 0.5",
        "CURR 0.5",
        ":SOURCE1:CURRENT:LEVEL 0.5",
        "source:Current:level:immediate 5E-1",
        "  :SOUR:CURR   +0.500  ",
    ],
)
def test_short_long_case_optional_nodes(dev: Device, line: str) -> None:
    assert dev.q(line) is None  # set commands are silent
    assert dev.current == 0.5
    assert dev.q("SYST:ERR?") == '0,"No error"'


def test_invalid_forms_are_undefined_headers(dev: Device) -> None:
    # Neither short nor long form (SOURC is not a legal spelling); bad suffix on a plain node.
    for line in (":SOURC:CURR 1", ":SOUR:CURRE 1", ":SOUR2:CURR:VLIM 1", ":BOGUS?"):
        dev.q(line)
    assert dev.p.errors == [(-113, "Undefined header")] * 4


def test_query_answers_nr3_and_multiple_queries_joined(dev: Device) -> None:
    dev.q(":SOUR:CURR 0.25;:OUTP ON")
    assert dev.q(":SOUR:CURR?;:OUTP?;*IDN?;:MEAS:VOLT?") == (
        "+2.50000000E-01;1;ACME,MODEL 1,123,1.0;+3.71234500E+00"
    )


def test_path_rule_keeps_prefix_after_semicolon(dev: Device) -> None:
    # After :SOUR:CURR:VLIM the path is SOUR:CURR, so "LEV 0.3" means :SOUR:CURR:LEV.
    assert dev.q(":SOUR:CURR:VLIM 4.2;LEV 0.3") is None
    assert (dev.vlim, dev.current) == (4.2, 0.3)
    # A leading colon resets to the root; common commands do not change the path.
    assert dev.q(":SOUR:CURR:VLIM 4.1;*OPC;VLIM?") == "+4.10000000E+00"
    # Without the prefix the relative command is undefined at the root.
    dev.q(":OUTP ON;VLIM 3")
    assert dev.q("SYST:ERR?") == '-113,"Undefined header"'
    assert dev.vlim == 4.1


def test_header_suffix_capture(dev: Device) -> None:
    dev.q(":ROUT:CHAN3:STAT ON;:ROUT:CHANNEL12:STAT 1")
    assert dev.channels == {3: True, 12: True}
    assert dev.q(":ROUT:CHAN3:STAT?;:ROUT:CHAN4:STAT?") == "1;0"


def test_common_commands(dev: Device) -> None:
    assert dev.q("*IDN?") == "ACME,MODEL 1,123,1.0"
    assert dev.q("*OPC?") == "1"
    assert dev.q("*TST?") == "0"
    dev.q("*ESE 36;*SRE 32")
    assert dev.q("*ESE?;*SRE?") == "36;32"
    assert dev.q("*WAI") is None
    dev.q(":SOUR:CURR 0.7;*RST")
    assert dev.resets == 1 and dev.current == 0.0
    dev.q("*OPC")
    assert int(dev.q("*ESR?") or "") & ESR_OPC


def test_error_queue_fifo_and_not_cleared_by_rst(dev: Device) -> None:
    dev.q(":FOO")  # -113
    dev.q(":SOUR:CURR 9")  # -222
    dev.q(":SOUR:CURR")  # -109
    assert dev.q("SYST:ERR:COUN?") == "3"
    dev.q("*RST")
    assert dev.q(":SYSTem:ERRor:NEXT?") == '-113,"Undefined header"'
    assert dev.q("SYST:ERR?") == '-222,"Data out of range"'
    assert dev.q("syst:err?") == '-109,"Missing parameter"'
    assert dev.q("SYST:ERR?") == '0,"No error"'
    assert dev.q("SYST:ERR:COUN?") == "0"


def test_error_queue_overflow_and_cls(dev: Device) -> None:
    for _ in range(15):
        dev.q(":NOPE")
    assert dev.q("SYST:ERR:COUN?") == "10"
    entries = [dev.q("SYST:ERR?") for _ in range(10)]
    assert entries[:9] == ['-113,"Undefined header"'] * 9
    assert entries[9] == '-350,"Queue overflow"'
    dev.q(":NOPE;:NOPE")
    dev.q("*CLS")
    assert dev.q("SYST:ERR?") == '0,"No error"'
    assert dev.q("*ESR?") == "0"


def test_esr_bits_read_and_clear(dev: Device) -> None:
    dev.q(":NOPE")  # command error
    dev.q(":SOUR:CURR 5")  # execution error
    dev.p.push_error(-310, "System error")  # device-specific
    dev.p.push_error(-420)  # query error
    esr = int(dev.q("*ESR?") or "")
    assert esr == ESR_CME | ESR_EXE | ESR_DDE | ESR_QYE
    assert dev.q("*ESR?") == "0"  # read-and-clear
    assert int(dev.q("*STB?") or "") & STB_EAV  # errors still queued
    assert dev.q("SYST:ERR:COUN?") == "4"


def test_stb_summary_bits(dev: Device) -> None:
    assert dev.q("*STB?") == "0"
    dev.q("*ESE 32;*SRE 32;:NOPE")
    stb = int(dev.q("*STB?") or "")
    assert stb & 32 and stb & 64 and stb & STB_EAV


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (":SOUR:CURR", -109),
        (":SOUR:CURR abc", -104),
        (":SOUR:CURR 1.2.3", -120),
        (":SOUR:CURR 0.5A", -131),
        (":SOUR:CURR 0.5 mA", -131),
        (":SOUR:CURR 2", -222),
        (":SOUR:CURR 0.1,0.2", -108),
        (":OUTP MAYBE", -224),
        (":SOUR:CURR?;:BAD:HEADER", -113),
    ],
)
def test_parameter_errors(dev: Device, line: str, code: int) -> None:
    dev.q(line)
    assert dev.p.pop_error()[0] == code
    assert dev.current == 0.0  # rejected values leave the state unchanged


def test_min_max_def(dev: Device) -> None:
    dev.q(":SOUR:CURR MAX")
    assert dev.current == 1.05
    dev.q(":SOUR:CURR min")
    assert dev.current == -1.05
    dev.q(":SOUR:CURR DEF")
    assert dev.current == 0.0
    assert dev.q(":SOUR:CURR? MAX") == "+1.05000000E+00"


def test_bool_forms(dev: Device) -> None:
    for text, value in (("ON", True), ("OFF", False), ("1", True), ("0", False), ("on", True)):
        dev.q(f":OUTP {text}")
        assert dev.output is value
        assert dev.q(":OUTP?") == ("1" if value else "0")


def test_quoted_parameters_keep_separators() -> None:
    seen: list[list[str]] = []
    p = ScpiParser()
    p.register(":DISPlay:TEXT", on_set=lambda a: seen.append(a))
    p.register(":ROUTe:SCAN", on_set=lambda a: seen.append(a))
    p.handle_line(':DISP:TEXT "a;b,c";:ROUT:SCAN (@101,102:104)')
    assert seen == [['"a;b,c"'], ["(@101,102:104)"]]


def test_helpers() -> None:
    assert format_nr3(3.712345) == "+3.71234500E+00"
    assert format_nr3(-0.5) == "-5.00000000E-01"
    assert format_nr3(float("nan")) == "+9.91000000E+37"
    assert format_nr3(float("inf")) == "+9.90000000E+37"
    assert parse_number("1e-3") == 0.001
    assert parse_choice("volt", ["CURRent", "VOLTage"]) == "VOLT"
    assert parse_choice('"CURRENT"', ["CURRent", "VOLTage"]) == "CURR"
    with pytest.raises(ScpiError) as exc:
        parse_choice("RES", ["CURRent", "VOLTage"])
    assert exc.value.code == -224


def test_register_rejects_bad_patterns() -> None:
    p = ScpiParser()
    with pytest.raises(ValueError):
        p.register(":A:B?", on_set=lambda a: None)
    with pytest.raises(ValueError):
        p.register(":A:B")
    with pytest.raises(ValueError):
        p.register("::[", on_query=lambda a: "")


def test_broken_exponent_is_numeric_error() -> None:
    for text in ("1e", "1e+", "1..2"):
        with pytest.raises(ScpiError) as exc:
            parse_number(text)
        assert exc.value.code == -120
