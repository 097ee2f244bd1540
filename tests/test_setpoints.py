"""Set points of several channels at once (labdaq.engine.setpoints.Outputs.apply_many).

Byte-exact against the cabinet driver's scripted transport: channels whose new phases ask
for the same set points get one command per quantity with a channel list; others their
own, in the order they first appear. (An instrument without list commands is programmed
channel by channel, as every SMU run in the engine tests is.)
"""

from __future__ import annotations

import math
from typing import Any

from labdaq.engine.channel import Phase
from labdaq.engine.setpoints import Outputs
from tests.test_cabinet import NO_ERROR, scripted


async def _call(fn: Any, *args: Any) -> Any:
    return fn(*args)


def _cc(current_a: float, voltage_v: float, low_v: float = math.nan) -> Phase:
    return Phase("cc", current_a=current_a, voltage_v=voltage_v, voltage_low_v=low_v)


async def test_channels_with_the_same_set_points_share_one_command() -> None:
    charge, discharge = _cc(1.0, 4.2), _cc(-2.0, 4.2, 2.8)
    cab, t = scripted([
        # 1, 2 and 5 charge alike: one clamp, one CC, one output command for the three.
        ("SOUR:CURR:VLIM:LOW 0,(@1,2,5)", None), (":SYST:ERR?", NO_ERROR),
        ("SOUR:FUNC CURR,(@1,2,5);:SOUR:CURR:VLIM 4.2,(@1,2,5);:SOUR:CURR 1,(@1,2,5)", None),
        (":SYST:ERR?", NO_ERROR),
        ("OUTP ON,(@1,2,5)", None), (":SYST:ERR?", NO_ERROR),
        # 3 discharges with its own lower clamp.
        ("SOUR:CURR:VLIM:LOW 2.8,(@3)", None), (":SYST:ERR?", NO_ERROR),
        ("SOUR:FUNC CURR,(@3);:SOUR:CURR:VLIM 4.2,(@3);:SOUR:CURR -2,(@3)", None),
        (":SYST:ERR?", NO_ERROR),
        ("OUTP ON,(@3)", None), (":SYST:ERR?", NO_ERROR),
        # 4 and 6 rest: outputs off together.
        ("OUTP OFF,(@4,6)", None), (":SYST:ERR?", NO_ERROR),
    ])
    out = Outputs("cab-test", cab, _call)
    await out.apply_many([(1, charge), (3, discharge), (2, _cc(1.0, 4.2)), (4, Phase("off")),
                          (5, charge), (6, Phase("off"))])
    t.assert_all_used()


async def test_one_channel_goes_as_before() -> None:
    cab, t = scripted([
        ("SOUR:FUNC VOLT,(@7);:SOUR:VOLT:ILIM 0.1,(@7);:SOUR:VOLT 4.2,(@7)", None),
        (":SYST:ERR?", NO_ERROR),
        ("OUTP ON,(@7)", None), (":SYST:ERR?", NO_ERROR),
    ])
    await Outputs("cab-test", cab, _call).apply_many(
        [(7, Phase("cv", current_a=0.1, voltage_v=4.2))])
    t.assert_all_used()
