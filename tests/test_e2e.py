"""End to end: `labdaq serve --sim` as a user starts it, then HTTP all the way to the
simulated SMU over a real TCP socket, through the engine process, into the database."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from labdaq.sims.lab import make_cell_bank
from tests.ports import free_port
from tests.service_wait import SERVICE_TEST_TIMEOUT_S, wait_healthy

# Requests to the service under test: httpx's 5 s default is a timing check on a
# loaded machine (a POST /runs answered after it in CI); this is a hang guard.
http = httpx.Client(timeout=60.0)

SPEED = 500.0
SOC0 = 0.5
SEED = 1


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[str, str, subprocess.Popen[str]]]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LABDAQ_DATABASE_URL", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "labdaq.cli",
            "serve",
            "--sim",
            "--speed",
            str(SPEED),
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    token = None
    lines: list[str] = []
    # Until the token or the end of its output: a loaded machine's start-up (the
    # migrations alone took 12 s at load 15) is bounded by the test's timeout only.
    while token is None:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"token \(shown once\): (\S+)", line)
        if m:
            token = m.group(1)
    assert token, "serve did not print a token:\n" + "".join(lines)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, proc, lambda: "".join(lines))
    yield base, token, proc
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def reference_discharge_ah(
    spec_name: str, i_a: float, v_max: float, taper_a: float, rest_s: float, v_min: float
) -> float:
    """The same protocol on the same simulated cell, offline with 1 s steps."""
    bank = make_cell_bank(spec_name, 1, SOC0, SEED)
    dt = 1.0
    while True:  # CC-CV: the SMU clamps current at the compliance voltage
        i = min(i_a, float(np.asarray(bank.current_for_voltage(v_max)).ravel()[0]))
        bank.step(np.array([i]), dt)
        if i <= taper_a:
            break
    for _ in range(int(rest_s)):
        bank.step(np.array([0.0]), dt)
    q_ah = 0.0
    while float(np.asarray(bank.voltage_v).ravel()[0]) > v_min:
        bank.step(np.array([-i_a]), dt)
        q_ah += i_a * dt / 3600
    return q_ah


@pytest.mark.timeout(SERVICE_TEST_TIMEOUT_S)  # a hang guard (service start-up)
def test_demo_run_through_http_to_simulated_smu(lab) -> None:
    base, token, proc = lab
    h = {"Authorization": f"Bearer {token}"}
    channels = {c["name"]: c for c in http.get(f"{base}/api/v1/channels", headers=h).json()}
    smu = channels["smu1/1"]
    assert smu["state"] == "idle"
    assert smu["resource"].startswith("TCPIP::127.0.0.1::")
    cap = 4.9  # the nmc811 spec the simulated lab uses
    body = {
        "channel": smu["name"],
        "cell_serial": "SIM-NMC811-001",
        "protocol": {
            "charge_current_a": cap / 2,
            "charge_voltage_v": 4.2,
            "rest_s": 300,
            "discharge_current_a": cap / 2,
            "discharge_cutoff_v": 2.5,
            "cycles": 1,
        },
        "sample_period_s": 10,
    }
    r = http.post(f"{base}/api/v1/runs", json=body, headers=h)
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    # "queue": false: a busy channel is refused (by default the run would be queued).
    busy = http.post(f"{base}/api/v1/runs", json={**body, "queue": False}, headers=h)
    assert busy.status_code == 409
    # Until the run ends: the test's timeout bounds a loaded machine's slower run.
    while True:
        run = http.get(f"{base}/api/v1/runs/{run_id}", headers=h).json()
        state = run["state"]
        if state not in ("queued", "running"):
            break
        time.sleep(0.5)
    assert state == "completed", run["end_reason"]
    cycles = http.get(f"{base}/api/v1/runs/{run_id}/cycles", headers=h).json()
    assert len(cycles) == 1
    expected = reference_discharge_ah("nmc811", cap / 2, 4.2, cap / 20, 300, 2.5)
    got = cycles[0]["discharge_capacity_ah"]
    assert got == pytest.approx(expected, rel=0.02), (got, expected)
    assert cycles[0]["coulombic_efficiency"] > 0.9
    # Every sample is stored, contiguous, and the stored data integrates to the summary.
    samples = http.get(
        f"{base}/api/v1/runs/{run_id}/samples", params={"limit": 100_000}, headers=h
    ).json()
    seq = np.array(samples["seq"])
    assert seq[0] == 1 and np.all(np.diff(seq) == 1)
    assert samples["count"] == run["last_seq"]
    t = np.array(samples["t_s"])
    i = np.array(samples["current_a"])
    dis = np.clip(i, None, 0)
    q_dis = -np.trapezoid(dis, t) / 3600
    assert q_dis == pytest.approx(got, rel=0.01)
    assert proc.poll() is None
