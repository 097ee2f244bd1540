"""Instruments as configuration: `labdaq instruments apply` and `PUT /api/v1/instruments`
load a lab's instruments, channels, wiring and cells into the database in one transaction;
dry runs change nothing; active runs refuse changes under them, naming the run; errors
name the file, the entry, the field and the line. The API configures a Hioki with no
transport options and the engine opens it CR+LF framed (simulator on a pty)."""

from __future__ import annotations

import asyncio
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from labdaq.api.app import create_app
from labdaq.auth import create_token
from labdaq.cli import app
from labdaq.config import Settings
from labdaq.engine.clock import EngineClock
from labdaq.engine.node import AcquisitionNode
from labdaq.instruments_config import dump_instruments_toml
from labdaq.runs import RunCreate, create_run
from labdaq.sims.cell import CellBank
from labdaq.sims.clock import ManualClock
from labdaq.sims.hioki_bt4560 import HiokiBT4560Sim
from labdaq.sims.server import SimServer
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker, upgrade
from tests.ports import free_port
from tests.service_wait import SERVICE_TEST_TIMEOUT_S, wait_healthy

CLI = [sys.executable, "-m", "labdaq.cli"]
CRLF = {"read_termination": "\r\n", "write_termination": "\r\n"}
CELL = {"serial": "A-001", "chemistry": "nmc811", "capacity_ah": 4.9, "charge_cutoff_v": 4.2,
        "discharge_cutoff_v": 2.5, "max_charge_current_a": 4.9}
PROTOCOL = {"charge_current_a": 2.45, "charge_voltage_v": 4.2, "discharge_current_a": 2.45,
            "discharge_cutoff_v": 2.5}


def _lab(smu_resource: str = "TCPIP::127.0.0.1::5025::SOCKET", *,
         impedance: str | None = "eis1", placement: str = "can side") -> list[dict[str, Any]]:
    """A small lab: an SMU whose cell is wired to a logger input, a meter and a chamber."""
    channel: dict[str, Any] = {
        "index": 1, "name": "smu1/1", "max_current_a": 7.35, "max_voltage_v": 21.0,
        "cell": "A-001", "chamber": "chamber1",
        "thermocouple": {"logger": "logger1", "channel": 101, "type": "K",
                         "placement": placement}}
    if impedance:
        channel["impedance"] = impedance
    return [
        {"name": "smu1", "driver": "keithley2450", "resource": smu_resource,
         "channels": [channel]},
        {"name": "eis1", "driver": "hioki_bt4560", "resource": "ASRL/dev/ttyUSB1::INSTR",
         "channels": []},
        {"name": "logger1", "driver": "keysight_daq970a",
         "resource": "TCPIP::127.0.0.1::5026::SOCKET",
         "options": {"channels": [101, 102]}, "channels": []},
        {"name": "chamber1", "driver": "espec_chamber", "resource": "ASRL/dev/ttyUSB0::INSTR",
         "options": {"min_c": -40.0, "max_c": 150.0}, "channels": []},
    ]


def _write(path: Path, instruments: list[dict[str, Any]],
           cells: list[dict[str, Any]] | None = None) -> Path:
    path.write_text(dump_instruments_toml(instruments, cells=[CELL] if cells is None else cells))
    return path


def _apply(url: str, path: Path, *extra: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["instruments", "apply", str(path), "--database-url", url,
                                      *extra])
    return result.exit_code, result.stdout, result.stderr


def _query(url: str, fn: Any) -> Any:
    async def run() -> Any:
        engine = create_engine(url)
        try:
            async with session_scope(sessionmaker(engine)) as s:
                return await fn(s)
        finally:
            await engine.dispose()

    return asyncio.run(run())


async def _state(s: Any) -> dict[str, Any]:
    insts = (await s.scalars(select(m.Instrument).order_by(m.Instrument.id))).all()
    chans = (await s.scalars(select(m.Channel).order_by(m.Channel.id))).all()
    cells = {c.id: c.serial for c in (await s.scalars(select(m.Cell))).all()}
    return {
        "instruments": {i.name: (i.driver, i.resource, i.options, i.enabled) for i in insts},
        "channels": {c.name: {"aux": c.aux, "cell": cells.get(c.default_cell_id or -1),
                              "enabled": c.enabled, "max_current_a": c.max_current_a}
                     for c in chans},
        "cells": sorted(cells.values()),
    }


@pytest.fixture
def url(db_url: str) -> str:
    """A migrated database: SQLite, and PostgreSQL where LABDAQ_TEST_PG_URL is set."""
    return db_url


# -- labdaq sim --write-config, applied unchanged ------------------------------------------


def _write_config_of_a_sim_lab(path: Path) -> str:
    """Run `labdaq sim --write-config` until it is ready, then stop it; its output."""
    args = [*CLI, "sim", "--smus", "1", "--cabinets", "1", "--cabinet-channels", "2",
            "--impedance", "1", "--loggers", "1", "--logger-channels", "4", "--chamber",
            "--transport", "eis1=pty", "--watchdog", "0", "--write-config", str(path)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, ""):
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail("labdaq sim did not become ready:\n" + "".join(seen))
            seen.append(line)
            if line.startswith("ready:"):
                return "".join(seen)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_sim_write_config_applies_unchanged(tmp_path: Path, sqlite_url: str) -> None:
    url = sqlite_url
    config = tmp_path / "lab.toml"
    _write_config_of_a_sim_lab(config)
    code, out, err = _apply(url, config)
    assert code == 0, out + err
    assert "+ instrument eis1" in out and "+ cell SIM-NMC811-001" in out
    state = _query(url, _state)
    assert set(state["instruments"]) == {"smu1", "cabinet1", "eis1", "logger1", "chamber1"}
    assert state["cells"] == ["SIM-NMC811-001", "SIM-NMC811-C1-001", "SIM-NMC811-C1-002"]
    smu = state["channels"]["smu1/1"]
    assert smu["cell"] == "SIM-NMC811-001"
    assert smu["aux"] == {"impedance": "eis1", "chamber": "chamber1",
                          "thermocouple": {"logger": "logger1", "channel": 101, "type": "K",
                                           "placement": "cell surface (simulated)"}}
    assert state["channels"]["cabinet1/2"]["aux"]["thermocouple"]["channel"] == 103
    # The file carries no transport options: each driver's framing applies when opened.
    assert state["instruments"]["eis1"][2] == {}
    audits = _query(url, lambda s: _audits(s))
    assert any("instruments applied from" in a for a in audits)
    # Applying the same file again changes nothing.
    code, out, _ = _apply(url, config)
    assert code == 0 and out.strip().endswith("no changes"), out


async def _audits(s: Any) -> list[str]:
    return list((await s.scalars(select(m.Event.message).where(m.Event.kind == "audit"))).all())


# -- dry run, diff, removal ----------------------------------------------------------------


def test_dry_run_shows_the_diff_and_changes_nothing(tmp_path: Path, url: str) -> None:
    first = _write(tmp_path / "lab.toml", _lab())
    assert _apply(url, first)[0] == 0
    before = _query(url, _state)
    lab = _lab(placement="tab, positive")
    lab[0]["channels"][0]["max_current_a"] = 5.0
    lab = [i for i in lab if i["name"] != "logger1"]
    del lab[0]["channels"][0]["thermocouple"]
    lab.append({"name": "smu2", "driver": "keithley2450",
                "resource": "TCPIP::127.0.0.1::5027::SOCKET", "channels": [1]})
    second = _write(tmp_path / "lab2.toml", lab)
    code, out, err = _apply(url, second, "--dry-run")
    assert code == 0, out + err
    assert "+ instrument smu2" in out and "+ channel smu2/1" in out
    assert re.search(r"^~ channel smu1/1: .*max_current_a 7\.35 -> 5\.0", out, re.M), out
    assert "- instrument logger1: not in the file" in out
    assert "would change: 2 to add, 1 to update, 1 to remove" in out
    assert _query(url, _state) == before
    code, out, _ = _apply(url, second)
    assert code == 0 and "applied: 2 to add, 1 to update, 1 to remove" in out
    after = _query(url, _state)
    assert set(after["instruments"]) == {"smu1", "eis1", "chamber1", "smu2"}
    assert after["channels"]["smu1/1"]["max_current_a"] == 5.0
    assert "thermocouple" not in after["channels"]["smu1/1"]["aux"]


async def _start_run(s: Any, channel: str = "smu1/1") -> m.Run:
    return await create_run(s, RunCreate(channel=channel, cell_serial="A-001",
                                         protocol=PROTOCOL), actor="test")


def test_active_run_refuses_removal_and_rewiring_naming_it(tmp_path: Path, url: str) -> None:
    assert _apply(url, _write(tmp_path / "lab.toml", _lab()))[0] == 0
    run = _query(url, _start_run)
    # The run keeps the wiring it was created with.
    snapshot = _query(url, lambda s: _run_wiring(s, run.id))
    assert snapshot["thermocouple"] == {"logger": "logger1", "channel": 101, "type": "K",
                                        "placement": "can side"}
    before = _query(url, _state)
    without_smu = _write(tmp_path / "no_smu.toml", [i for i in _lab() if i["name"] != "smu1"])
    code, out, err = _apply(url, without_smu)
    assert code == 2, out + err
    assert "no_smu.toml" in err and "instrument 'smu1'" in err and f"run {run.id}" in err
    rewired = _write(tmp_path / "rewired.toml", _lab(placement="tab, positive"))
    code, out, err = _apply(url, rewired)
    assert code == 2
    assert "instrument 'smu1' (instruments[0]), field 'channels[0]'" in err
    assert f"run {run.id}" in err and "wiring" in err
    moved = _write(tmp_path / "moved.toml", _lab("TCPIP::10.0.0.9::5025::SOCKET"))
    code, _, err = _apply(url, moved)
    assert code == 2 and f"run {run.id}" in err and "resource" in err
    assert _query(url, _state) == before  # nothing changed by any refused apply

    _query(url, lambda s: _end_run(s, run.id))
    code, out, err = _apply(url, without_smu)
    assert code == 0, out + err
    assert "- instrument smu1: not in the file; kept for the runs that used it" in out
    state = _query(url, _state)
    assert state["instruments"]["smu1"][3] is False
    assert state["channels"]["smu1/1"]["enabled"] is False
    # Its history stays; new runs cannot use it.
    with pytest.raises(Exception, match="disabled or removed"):
        _query(url, _start_run)
    assert _query(url, lambda s: _run_wiring(s, run.id)) == snapshot
    # Back in the file, it is enabled again.
    assert _apply(url, _write(tmp_path / "lab.toml", _lab()))[0] == 0
    assert _query(url, _state)["channels"]["smu1/1"]["enabled"] is True


async def _run_wiring(s: Any, run_id: int) -> Any:
    run = await s.get(m.Run, run_id)
    return run.wiring


async def _end_run(s: Any, run_id: int) -> None:
    run = await s.get(m.Run, run_id)
    run.state = m.RunState.completed.value


# -- errors name file, entry, field and line -----------------------------------------------


def test_wiring_errors_name_file_entry_field_and_line(tmp_path: Path, url: str) -> None:
    lab = _lab(impedance="eis9")
    lab[0]["channels"][0]["thermocouple"]["channel"] = 105
    lab[0]["channels"][0]["chamber"] = "logger1"
    path = _write(tmp_path / "bad.toml", lab)
    lines = path.read_text().splitlines()
    channel_line = next(n for n, line in enumerate(lines, 1) if "smu1/1" in line)
    code, out, err = _apply(url, path)
    assert code == 2 and "Traceback" not in err
    assert err.count(f"line {channel_line}: instrument 'smu1' (instruments[0])") == 3, err
    assert "field 'channels[0].impedance': no instrument 'eis9'" in err
    assert "field 'channels[0].thermocouple.channel': logger 'logger1' scans channels " \
           "[101, 102], not 105" in err
    assert "field 'channels[0].chamber': instrument 'logger1' (driver 'keysight_daq970a') " \
           "is not a climate chamber" in err
    assert str(path) in err
    assert _query(url, _state)["instruments"] == {}


def test_unknown_cell_and_schema_errors_name_the_line(tmp_path: Path, url: str) -> None:
    path = _write(tmp_path / "nocell.toml", _lab(), cells=[])
    code, _, err = _apply(url, path)
    assert code == 2
    assert re.search(r"line \d+: instrument 'smu1' \(instruments\[0\]\), field "
                     r"'channels\[0\]\.cell': no cell 'A-001'", err), err
    yaml_path = tmp_path / "lab.yaml"
    yaml_path.write_text("instruments:\n  - name: smu1\n    driver: keithley2450\n"
                         "    resource: TCPIP::host::70000::SOCKET\n")
    code, _, err = _apply(url, yaml_path)
    assert code == 2
    assert "line 4: instrument 'smu1' (instruments[0]), field 'resource'" in err, err


# -- the API ---------------------------------------------------------------------------------


@pytest.fixture
async def api(url: str) -> AsyncIterator[tuple[httpx.AsyncClient, str, str]]:
    engine = create_engine(url)
    async with session_scope(sessionmaker(engine)) as s:
        admin = await create_token(s, "t-admin", "admin")
    await engine.dispose()
    application = create_app(Settings(database_url=url))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c, admin, url


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_api_applies_the_same_document(api: Any, tmp_path: Path) -> None:
    c, admin, url = api
    doc = {"instruments": _lab(), "cells": [CELL]}
    r = await c.put("/api/v1/instruments", params={"dry_run": "true"}, json=doc,
                    headers=_auth(admin))
    assert r.status_code == 200, r.text
    assert r.json()["dry_run"] is True and r.json()["instruments"] == []
    assert {"action": "add", "kind": "cell", "name": "A-001"}.items() <= \
        r.json()["changes"][0].items()
    r = await c.put("/api/v1/instruments", json=doc, headers=_auth(admin))
    assert r.status_code == 200, r.text
    assert r.json()["summary"] == "6 to add"  # cell, 4 instruments, 1 channel
    engine = create_engine(url)
    async with session_scope(sessionmaker(engine)) as s:
        state = await _state(s)
        run = await _start_run(s)
    await engine.dispose()
    # The file and the API build the same database.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    path = _write(tmp_path / "lab.toml", _lab())
    await asyncio.to_thread(upgrade, other)
    assert (await asyncio.to_thread(_apply, other, path))[0] == 0
    assert await asyncio.to_thread(_query, other, _state) == state
    bad = {"instruments": [i for i in _lab() if i["name"] != "smu1"], "cells": [CELL]}
    r = await c.put("/api/v1/instruments", json=bad, headers=_auth(admin))
    assert r.status_code == 409 and f"run {run.id}" in r.json()["detail"]
    r = await c.put("/api/v1/instruments", json={"instruments": _lab(impedance="nope")},
                    headers=_auth(admin))
    assert r.status_code == 422
    assert "field 'channels[0].impedance': no instrument 'nope'" in r.json()["detail"]


async def test_api_refuses_changes_when_a_file_configures_the_lab(url: str,
                                                                   tmp_path: Path) -> None:
    engine = create_engine(url)
    async with session_scope(sessionmaker(engine)) as s:
        admin = await create_token(s, "t-admin", "admin")
    await engine.dispose()
    lab_file = tmp_path / "lab.toml"
    application = create_app(Settings(database_url=url, instruments_file=lab_file))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            for body in ({"instruments": _lab(), "cells": [CELL]}, _lab()[1]):
                r = await c.put("/api/v1/instruments", json=body, headers=_auth(admin))
                assert r.status_code == 409, r.text
                assert str(lab_file) in r.json()["detail"]
                assert "source of truth" in r.json()["detail"]
            r = await c.get("/api/v1/instruments", headers=_auth(admin))
            assert r.status_code == 200 and r.json() == []


async def test_hioki_configured_through_the_api_opens_with_its_framing(api: Any) -> None:
    """No transport options in the request: the engine opens the meter CR+LF framed."""
    c, admin, url = api
    sim = HiokiBT4560Sim(CellBank("nmc811", n=1, soc=0.5, seed=1), clock=ManualClock(), seed=5)
    server = SimServer.pty(sim, **CRLF)
    wire = bytearray()
    split = server._split_lines

    def recording(buffer: bytearray) -> list[str]:
        before = bytes(buffer)
        found = split(buffer)
        wire.extend(before[: len(before) - len(buffer)])
        return found

    server._split_lines = recording  # type: ignore[method-assign]
    with server:
        body = {"name": "eis1", "driver": "hioki_bt4560", "resource": server.resource}
        r = await c.put("/api/v1/instruments", json=body, headers=_auth(admin))
        assert r.status_code == 200, r.text
        assert r.json()["options"] == {}
        engine = create_engine(url)
        node = AcquisitionNode(engine, EngineClock(1.0))
        try:
            await node.open_all()  # what the engine does at start: open, then make safe
            (inst,) = node.instruments.values()
            meter = inst.driver
            assert (meter.transport.read_termination, meter.transport.write_termination) == (
                "\r\n", "\r\n")
            idn = await inst.worker.call(lambda: meter.idn)
            assert idn.startswith("HIOKI,BT4560,")
            await inst.worker.call(meter.close)
            inst.worker.shutdown()
        finally:
            await engine.dispose()
        commands = bytes(wire).split(b"\n")[:-1]
        assert commands and all(cmd.endswith(b"\r") for cmd in commands), wire


# -- labdaq serve applies the configured file --------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[str], list[str]]]:
    hioki = SimServer.pty(HiokiBT4560Sim(CellBank("nmc811", n=1, soc=0.5, seed=1), seed=5),
                          **CRLF)
    with hioki:
        lab = _write(tmp_path / "lab.toml", [
            {"name": "eis1", "driver": "hioki_bt4560", "resource": hioki.resource,
             "channels": []}], cells=[])
        port = free_port()
        env = {**__import__("os").environ, "LABDAQ_INSTRUMENTS_FILE": str(lab),
               "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [*CLI, "serve", "--data-dir", str(tmp_path / "data"), "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        out: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, ""):
                out.append(line)

        threading.Thread(target=read, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{port}", lab, proc, out
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.timeout(SERVICE_TEST_TIMEOUT_S)
def test_serve_applies_the_instruments_file_at_start(served: Any, tmp_path: Path) -> None:
    base, lab, proc, out = served
    wait_healthy(base, proc, lambda: "".join(out))
    assert any(f"instruments file {lab} applied: 1 to add" in line for line in out), out
    url = f"sqlite:///{(tmp_path / 'data' / 'labdaq.db').resolve()}"
    state = _query(url, _state)
    assert list(state["instruments"]) == ["eis1"]
    token = _query(url, lambda s: create_token(s, "t-admin", "admin"))
    r = httpx.put(f"{base}/api/v1/instruments", headers=_auth(token), timeout=120,
                  json={"name": "smu9", "driver": "keithley2450",
                        "resource": "TCPIP::127.0.0.1::5025::SOCKET"})
    assert r.status_code == 409 and str(lab) in r.json()["detail"]


def test_errors_in_channel_tables_name_their_line(tmp_path: Path, url: str) -> None:
    """`[[instruments.channels]]` tables, as docs/lab-setup.md writes them."""
    path = tmp_path / "lab.toml"
    path.write_text(
        '[[instruments]]\nname = "smu1"\ndriver = "keithley2450"\n'
        'resource = "TCPIP::10.0.0.5::5025::SOCKET"\n\n'
        '[[instruments.channels]]\nindex = 1\n\n'
        '[[instruments.channels]]\nindex = 2\nimpedance = "eis1"\n'
        'thermocouple = { logger = "smu1", channel = 101 }\n')
    code, _, err = _apply(url, path)
    assert code == 2
    assert "line 11: instrument 'smu1' (instruments[0]), field 'channels[1].impedance': " \
           "no instrument 'eis1'" in err, err
    assert "line 12: instrument 'smu1' (instruments[0]), field " \
           "'channels[1].thermocouple.logger': instrument 'smu1' (driver 'keithley2450') " \
           "is not a temperature logger" in err, err


def test_a_run_without_a_cell_uses_the_channels_default_cell(tmp_path: Path, url: str) -> None:
    lab = _lab()
    lab.append({"name": "smu2", "driver": "keithley2450",
                "resource": "TCPIP::127.0.0.1::5027::SOCKET", "channels": [1]})
    assert _apply(url, _write(tmp_path / "lab.toml", lab))[0] == 0

    async def start(s: Any, channel: str) -> tuple[str, Any]:
        run = await create_run(s, RunCreate(channel=channel, protocol=PROTOCOL), actor="test")
        cell = await s.get(m.Cell, run.cell_id)
        return cell.serial, run.wiring

    serial, wiring = _query(url, lambda s: start(s, "smu1/1"))
    assert serial == "A-001" and wiring["impedance"] == "eis1"
    with pytest.raises(Exception, match="channel smu2/1 has no default cell"):
        _query(url, lambda s: start(s, "smu2/1"))


def test_cells_table_matches_the_run_requests_cell() -> None:
    from labdaq.instruments_config import CellConfig
    from labdaq.runs import CellIn

    assert set(CellConfig.model_fields) == set(CellIn.model_fields)
    for name, field in CellIn.model_fields.items():
        assert CellConfig.model_fields[name].metadata == field.metadata, name
        assert CellConfig.model_fields[name].default == field.default, name
    with pytest.raises(ValueError, match="discharge_cutoff_v must be below"):
        CellConfig(**{**CELL, "discharge_cutoff_v": 4.3})
