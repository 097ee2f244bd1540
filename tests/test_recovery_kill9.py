"""kill -9 of the acquisition engine mid-step, then a restart: the run resumes (or is
marked interrupted when the gap is too long), with real processes all the way.

The simulated lab (``labdaq sim``) and the engines (``labdaq engine``) are separate OS
processes, as in production; the lab stays up across the engine restarts, so the cell keeps
its state (and keeps being discharged by the SMU while no engine is there, as a real one
would be). The database is a migrated SQLite file in the engine's data directory; the test
reads it with plain ``sqlite3`` (WAL lets it read while the engine writes).

What "no committed sample lost" means here: the rows committed when the engine died are
read after the SIGKILL (nothing can be committed after it) and compared, column by
column, with the same rows at the end. Rows the dead engine had measured but not yet
committed are gone with its memory; the restarted engine numbers its samples after the
last committed one, so seq stays 1..N.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from labdaq.cli import _register_sim_lab
from labdaq.runs import RunCreate, create_run
from labdaq.storage.db import create_engine, session_scope, sessionmaker, upgrade
from tests.sim_idle import make_idle_safe

# The kill -9 campaign's short form: real processes started, killed and restarted.
# Each wait below is a hang guard, not a timing check: on two shared cores a restart and
# a claim can take minutes. A test may wait on several.
HANG_S = 240.0
pytestmark = pytest.mark.slow  # 900 s each (tests/conftest.py)

SPEED = 200.0  # simulated seconds per wall second, the same for the lab and the engines
SOC0 = 0.4  # a C/2 discharge from 40 % takes ~45 min simulated, ~14 s of wall time
CHANNEL = "smu1/1"
# Columns compared before/after the restart (everything the engine writes for a sample).
SAMPLE_COLS = (
    "seq",
    "t_s",
    "ts_utc",
    "step_index",
    "cycle_index",
    "voltage_v",
    "current_a",
    "temperature_c",
    "step_capacity_ah",
    "step_energy_wh",
    "flags",
)
FLAG_RESUMED = 4  # labdaq.engine.group.FLAG_RESUMED (not imported: keep to the public rows)

# One long constant-current discharge at C/2 to the cell's cut-off, then a short rest, so the
# run has a step to be killed in and a step after it.
DISCHARGE_DOC: dict[str, Any] = {
    "schema_version": 1,
    "name": "kill9_discharge",
    "steps": [
        {"step": "cc", "rate_c": -0.5, "until": {"voltage_v": "discharge_cutoff"}},
        {"step": "rest", "until": {"duration_s": 120}},
    ],
}


@dataclass
class Lab:
    """A running ``labdaq sim`` process, registered in a fresh SQLite database."""

    proc: subprocess.Popen[bytes]
    desc: dict[str, Any]
    data_dir: Path
    db_path: Path
    url: str
    smu_port: int
    logs: Path


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM (the engine then turns outputs off), SIGKILL if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _env(**extra: str) -> dict[str, str]:
    """The child processes' environment: ours plus ``extra``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    # The engine must use the data dir's SQLite file, whatever the developer's shell says.
    env.pop("LABDAQ_DATABASE_URL", None)
    env.pop("LABDAQ_CONFIG", None)
    return env


def _wait(pred: Callable[[], bool], timeout_s: float, what: str, *procs: Any) -> None:
    """Poll ``pred``; fail early (with the reason) if a process we rely on has died."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        for p in procs:
            assert p.poll() is None, f"{what}: process {p.args[3]} exited with {p.returncode}"
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def _db(lab: Lab) -> sqlite3.Connection:
    # Autocommit: every SELECT sees the engine's latest commit.
    return sqlite3.connect(lab.db_path, isolation_level=None, timeout=10)


def _query(lab: Lab, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """One query on a fresh connection."""
    con = _db(lab)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def _scpi(port: int, command: str) -> str:
    """One query to the simulated SMU over its own TCP port (it serves many clients)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(command.encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(4096)
            assert chunk, f"simulated SMU closed the connection on {command!r}"
            buf += chunk
    return buf.decode().strip()


@contextmanager
def _lab(tmp_path: Path, speed: float = SPEED,
         sim_args: tuple[str, ...] = ("--soc", str(SOC0), "--watchdog", "0")) -> Iterator[Lab]:
    """Start ``labdaq sim`` and register its lab in a fresh SQLite database. By default
    no watchdog: whatever turns the SMU's output off is the engine's doing."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db_path = data_dir / "labdaq.db"
    url = f"sqlite:///{db_path}"
    upgrade(url)
    desc_path = tmp_path / "simlab.json"
    logs = tmp_path / "logs"
    logs.mkdir()
    with open(logs / "sim.log", "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "labdaq.cli", "sim",
                "--speed", str(speed),
                *sim_args,
                "--describe", str(desc_path),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,  # no stray ./labdaq.toml
            env=_env(),
            start_new_session=True,
        )
    try:
        _wait(desc_path.exists, HANG_S, "the simulated lab to describe itself", proc)
        desc = json.loads(desc_path.read_text())
        make_idle_safe(desc)  # until an engine opens it (tests/sim_idle.py)
        asyncio.run(_register_sim_lab(url, desc))
        smu = next(i for i in desc["instruments"] if i["name"] == "smu1")
        port = int(smu["resource"].split("::")[2])
        yield Lab(proc, desc, data_dir, db_path, url, port, logs)
    finally:
        _stop(proc)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """A simulated lab process for one test, stopped afterwards."""
    with _lab(tmp_path) as lab:
        yield lab


def _start_engine(lab: Lab, name: str, max_resume_gap_s: float) -> subprocess.Popen[bytes]:
    """``labdaq engine`` on the lab's data dir; its output goes to ``logs/<name>.log``."""
    with open(lab.logs / f"{name}.log", "wb") as out:
        return subprocess.Popen(
            [
                sys.executable, "-m", "labdaq.cli", "engine",
                "--speed", str(SPEED),
                "--data-dir", str(lab.data_dir),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=lab.data_dir.parent,
            env=_env(
                LABDAQ_MAX_RESUME_GAP_S=str(max_resume_gap_s),
                LABDAQ_ENGINE_POLL_S="0.2",
            ),
            start_new_session=True,
        )


def _create_run(lab: Lab) -> int:
    """Queue the discharge on the SMU channel, as the API would (labdaq.runs.create_run)."""
    cell = lab.desc["instruments"][0]["channels"][0]["cell"]["serial"]

    async def create() -> int:
        engine = create_engine(lab.url)
        try:
            async with session_scope(sessionmaker(engine)) as s:
                run = await create_run(
                    s,
                    RunCreate(
                        channel=CHANNEL,
                        cell_serial=cell,
                        protocol_document=DISCHARGE_DOC,
                        sample_period_s=1.0,
                    ),
                    actor="test",
                )
                await s.flush()
                return int(run.id)
        finally:
            await engine.dispose()

    return asyncio.run(create())


def _samples(lab: Lab, run_id: int) -> list[tuple[Any, ...]]:
    """Every stored sample of the run (SAMPLE_COLS), by seq."""
    return _query(
        lab,
        f"SELECT {', '.join(SAMPLE_COLS)} FROM samples WHERE run_id = ? ORDER BY seq",
        run_id,
    )


def _run_row(lab: Lab, run_id: int) -> dict[str, Any]:
    """The runs row as a dict (JSON columns still as text)."""
    con = _db(lab)
    con.row_factory = sqlite3.Row
    try:
        row = con.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
    finally:
        con.close()
    return dict(row)


def _state(lab: Lab, run_id: int) -> str:
    """The run's state as the database has it now."""
    return str(_query(lab, "SELECT state FROM runs WHERE id = ?", run_id)[0][0])


def _interruptions(lab: Lab, run_id: int) -> list[tuple[str, dict[str, Any]]]:
    """(message, data) of the run's interruption events, oldest first."""
    rows = _query(
        lab,
        "SELECT message, data FROM events WHERE run_id = ? AND kind = 'interruption' "
        "ORDER BY id",
        run_id,
    )
    return [(msg, json.loads(data) if isinstance(data, str) else data) for msg, data in rows]


def _run_and_kill(lab: Lab, run_id: int, min_samples: int) -> list[tuple[Any, ...]]:
    """Start an engine, let ``min_samples`` samples be committed, SIGKILL it mid-step.

    Returns the rows committed at the moment of death (read after it: nothing more can be
    committed by then).
    """
    engine = _start_engine(lab, "engine1", max_resume_gap_s=600)

    def ready() -> bool:
        ((n, position),) = _query(
            lab,
            "SELECT (SELECT count(*) FROM samples WHERE run_id = ?), position FROM runs "
            "WHERE id = ?",
            run_id,
            run_id,
        )
        return n >= min_samples and position is not None

    try:
        _wait(ready, HANG_S, f"{min_samples} committed samples", engine, lab.proc)
        children = _children(engine.pid)  # its sample writer
        assert children, "the engine should run its sample writer in a child process"
        os.kill(engine.pid, signal.SIGKILL)
        engine.wait(10)
        assert engine.returncode == -signal.SIGKILL
        # The writer child exits when its pipe breaks; a commit it had in flight may
        # still land, so "committed at the moment of death" is read once it is gone.
        _wait(lambda: not any(_alive(c) for c in children), HANG_S, "the writer child to exit")
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
    committed = _samples(lab, run_id)
    # The position is committed with the samples it counts: it is the last one's.
    position = json.loads(_run_row(lab, run_id)["position"])
    assert position["seq"] == committed[-1][0]
    assert position["t_s"] == committed[-1][1]
    assert position["step_cap_ah"] == pytest.approx(abs(committed[-1][8]), abs=1e-12)
    # Killed mid-step: the run is still 'running' in the database, in its first step, and
    # no step has been recorded as finished.
    assert _state(lab, run_id) == "running"
    assert _query(lab, "SELECT count(*) FROM steps WHERE run_id = ?", run_id)[0][0] == 0
    assert {r[3] for r in committed} == {0}, "the kill was not in the discharge step"
    # The SMU is still discharging the cell: nobody is there to turn it off.
    assert _scpi(lab.smu_port, ":OUTP?") == "1"
    return committed


def _children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (Linux /proc)."""
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(x) for x in (task / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass  # the process (or one of its threads) exited while being read
    return out


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (one nobody has reaped yet has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        # The process can exit between open() and read(); the kernel then answers ESRCH.
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _assert_contiguous(seq: np.ndarray) -> None:
    """seq is exactly 1..N: nothing lost, nothing duplicated."""
    assert seq.size > 0 and seq[0] == 1, f"first seq {seq[:1]}"
    bad = np.flatnonzero(np.diff(seq) != 1)
    assert bad.size == 0, f"seq not contiguous at {[(seq[b], seq[b + 1]) for b in bad[:5]]}"


@dataclass
class Resumed:
    """What the kill -9 / restart scenario left in the database, read after it ended."""

    run: dict[str, Any]
    committed: list[tuple[Any, ...]]  # rows committed when the first engine died
    position_at_kill: dict[str, Any]  # runs.position as the dead engine last saved it
    rows: list[tuple[Any, ...]]  # every sample at the end
    steps: list[tuple[Any, ...]]
    cycles: list[tuple[Any, ...]]
    interruptions: list[tuple[str, dict[str, Any]]]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> Resumed:
    """One C/2 discharge, its engine SIGKILLed mid-step and restarted at once; the run is
    left to complete. Shared by the tests below (the scenario takes ~15 s)."""
    with _lab(tmp_path_factory.mktemp("kill9_resume")) as lab:
        run_id = _create_run(lab)
        committed = _run_and_kill(lab, run_id, min_samples=600)
        # Then off, as a cycler's watchdog would turn it after a while: how long the
        # restart takes on a loaded machine must not decide whether the cell is empty
        # (0 V, a safety abort) when the run resumes.
        assert _scpi(lab.smu_port, ":OUTP 0;:OUTP?") == "0"
        position = _run_row(lab, run_id)["position"]
        # A gap rule generous enough for the engine's start-up (a few wall seconds are
        # several hundred simulated ones at this speed): this scenario is about resuming.
        engine = _start_engine(lab, "engine2", max_resume_gap_s=1e6)
        try:
            _wait(
                lambda: _state(lab, run_id) not in ("queued", "running", "paused"),
                HANG_S,
                "the resumed run to end",
                engine,
                lab.proc,
            )
        finally:
            _stop(engine)
        return Resumed(
            run=_run_row(lab, run_id),
            committed=committed,
            position_at_kill=json.loads(position) if isinstance(position, str) else position,
            rows=_samples(lab, run_id),
            steps=_query(
                lab,
                "SELECT step_number, step_index, cycle_index, kind, start_t_s, end_t_s, "
                "end_reason, capacity_ah FROM steps WHERE run_id = ? ORDER BY step_number",
                run_id,
            ),
            cycles=_query(
                lab,
                "SELECT cycle_index, discharge_capacity_ah, charge_capacity_ah FROM cycles "
                "WHERE run_id = ? ORDER BY cycle_index",
                run_id,
            ),
            interruptions=_interruptions(lab, run_id),
        )


def test_kill9_mid_step_resumes_with_contiguous_samples(resumed: Resumed) -> None:
    """SIGKILL in the middle of a C/2 discharge, restart at once: the run resumes in its
    step and completes; seq is 1..N; every row committed before the kill is unchanged; an
    interruption event records the gap; the step's capacity carries on from where it was."""
    run, committed, rows = resumed.run, resumed.committed, resumed.rows
    n0, last0 = len(committed), committed[-1]
    assert [r[0] for r in committed] == list(range(1, n0 + 1))
    assert run["state"] == "completed", (run["state"], run["end_reason"])

    a = {c: np.array([r[k] for r in rows], dtype=float) for k, c in enumerate(SAMPLE_COLS)}
    seq = a["seq"].astype(np.int64)
    _assert_contiguous(seq)
    assert run["last_seq"] == seq[-1]
    assert seq[-1] > n0 + 100, "too few samples after the restart to show it resumed"
    # Committed rows are untouched, column by column.
    assert rows[:n0] == committed

    # The gap: one interruption event, its bounds those of the committed data, and the
    # first sample after it carries on from there, flagged as resumed.
    ((msg, data),) = resumed.interruptions
    assert "resumed" in msg
    assert data["last_seq"] == n0
    assert data["samples_committed"] == n0
    assert data["from_t_s"] == pytest.approx(last0[1])
    gap_s = float(data["gap_s"])
    assert gap_s > 0
    assert data["to_t_s"] == pytest.approx(last0[1] + gap_s)
    first = rows[n0]
    assert first[0] == n0 + 1
    assert int(first[10]) & FLAG_RESUMED
    assert first[1] >= data["to_t_s"] - 1e-6
    # Soon after the decision (programming the SMU takes a few commands; 2 wall seconds
    # leaves room for a loaded machine).
    assert first[1] - data["to_t_s"] < 2.0 * SPEED
    assert first[3] == 0, "resumed in another step"
    # The step's capacity continues from the last committed value, not from zero...
    assert first[8] == pytest.approx(last0[8], abs=1e-9)
    # ... and keeps growing through the whole step: never reset to zero by the restart.
    cap = np.abs(a["step_capacity_ah"][a["step_index"] == 0])
    assert (np.diff(cap) >= -1e-12).all()

    # Steps and cycle: the discharge ended on its voltage, then the rest ran; one cycle.
    steps = resumed.steps
    assert [(s[0], s[1], s[2], s[3]) for s in steps] == [(1, 0, 1, "cc"), (2, 1, 1, "rest")]
    _, _, _, _, _, end_s, reason, cap_ah = steps[0]
    assert reason.startswith("voltage"), reason
    assert set(np.unique(a["step_index"])) == {0, 1}
    assert set(np.unique(a["cycle_index"])) == {1}
    # The constant current times the time the step was under an engine (from the run's
    # start to the last committed sample, then from the resume to the step's end; the gap
    # left out) is what the engine should have counted. A few per cent: the SMU is being
    # programmed for the first simulated seconds after the start and after the resume (no
    # current yet); counting the gap would be ~15 % off, restarting from zero ~20 %.
    plan = json.loads(run["plan"]) if isinstance(run["plan"], str) else run["plan"]
    i_a = abs(float(plan["program"][0]["current_a"]))
    measured_s = last0[1] + (end_s - data["to_t_s"])
    expected_ah = i_a * measured_s / 3600
    assert abs(cap_ah) == pytest.approx(expected_ah, rel=0.05), (cap_ah, expected_ah, gap_s)
    # And the stored samples integrate to the same, the gap left out.
    dis = a["step_index"] == 0
    t, i = a["t_s"][dis], a["current_a"][dis]
    before = np.arange(t.size) < n0
    q_ah = -(np.trapezoid(i[before], t[before]) + np.trapezoid(i[~before], t[~before])) / 3600
    assert q_ah == pytest.approx(abs(cap_ah), rel=0.01)
    assert abs(a["step_capacity_ah"][dis][-1]) == pytest.approx(abs(cap_ah), rel=0.01)
    # Sample times are monotonic, and the only jump is the gap.
    dt = np.diff(a["t_s"])
    assert (dt > 0).all()
    assert int(np.argmax(dt)) == n0 - 1 and dt[n0 - 1] >= gap_s

    ((cycle_index, dis_ah, chg_ah),) = resumed.cycles
    assert cycle_index == 1
    assert chg_ah == pytest.approx(0.0, abs=1e-9)
    assert math.isfinite(dis_ah)
    # Before the kill the engine kept the step and cycle totals equal (one discharging
    # step): the position it saved says so.
    pos = resumed.position_at_kill
    assert pos["step_cap_ah"] == pytest.approx(pos["cycle"]["discharge_ah"], rel=1e-9), pos
    # Loose here; the exact relation is test_kill9_cycle_totals_agree_with_steps_after_resume.
    assert dis_ah == pytest.approx(sum(abs(s[7]) for s in steps), rel=0.1)


def test_kill9_step_row_brackets_its_samples(resumed: Resumed) -> None:
    """A steps row lies on the run's timeline: the samples of the step fall between its
    start_t_s and end_t_s, also for the step a kill -9 interrupted.

    (Before the fix the row said the step began gap_s later than its first sample, so a
    query of the step's samples by its time bounds missed everything before the kill.)
    """
    rows = resumed.rows
    t = np.array([r[1] for r in rows if r[3] == 0], float)
    _, _, _, _, start_s, end_s, _, _ = resumed.steps[0]
    assert start_s <= t.min() + 1e-6, (start_s, t.min())
    assert end_s >= t.max() - 1e-6, (end_s, t.max())


def test_kill9_cycle_totals_agree_with_steps_after_resume(resumed: Resumed) -> None:
    """The cycle's discharge capacity is the sum of its steps' capacities (one discharge
    step and a rest here), to float precision, also across a kill -9 and resume.

    Without a restart the engine integrates both from the same trapezoids (the position
    the dead engine saved shows them equal). The position and the last committed sample
    are captured at different moments, so resume starts from the position and integrates
    the samples committed after it (before that fix the cycle was off by 1.3 %).
    """
    ((_, dis_ah, _),) = resumed.cycles
    steps_ah = sum(abs(s[7]) for s in resumed.steps)
    assert dis_ah == pytest.approx(steps_ah, rel=1e-6), (dis_ah, steps_ah)


def test_kill9_gap_longer_than_limit_marks_run_interrupted(lab: Lab) -> None:
    """SIGKILL mid-step; the restarted engine finds the gap longer than max_resume_gap_s:
    the run is marked interrupted with the reason, the SMU's output is off, and the
    committed samples are kept as they were."""
    run_id = _create_run(lab)
    committed = _run_and_kill(lab, run_id, min_samples=200)
    limit_s = 1.0  # wall seconds, whatever the clock's speed
    # The engine is down: the gap only grows from here. Not a synchronisation: the gap
    # only has to be at least this long (load lengthens it).
    time.sleep(2 * limit_s)
    engine = _start_engine(lab, "engine2", max_resume_gap_s=limit_s)
    try:
        _wait(
            lambda: _state(lab, run_id) != "running",
            HANG_S,
            "the restarted engine to judge the run",
            engine,
            lab.proc,
        )
        run = _run_row(lab, run_id)
        assert run["state"] == "interrupted", (run["state"], run["end_reason"])
        assert f"more than the {limit_s:.0f} s" in (run["end_reason"] or "")
        assert run["ended_at"] is not None
        # The engine left the output off (the simulated SMU has no watchdog here).
        assert _scpi(lab.smu_port, ":OUTP?") == "0"
        # It does not pick the run up again: a run queued afterwards on the same channel
        # is claimed and acquires (the scheduler has gone round after judging the first),
        # and the first has no new samples and is still interrupted.
        later = _create_run(lab)
        _wait(lambda: len(_samples(lab, later)) >= 5, HANG_S,
              "the engine to claim and sample a later run", engine, lab.proc)
        assert _samples(lab, run_id) == committed
        assert _state(lab, run_id) == "interrupted"
        assert engine.poll() is None, "the engine should keep running"
    finally:
        _stop(engine)
    (msg, data), = _interruptions(lab, run_id)
    assert msg == run["end_reason"]
    assert data["last_seq"] == len(committed) == data["samples_committed"]
    assert data["gap_s"] > limit_s
    assert data["from_t_s"] == pytest.approx(committed[-1][1])
