"""tests/ports.py: service ports come from outside the kernel's ephemeral range, one
block per process, and a port already listened on is never handed out."""

from __future__ import annotations

import socket

import pytest

from tests import ports


def test_ports_are_below_the_ephemeral_range_in_the_callers_block() -> None:
    low = ports._ephemeral_low()
    for owner, index in (("bench", 0), ("gw0", 2), ("gw5", 7)):
        port = ports.free_port(owner)
        start = ports.FIRST + index * ports.BLOCK
        assert start <= port < start + ports.BLOCK < low


def test_a_port_handed_out_is_not_handed_out_again_before_its_block_is_used_up() -> None:
    seen = {ports.free_port("gw3") for _ in range(50)}
    assert len(seen) == 50


def test_a_port_someone_listens_on_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "BLOCK", 2)
    start = ports._block_start("gw9")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", start))
        listener.listen()
        monkeypatch.setattr(ports, "_given", set())
        assert ports.free_port("gw9") == start + 1
        with socket.socket() as second:
            second.bind(("127.0.0.1", start + 1))
            second.listen()
            monkeypatch.setattr(ports, "_given", set())
            with pytest.raises(RuntimeError, match="in use"):
                ports.free_port("gw9")


def test_the_base_moves_every_block_and_stays_out_of_the_ephemeral_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ports, "FIRST", 25_000)
    assert ports._block_start("gw0") == 26_000
    monkeypatch.setattr(ports, "FIRST", ports._ephemeral_low() - ports.BLOCK)
    with pytest.raises(RuntimeError, match="LABDAQ_TEST_PORT_BASE"):
        ports._block_start("gw0")
    monkeypatch.setattr(ports, "FIRST", 0)
    with pytest.raises(RuntimeError, match="between 1024"):
        ports._block_start("bench")
