"""The cabinet's safety cut-off on the event loop's thread (``CyclerCabinet.aswitch_off``):
the exact program message over TCP, one reply, an error entry raised as the worker path
raises it, and None (nothing sent) where the link is busy, so the caller uses the worker
path."""

from __future__ import annotations

import math

import pytest

from labdaq.drivers.cabinet import CyclerCabinet
from labdaq.drivers.errors import InstrumentReportedError
from labdaq.sims.cabinet import CabinetSim
from labdaq.sims.server import TcpSimServer
from tests.sim_probes import ServerProbe
from tests.test_cabinet import cab as cab  # noqa: F401 - fixtures
from tests.test_cabinet import clock as clock  # noqa: F401
from tests.test_cabinet import held_by_another_thread
from tests.test_cabinet import tcp_sim as tcp_sim  # noqa: F401


async def test_aswitch_off_is_one_program_message_and_one_reply(
    cab: CyclerCabinet, tcp_sim: tuple[CabinetSim, TcpSimServer]
) -> None:
    sim, server = tcp_sim
    cab.set_current([1, 2, 3], 1.0, 4.2)
    cab.output([1, 2, 3], True)
    probe = ServerProbe(server)
    sent_s = await cab.aswitch_off([1, 3])
    assert probe.received == ["OUTP OFF,(@1,3);:SYST:ERR?"]
    assert probe.replies == [b'0,"No error"\n']
    assert sent_s is not None and math.isfinite(sent_s)
    assert sim.output_on[:3].tolist() == [False, True, False]
    # The link is in step for the worker path and for the next cut-off.
    assert cab.measure([2]).shape == (1, 3)
    assert await cab.aswitch_off(2) is not None
    assert probe.received[-1] == "OUTP OFF,(@2);:SYST:ERR?"
    assert not sim.output_on.any()


async def test_aswitch_off_raises_the_error_entry_it_reads_back(
    cab: CyclerCabinet, tcp_sim: tuple[CabinetSim, TcpSimServer]
) -> None:
    """The output is off (the command went out first) and the entry is raised as
    ``switch_off``'s error check raises it, so the caller logs it and carries on."""
    sim, _ = tcp_sim
    cab.set_current(4, 1.0, 4.2)
    cab.output(4, True)
    sim.inject_error(-221, "Settings conflict")
    with pytest.raises(InstrumentReportedError) as err:
        await cab.aswitch_off(4)
    assert err.value.code == -221
    assert not sim.output_on[3]


async def test_aswitch_off_steps_aside_when_the_link_is_busy(
    cab: CyclerCabinet, tcp_sim: tuple[CabinetSim, TcpSimServer]
) -> None:
    """Another thread in the middle of an exchange: None and nothing sent; the caller
    switches off through the worker thread, which waits its turn."""
    sim, server = tcp_sim
    cab.output(5, True)
    probe = ServerProbe(server)
    with held_by_another_thread(cab):
        assert await cab.aswitch_off(5) is None
        assert probe.received == []
    assert sim.output_on[4]
    assert await cab.aswitch_off(5) is not None
    assert not sim.output_on[4]
