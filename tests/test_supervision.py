"""`labdaq serve --sim` under attack: kill -9 of the engine, its sample writer and the
simulated lab. The API answers throughout, the dead child is restarted, and the run goes
on by itself with contiguous samples and every interruption on the record.

All real: `labdaq serve` is a subprocess with its own children (API, engine with its writer
process, simulated lab over TCP), SQLite in a temporary directory. The test finds the
children through /ready (the engine's pid is in its heartbeat) and /proc. It only waits
for conditions (polling with generous timeouts) and asserts outcomes and order, never
durations.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fault_report import lost_and_duplicates, record_fault
from tests.ports import free_port
from tests.service_wait import SERVICE_START_S

# Minutes of simulated lab each: `make test-slow` (run by .ci/run after `make test`).
pytestmark = pytest.mark.slow

SPEED = 100.0
PERIOD_S = 10.0  # simulated: 10 samples per wall second at SPEED
# For each start-up and recovery: a hang guard, as for any service start
# (tests/service_wait.py); a saturated 2-core machine takes minutes.
TIMEOUT_S = SERVICE_START_S
CHANNEL = "cabinet1/1"
FLAG_PAUSED = 2  # labdaq.engine.group flags (not imported: keep to the public rows)
FLAG_RESUMED = 4
# C/20 charge from 50 %: hours of simulated time, minutes of wall time: the run is still
# in its step when the test ends, whatever the machine's load.
CHARGE_DOC: dict[str, Any] = {
    "schema_version": 1,
    "name": "supervision_charge",
    "steps": [{"step": "cc", "rate_c": 0.05, "until": {"duration_s": 100_000,
                                                      "voltage_v": "charge_cutoff"}}],
}


def _wait(pred: Callable[[], Any], what: str, proc: subprocess.Popen[bytes],
          timeout_s: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        assert proc.poll() is None, f"{what}: labdaq serve exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.1)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _child_running(parent: int, marker: list[str]) -> int | None:
    """The pid of ``parent``'s child whose command line contains ``marker`` in order."""
    for pid in _children(parent):
        cmd = _cmdline(pid)
        n = len(marker)
        if any(cmd[k:k + n] == marker for k in range(len(cmd))):
            return pid
    return None


@dataclass
class Poller:
    """GET /health over and over in a thread; every answer (or failure) is kept."""

    base: str
    results: list[tuple[float, int | str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    code: int | str = client.get(f"{self.base}/health").status_code
                except httpx.HTTPError as exc:
                    code = f"{type(exc).__name__}: {exc}"
                self.results.append((time.monotonic(), code))
                self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)

    def answered_since(self, t: float) -> int:
        return sum(1 for at, code in self.results if at > t and code == 200)


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    base: str
    token: str
    data_dir: Path
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, **kw: Any) -> Any:
        r = httpx.get(f"{self.base}{path}", headers=self.headers, timeout=30, **kw)
        r.raise_for_status()
        return r.json()

    def ready(self) -> dict[str, Any] | None:
        try:
            r = httpx.get(f"{self.base}/ready", timeout=30)
        except httpx.HTTPError:
            return None
        body: dict[str, Any] = r.json()
        return body if r.status_code == 200 and body["ready"] else None

    def db(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        con = sqlite3.connect(self.data_dir / "labdaq.db", isolation_level=None, timeout=30)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def last_seq(self, run_id: int) -> int:
        return int(self.db("SELECT coalesce(max(seq), 0) FROM samples WHERE run_id = ?",
                           run_id)[0][0])

    def events(self, run_id: int) -> list[tuple[int, str, str]]:
        return [(i, k, msg) for i, k, msg in self.db(
            "SELECT id, kind, message FROM events WHERE run_id = ? ORDER BY id", run_id)]


@contextmanager
def _serve(tmp_path: Path, speed: float = SPEED, serve_args: tuple[str, ...] = (),
           **settings: str) -> Iterator[Service]:
    """`labdaq serve --sim` at ``speed`` with ``serve_args`` and ``LABDAQ_<KEY>``
    settings, stopped with Ctrl-C after."""
    port = free_port()
    data_dir = tmp_path / "data"
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           **{f"LABDAQ_{k.upper()}": v for k, v in settings.items()}}
    env.pop("LABDAQ_DATABASE_URL", None)
    env.pop("LABDAQ_CONFIG", None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "labdaq.cli", "serve", "--sim", "--speed", str(speed),
             "--port", str(port), "--data-dir", str(data_dir), *serve_args],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )
    try:
        m = _wait(lambda: re.search(r"token \(shown once\): (\S+)",
                                    log.read_text(errors="replace")),
                  "serve to print the demo token", proc, 90)
        svc = Service(proc, f"http://127.0.0.1:{port}", m.group(1), data_dir, log)
        _wait(svc.ready, "GET /ready to answer 200", proc)
        yield svc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    # Quick restarts; a restart count that a few kills in a row never exhaust.
    with _serve(tmp_path, restart_backoff_s="0.5", restart_max="5",
                max_resume_gap_s="600") as svc:
        yield svc


def _start_run(svc: Service) -> int:
    r = httpx.post(f"{svc.base}/api/v1/runs", headers=svc.headers, timeout=30, json={
        "channel": CHANNEL, "cell_serial": "SIM-NMC811-001",
        "protocol_document": CHARGE_DOC, "sample_period_s": PERIOD_S})
    assert r.status_code == 201, r.text
    run_id: int = r.json()["id"]
    _wait(lambda: svc.last_seq(run_id) > 20, "the run to take samples", svc.proc)
    return run_id


def _cabinet_output(svc: Service) -> str:
    """The simulated cabinet's output relay of channel 1, asked over its own TCP port."""
    (resource,) = svc.db("SELECT resource FROM instruments WHERE name = 'cabinet1'")[0]
    port = int(resource.split("::")[2])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"OUTP? (@1)\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(4096)
            assert chunk, "the simulated cabinet closed the connection"
            buf += chunk
    return buf.decode().strip()


def _kill_and_recover(svc: Service, run_id: int, pid: int, what: str,
                      recovered: Callable[[], bool]) -> tuple[int, float]:
    """kill -9 ``pid``; wait until ``recovered`` and the run has new samples. Returns the
    last seq committed before the kill and the seconds until the run took samples again."""
    seq_before = svc.last_seq(run_id)
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    _wait(recovered, f"{what} to be restarted", svc.proc)
    _wait(lambda: svc.last_seq(run_id) > seq_before + 20,
          f"the run to take new samples after the {what} was killed", svc.proc)
    return seq_before, time.monotonic() - t_kill


@pytest.mark.faults
def test_killed_children_are_restarted_and_the_run_goes_on(service: Service) -> None:
    svc = service
    run_id = _start_run(svc)
    poller = Poller(svc.base)
    poller.start()
    try:
        # 1. The engine.
        engine_pid = svc.ready()["engine"]["pid"]  # type: ignore[index]
        kills = [_kill_and_recover(svc, run_id, engine_pid, "engine", lambda: (
            (b := svc.ready()) is not None and b["engine"]["pid"] != engine_pid))]
        # 2. The engine's sample writer: the engine stops for a restart, runs kept.
        engine_pid = svc.ready()["engine"]["pid"]  # type: ignore[index]
        writer_pid = _wait(lambda: _child_running(engine_pid, ["labdaq.engine.writer_process"]),
                           "the writer process", svc.proc)
        kills.append(_kill_and_recover(svc, run_id, writer_pid, "engine (its writer died)",
                                       lambda: ((b := svc.ready()) is not None
                                                and b["engine"]["pid"] != engine_pid)))
        # 3. The simulated lab: restarted on the same ports, the engine reconnects.
        sim_pid = _child_running(svc.proc.pid, ["labdaq.cli", "sim"])
        assert sim_pid is not None
        kills.append(_kill_and_recover(svc, run_id, sim_pid, "simulated lab", lambda: (
            (p := _child_running(svc.proc.pid, ["labdaq.cli", "sim"])) is not None
            and p != sim_pid and svc.ready() is not None)))
        t_last_kill = time.monotonic()
        _wait(lambda: poller.answered_since(t_last_kill) > 5, "a few more /health polls",
              svc.proc)
    finally:
        poller.stop()
    # The API answered every poll, before, between and after the kills.
    failures = [(at, code) for at, code in poller.results if code != 200]
    assert not failures, failures[:5]
    assert len(poller.results) > 10

    run = svc.get(f"/api/v1/runs/{run_id}")
    assert run["state"] == "running", run["end_reason"]
    # Committed samples are contiguous: nothing renumbered, nothing duplicated.
    seqs = [s for (s,) in svc.db("SELECT seq FROM samples WHERE run_id = ? ORDER BY seq",
                                 run_id)]
    lost, dups = lost_and_duplicates(seqs, list(range(1, max(k[0] for k in kills) + 1)))
    record_fault("kill -9 under labdaq serve: engine, its writer, the simulated lab",
                 faults=len(kills), lost=lost, duplicates=dups,
                 runs_resumed=int(run["state"] == "running"), runs=1,
                 missed_periods=run["missed_periods"], recover_s=[k[1] for k in kills])
    assert seqs == list(range(1, len(seqs) + 1))
    # Every death is on the run's record, in order, with the engine's own account of the
    # gap (resumed from the last committed sample, its bounds in the event's data).
    events = svc.events(run_id)
    sup = [msg for _, kind, msg in events if kind == "supervision"]
    exits = [msg for msg in sup if "exited with" in msg]
    assert [m.split(" process")[0] for m in exits] == ["engine", "engine", "simulated lab"], sup
    assert "exited with -9" in exits[0] and "exited with 75" in exits[1]
    assert "exited with -9" in exits[2]
    assert sum("restarted" in msg for msg in sup) == 3
    resumed = svc.db("SELECT message, data FROM events WHERE run_id = ? AND kind = "
                     "'interruption' AND message LIKE '%run resumed after%' ORDER BY id",
                     run_id)
    assert len(resumed) >= 2  # the two engine restarts (the lab's return may add one)
    t_by_seq = dict(svc.db("SELECT seq, t_s FROM samples WHERE run_id = ?", run_id))
    flags_by_seq = dict(svc.db("SELECT seq, flags FROM samples WHERE run_id = ?", run_id))
    for message, data_text in resumed:
        gap = json.loads(data_text)
        # The gap's bounds: from the last committed sample to the first one after it,
        # which says that it is the first after a resume.
        assert gap["from_t_s"] == pytest.approx(t_by_seq[gap["last_seq"]]), message
        assert t_by_seq[gap["last_seq"] + 1] >= gap["to_t_s"] - 1e-6, message
        assert flags_by_seq[gap["last_seq"] + 1] & FLAG_RESUMED, message


def test_engine_that_keeps_dying_is_given_up_with_every_output_off(tmp_path: Path) -> None:
    """Past max restarts the supervisor stops restarting the engine, turns the outputs off
    through the instruments itself and records why on the run; the API stays up and
    /ready says the engine is not there."""
    with _serve(tmp_path, restart_backoff_s="0.5", restart_max="1",
                restart_stable_s="3600") as svc:
        run_id = _start_run(svc)
        assert _cabinet_output(svc) == "1"
        first = svc.ready()["engine"]["pid"]  # type: ignore[index]
        _kill_and_recover(svc, run_id, first, "engine", lambda: (
            (b := svc.ready()) is not None and b["engine"]["pid"] != first))
        assert _cabinet_output(svc) == "1"  # the restarted engine resumed the charge
        os.kill(svc.ready()["engine"]["pid"], signal.SIGKILL)  # type: ignore[index]
        gave_up = _wait(lambda: svc.db(
            "SELECT message, data FROM events WHERE run_id = ? AND kind = 'supervision' "
            "AND severity = 'error'", run_id), "the supervisor to give up", svc.proc)
        (message, _data), = gave_up
        assert message.startswith("engine process died 2 times in a row (last exit -9)")
        assert "cabinet1: outputs off" in message and "smu1: outputs off" in message
        assert _cabinet_output(svc) == "0"
        # The API answers, and says why the service cannot acquire.
        assert httpx.get(f"{svc.base}/health", timeout=30).status_code == 200
        not_ready = _wait(lambda: (r := httpx.get(f"{svc.base}/ready", timeout=30))
                          .status_code == 503 and r.json(), "/ready to say 503", svc.proc)
        assert any(x.startswith("engine: ") for x in not_ready["reasons"]), not_ready
        # Nothing restarts it; the run keeps its state for the next start.
        assert _child_running(svc.proc.pid, ["labdaq.cli", "engine"]) is None
        assert svc.get(f"/api/v1/runs/{run_id}")["state"] == "running"


def test_paused_run_stays_paused_across_an_engine_restart(tmp_path: Path) -> None:
    """A technician's pause survives the engine's death: the restarted engine resumes the
    run paused, output off, until someone resumes it."""
    with _serve(tmp_path, restart_backoff_s="0.5") as svc:
        run_id = _start_run(svc)
        r = httpx.post(f"{svc.base}/api/v1/runs/{run_id}/pause", headers=svc.headers,
                       timeout=30)
        assert r.status_code == 200, r.text
        _wait(lambda: svc.get(f"/api/v1/runs/{run_id}")["state"] == "paused"
              and _cabinet_output(svc) == "0", "the pause to take effect", svc.proc)
        pid = svc.ready()["engine"]["pid"]  # type: ignore[index]
        _kill_and_recover(svc, run_id, pid, "engine", lambda: (
            (b := svc.ready()) is not None and b["engine"]["pid"] != pid))
        assert svc.get(f"/api/v1/runs/{run_id}")["state"] == "paused"
        assert _cabinet_output(svc) == "0"
        (seq0,) = svc.db("SELECT seq FROM samples WHERE run_id = ? AND flags & ? != 0 "
                         "ORDER BY seq DESC LIMIT 1", run_id, FLAG_RESUMED)[0]
        after = svc.db("SELECT flags FROM samples WHERE run_id = ? AND seq >= ?", run_id, seq0)
        assert after and all(f & FLAG_PAUSED for (f,) in after), after
        r = httpx.post(f"{svc.base}/api/v1/runs/{run_id}/resume", headers=svc.headers,
                       timeout=30)
        assert r.status_code == 200, r.text
        _wait(lambda: svc.get(f"/api/v1/runs/{run_id}")["state"] == "running"
              and _cabinet_output(svc) == "1", "the resume to take effect", svc.proc)


def test_sigterm_stops_in_order_and_the_next_start_resumes_the_run(tmp_path: Path) -> None:
    """SIGTERM to `labdaq serve`: it records why on the run, stops its children (the
    engine turns outputs off and saves the position) and exits 0; the run keeps its state,
    and the next `labdaq serve` on the same data directory resumes it."""
    with _serve(tmp_path) as svc:
        run_id = _start_run(svc)
        sim_pid = _child_running(svc.proc.pid, ["labdaq.cli", "sim"])
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(timeout=90) == 0
        assert sim_pid is not None and not Path(f"/proc/{sim_pid}").exists()
        seq_stopped = svc.last_seq(run_id)
        (state,) = svc.db("SELECT state FROM runs WHERE id = ?", run_id)[0]
        assert state == "running"
        stops = [msg for _, kind, msg in svc.events(run_id) if kind == "supervision"]
        assert stops and stops[-1].startswith("service stopping (SIGTERM)")
    with _serve(tmp_path) as svc:
        _wait(lambda: svc.last_seq(run_id) > seq_stopped + 20,
              "the run to go on after the restart", svc.proc)
        seqs = [s for (s,) in svc.db("SELECT seq FROM samples WHERE run_id = ? ORDER BY seq",
                                     run_id)]
        assert seqs == list(range(1, len(seqs) + 1))
        resumed = [msg for _, kind, msg in svc.events(run_id)
                   if kind == "interruption" and "run resumed after" in msg]
        assert resumed, svc.events(run_id)
        assert svc.get(f"/api/v1/runs/{run_id}")["state"] == "running"


API_KILLS = 3


@pytest.mark.faults
def test_killed_api_is_restarted_and_acquisition_never_notices(service: Service) -> None:
    """kill -9 of the API process, three times: `serve` restarts it each time, the engine
    (its own process) keeps the same pid and the run keeps sampling without an
    interruption; every committed sample is still there, once, and each death and restart
    is on the run's record."""
    svc = service
    run_id = _start_run(svc)
    engine_pid = svc.ready()["engine"]["pid"]  # type: ignore[index]
    poller = Poller(svc.base)
    poller.start()
    kills: list[tuple[int, float]] = []
    try:
        for _ in range(API_KILLS):
            api_pid = _wait(lambda: _child_running(svc.proc.pid, ["labdaq.cli", "api"]),
                            "the API process", svc.proc)
            seq_before = svc.last_seq(run_id)
            t_kill = time.monotonic()
            os.kill(api_pid, signal.SIGKILL)
            _wait(lambda old=api_pid: (p := _child_running(svc.proc.pid, ["labdaq.cli", "api"]))
                  is not None and p != old, "the API to be restarted", svc.proc)
            # The old API is gone by now: an answer from here on is the new one's.
            t_new = time.monotonic()
            _wait(lambda t=t_new: poller.answered_since(t) > 0,
                  "the restarted API to answer /health", svc.proc)
            # Acquisition went on meanwhile: new samples through the restarted API.
            _wait(lambda s0=seq_before: svc.get(
                f"/api/v1/runs/{run_id}/samples?after_seq={s0}&limit=50")["seq"][-1:] > [s0 + 5],
                  "new samples through the restarted API", svc.proc)
            kills.append((seq_before, time.monotonic() - t_kill))
    finally:
        poller.stop()
    # The API was down at times (its own process died), and answered again after each.
    assert poller.results[-1][1] == 200, poller.results[-5:]
    ready = svc.ready()
    assert ready is not None and ready["engine"]["pid"] == engine_pid
    run = svc.get(f"/api/v1/runs/{run_id}")
    assert run["state"] == "running", run["end_reason"]
    seqs = [s for (s,) in svc.db("SELECT seq FROM samples WHERE run_id = ? ORDER BY seq",
                                 run_id)]
    lost, dups = lost_and_duplicates(seqs, list(range(1, max(k[0] for k in kills) + 1)))
    record_fault("kill -9 of the API under labdaq serve (3 kills)", faults=len(kills),
                 lost=lost, duplicates=dups, runs_resumed=int(run["state"] == "running"),
                 runs=1, missed_periods=run["missed_periods"],
                 recover_s=[k[1] for k in kills])
    assert seqs == list(range(1, len(seqs) + 1))
    events = svc.events(run_id)
    sup = [msg for _, kind, msg in events if kind == "supervision"]
    assert sum(m.startswith("API process exited with -9") for m in sup) == API_KILLS, sup
    assert sum(m == "API process restarted" for m in sup) == API_KILLS, sup
    # The engine never stopped: no gap to resume from.
    assert not [msg for _, kind, msg in events if kind == "interruption"], events
