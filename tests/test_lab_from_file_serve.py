"""Done-when (issue 14): a lab set up from its instruments file runs a protocol.

``labdaq sim --write-config lab.toml`` (a simulated lab in its own process, on TCP and a
pty), then ``labdaq instruments apply lab.toml``, then ``labdaq serve`` without ``--sim``:
a run of a protocol with a chamber step and an EIS step on the SMU's channel completes on
the configured instruments, its spectrum is recorded, and its samples carry the
temperatures of the thermocouple the file wires to that cell (the SMU itself measures
none). Everything at 1x, through the processes and the HTTP API a lab uses: slow.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from labdaq.storage.models import SampleFlag
from tests.ports import free_port

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "labdaq.cli"]
PROTOCOL = {
    "schema_version": 1,
    "name": "lab from file",
    "safety": {"max_temperature_c": 60.0},
    "steps": [
        # The chamber already holds room temperature: stable within seconds.
        {"step": "set_temperature", "temperature_c": 25.0, "tolerance_c": 2.0,
         "stable_for_s": 2.0, "timeout_s": 120.0},
        {"step": "rest", "until": {"duration_s": 3.0}},
        {"step": "eis", "start_frequency_hz": 1000.0, "stop_frequency_hz": 100.0,
         "points_per_decade": 2, "amplitude_a": 0.1},
        {"step": "cc", "current_a": 1.0, "until": {"duration_s": 8.0}},
    ],
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABDAQ_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class _Proc:
    """A child process whose output lines are collected by a thread."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=_env())
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, ""):
            self.out.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_line(self, prefix: str, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail(f"no line starting {prefix!r}:\n" + "".join(self.out))
            if line.startswith(prefix):
                return

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def sim_lab(tmp_path: Path) -> Iterator[Path]:
    config = tmp_path / "lab.toml"
    sim = _Proc([*CLI, "sim", "--smus", "1", "--impedance", "1", "--loggers", "1",
                 "--chamber", "--transport", "eis1=pty", "--watchdog", "0",
                 "--write-config", str(config)])
    try:
        sim.wait_line("ready:")
        yield config
    finally:
        sim.stop()


def _wait(pred: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_sim_config_apply_serve_runs_eis_and_chamber_with_logger_temperatures(
        sim_lab: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    applied = subprocess.run([*CLI, "instruments", "apply", str(sim_lab), "--data-dir",
                              str(data)], capture_output=True, text=True, env=_env(),
                             timeout=120)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    token = subprocess.run([*CLI, "token", "create", "--name", "tech", "--role", "technician",
                            "--data-dir", str(data)], capture_output=True, text=True,
                           env=_env(), timeout=60)
    assert token.returncode == 0, token.stderr
    auth = {"Authorization": f"Bearer {token.stdout.strip().splitlines()[-1]}"}
    port = free_port()
    serve = _Proc([*CLI, "serve", "--data-dir", str(data), "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"{base}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(ready, 120, "labdaq serve to be ready:\n" + "".join(serve.out))
        # No cell named: the channel's default cell from the file.
        r = httpx.post(f"{base}/api/v1/runs", headers=auth, timeout=30, json={
            "channel": "smu1/1", "sample_period_s": 0.5, "protocol_document": PROTOCOL})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]

        def ended() -> dict[str, Any] | None:
            run = httpx.get(f"{base}/api/v1/runs/{run_id}", headers=auth, timeout=10).json()
            return run if run["state"] not in ("queued", "running", "paused") else None

        run = _wait(ended, 180, f"run {run_id} to end")
        assert run["state"] == "completed", run
        eis = httpx.get(f"{base}/api/v1/runs/{run_id}/eis", headers=auth, timeout=10).json()
        assert len(eis) == 1 and eis[0]["instrument"] == "eis1"
        page = httpx.get(f"{base}/api/v1/runs/{run_id}/samples", headers=auth,
                         timeout=10).json()
        temps = [t for t in page["temperature_c"] if t is not None]
        # The logger's thermocouple on the SMU's cell: about room temperature, in nearly
        # every sample (the first, taken as the run joined, may precede the first scan).
        assert len(temps) >= len(page["seq"]) - 2 and len(temps) >= 10, page["flags"]
        assert all(20.0 < t < 35.0 for t in temps)
        assert not any(f & int(SampleFlag.TEMP_LOST) for f in page["flags"])
        # Each with its reading's age: a current one is younger than the staleness bound
        # (3 s, the default) unless flagged stale.
        for t, age, f in zip(page["temperature_c"], page["temperature_age_s"],
                             page["flags"], strict=True):
            assert (t is None) == (age is None)
            if age is not None and not f & int(SampleFlag.TEMP_STALE):
                assert 0.0 <= age <= 3.0
    finally:
        serve.stop()
