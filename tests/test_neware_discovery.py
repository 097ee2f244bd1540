"""A Neware BTS server's channels (its ``getdevinfo``) written into an instruments file:
``labdaq instruments probe --toml`` and ``labdaq sim --neware N --write-config``, against
the simulated BTS server over real TCP (sims/neware_bts.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from labdaq.cli import app as cli_app
from labdaq.drivers.neware_bts import NewareBTS
from labdaq.instruments_config import load_instruments_config
from labdaq.sims.neware_bts import BtsServer, NewareBtsSim
from tests.test_neware_bts import neware_resource


@pytest.fixture
def bts_server() -> Iterator[BtsServer]:
    # two cabinets of three channels: six channels, as getdevinfo lists them
    server = BtsServer(NewareBtsSim(devices=2, channels=3)).start()
    yield server
    server.stop()


def test_probe_toml_lists_every_channel_the_bts_reports(bts_server: BtsServer,
                                                        tmp_path: Path) -> None:
    host, port = bts_server.address
    resource = f"TCPIP::{host}::{port}::SOCKET"
    result = CliRunner().invoke(cli_app, ["instruments", "probe", resource, "--timeout", "1",
                                          "--toml", "neware7"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "instruments.toml"
    path.write_text(result.stdout)
    (inst,) = load_instruments_config(path).instruments
    assert (inst.name, inst.driver, inst.resource) == ("neware7", "neware_bts", resource)
    names = [f"{d}-1-{c}" for d in (1, 2) for c in (1, 2, 3)]
    assert [ch.name for ch in inst.channels] == [f"neware7/{n}" for n in names]
    # each index is the channel the driver addresses for it (getdevinfo's order)
    drv = NewareBTS.tcp(host, port, timeout_s=10.0)
    try:
        drv.connect()
        for ch in inst.channels:
            assert f"neware7/{drv.channel_name(ch.index)}" == ch.name
    finally:
        drv.close()
    # the file passes the check (and its probe names the same driver)
    checked = CliRunner().invoke(cli_app, ["instruments", "check", str(path), "--probe",
                                           "--timeout", "1"])
    assert checked.exit_code == 0, checked.output
    assert "channels=6" in checked.stdout


def test_probe_toml_refuses_a_bad_instrument_name(bts_server: BtsServer) -> None:
    host, port = bts_server.address
    result = CliRunner().invoke(cli_app, ["instruments", "probe",
                                          f"TCPIP::{host}::{port}::SOCKET", "--timeout", "1",
                                          "--toml", "bad name"])
    assert result.exit_code == 2
    assert "--toml 'bad name'" in result.stderr


def test_sim_write_config_holds_the_bts_and_its_channels(tmp_path: Path) -> None:
    config = tmp_path / "lab.toml"
    proc = subprocess.Popen([sys.executable, "-m", "labdaq.cli", "sim", "--smus", "1",
                             "--neware", "4", "--write-config", str(config)],
                            stdout=subprocess.PIPE, text=True)
    try:
        resource = neware_resource(proc)
        assert re.match(r"TCPIP::[\d.]+::\d+::SOCKET$", resource), resource
        cfg = load_instruments_config(config)
        by_name = {i.name: i for i in cfg.instruments}
        assert set(by_name) == {"smu1", "neware1"}
        bts = by_name["neware1"]
        assert (bts.driver, bts.resource) == ("neware_bts", resource)
        assert [(ch.index, ch.name) for ch in bts.channels] == [
            (i, f"neware1/1-1-{i}") for i in (1, 2, 3, 4)]
        assert bts.options["step_dir_remote"] == str(tmp_path / "neware_steps")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
