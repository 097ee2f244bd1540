"""Wall-clock jumps of an hour, forward and back, under the acquisition engine.

The engine (``labdaq engine`` and its writer child) runs under libfaketime with a
timestamp file this test rewrites: the process's wall clock (``time.time()``,
``datetime.now()``) steps by ±1 h while its monotonic and boot clocks run on, as they do
when NTP or someone sets the date (``FAKETIME_DONT_FAKE_MONOTONIC``). The machine's real
clock is never touched. The simulated lab runs on the real clock.

What must hold (docs/architecture.md, "Wall-clock jumps"): a run's samples are numbered 1..N without
a hole; their ``t_s`` (the engine's clock) only grows, whatever the wall clock does;
``ts_utc`` is the wall clock as it was (it jumps with it); a duration step lasts its
duration on the engine's clock; and a run is neither ended nor marked interrupted because
of a jump — also not when the engine is killed and restarted across one, where the gap
it resumes after is measured without the step (labdaq/engine/wallclock.py); and each
jump the running engine sees is a ``clock_jump`` event on the run.

libfaketime is Debian's ``libfaketime`` package, installed with apt-get when missing (as
tests/test_dashboard.py installs chromium); where that cannot run the test skips, under
CI it fails instead. (libfaketime 0.9.10 with ``FAKETIME_DONT_FAKE_MONOTONIC`` makes
``time.sleep`` fail with EINVAL; the engine does not sleep that way while its
instruments answer, so none of them is disconnected here. While one thread reads the
timestamp file, libfaketime answers every other thread with the real time,
wolfcw/libfaketime#452: read on every call (``FAKETIME_NO_CACHE``), a thread descheduled
inside that read on a loaded machine gave the engine real-time readings for rounds on end,
so the file is read once a second.)
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fault_report import lost_and_duplicates, record_fault
from tests.test_kill9_campaign import _create_runs
from tests.test_recovery_kill9 import Lab, _alive, _children, _env, _lab, _query, _stop, _wait

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.timeout(900)]

LIBFAKETIME_GLOB = "/usr/lib/*/faketime/libfaketime.so.1"  # Debian's multiarch path
SPEED = 50.0
PERIOD_S = 1.0
HOUR_S = 3600
# Samples each clock setting must see before the next change: 3 wall seconds at SPEED,
# more than the engine needs to see a new setting (libfaketime re-reads the timestamp file
# once a second, FAKETIME_CACHE_DURATION) and to hold it for two scheduler rounds.
STEP_SAMPLES = 150
WAIT_S = 120.0
REST_S = 600.0  # simulated: 12 wall seconds at SPEED, through the jumps while running
# A rest, then a slow charge that lasts far beyond the test: the rest's end is timed by
# the engine's clock alone, and nothing ends the run but the stop at the end.
JUMP_DOC: dict[str, Any] = {
    "schema_version": 1,
    "name": "wallclock_jumps",
    "steps": [
        {"step": "rest", "until": {"duration_s": REST_S}},
        {"step": "cc", "rate_c": 0.05, "until": {"duration_s": 100_000,
                                                  "voltage_v": "charge_cutoff"}},
    ],
}


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the wall-clock test)")
    pytest.skip(reason)


def _libfaketime() -> Path | None:
    found = sorted(glob.glob(LIBFAKETIME_GLOB))
    return Path(found[0]) if found else None


def _ensure_libfaketime() -> Path:
    if (lib := _libfaketime()) is not None:
        return lib
    if not shutil.which("apt-get") or os.geteuid() != 0:
        _unavailable("libfaketime is missing and apt-get cannot run here")
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(["apt-get", *lock, "install", "-y", "--no-install-recommends",
                           "libfaketime"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:  # a stale package list: update it once, then try again
        subprocess.run(["apt-get", *lock, "update"], check=True, capture_output=True, env=env)
        proc = subprocess.run(["apt-get", *lock, "install", "-y", "--no-install-recommends",
                               "libfaketime"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"apt-get install libfaketime failed:\n{proc.stderr[-2000:]}"
    lib = _libfaketime()
    assert lib is not None, f"libfaketime installed but no {LIBFAKETIME_GLOB}"
    return lib


class Engine:
    """``labdaq engine`` under libfaketime; ``offset`` rewrites its wall clock's offset."""

    def __init__(self, lab: Lab, lib: Path) -> None:
        self.lab = lab
        self.lib = lib
        self.clock_file = lab.data_dir.parent / "faketime"
        self.offset(0)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def offset(self, seconds: int) -> None:
        tmp = self.clock_file.with_suffix(".tmp")
        tmp.write_text(f"{seconds:+d}\n")
        tmp.replace(self.clock_file)  # never half written when the engine reads it

    def start(self) -> subprocess.Popen[bytes]:
        self.starts += 1
        with open(self.lab.logs / f"engine{self.starts}.log", "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "labdaq.cli", "engine", "--speed", str(SPEED),
                 "--data-dir", str(self.lab.data_dir)],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.lab.data_dir.parent,
                env=_env(LD_PRELOAD=str(self.lib),
                         FAKETIME_TIMESTAMP_FILE=str(self.clock_file),
                         FAKETIME_DONT_FAKE_MONOTONIC="1", FAKETIME_CACHE_DURATION="1",
                         LABDAQ_MAX_RESUME_GAP_S="600", LABDAQ_ENGINE_POLL_S="0.2"),
                start_new_session=True)
        return self.proc

    def kill(self) -> None:
        assert self.proc is not None
        writers = _children(self.proc.pid)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        _wait(lambda: not any(_alive(c) for c in writers), 30, "the writer child to exit")


def _last_seq(lab: Lab, run_id: int) -> int:
    return int(_query(lab, "SELECT coalesce(max(seq), 0) FROM samples WHERE run_id = ?",
                      run_id)[0][0])


def _clock_jumps(lab: Lab, run_id: int) -> list[float]:
    """The jumps (seconds) of the run's ``clock_jump`` events, oldest first."""
    return [json.loads(data)["jump_s"] for (data,) in _query(
        lab, "SELECT data FROM events WHERE run_id = ? AND kind = 'clock_jump' ORDER BY id",
        run_id)]


def _advance(lab: Lab, run_id: int, what: str, *procs: Any) -> None:
    """Wait until the run has STEP_SAMPLES more samples."""
    seq0 = _last_seq(lab, run_id)
    _wait(lambda: _last_seq(lab, run_id) >= seq0 + STEP_SAMPLES, WAIT_S, what, *procs)


def test_wall_clock_jumps_neither_reorder_samples_nor_end_runs(tmp_path: Path) -> None:
    lib = _ensure_libfaketime()
    with _lab(tmp_path, SPEED, ("--smus", "1", "--soc", "0.5", "--watchdog", "0")) as lab:
        (run_id,) = _create_runs(lab, JUMP_DOC, PERIOD_S, instrument_prefix="smu")
        eng = Engine(lab, lib)
        try:
            eng.start()
            _advance(lab, run_id, "the run to take samples", eng.proc, lab.proc)
            # While the engine runs: +1 h, back to the real time (-1 h), then -1 h more.
            jumps = 0
            for offset in (HOUR_S, 0, -HOUR_S):
                eng.offset(offset)
                jumps += 1
                _advance(lab, run_id, f"samples at a wall clock {offset:+d} s off",
                         eng.proc, lab.proc)
            _wait(lambda: _query(lab, "SELECT count(*) FROM steps WHERE run_id = ?",
                                 run_id)[0][0] > 0, WAIT_S, "the rest step to end",
                  eng.proc, lab.proc)
            # Across a restart: killed at -1 h, started again at +0 (the clock stepped an
            # hour forward while it was down), then killed and started at -1 h (an hour
            # back). The gap it resumes after is a few wall seconds either way.
            kills = 0
            for offset in (0, -HOUR_S):
                seq_killed = _last_seq(lab, run_id)
                eng.kill()
                kills += 1
                eng.offset(offset)
                jumps += 1
                eng.start()
                _wait(lambda s0=seq_killed: _last_seq(lab, run_id) >= s0 + STEP_SAMPLES, WAIT_S,
                      f"the run to resume with the wall clock at {offset:+d} s",
                      eng.proc, lab.proc)
            # Back to the real time while running (+1 h), seen before the run stops.
            eng.offset(0)
            jumps += 1
            _wait(lambda: len(_clock_jumps(lab, run_id)) == 4, WAIT_S,
                  "the last jump on the record", eng.proc, lab.proc)
            _query(lab, "UPDATE runs SET requested_action = 'stop' WHERE id = ?", run_id)
            _wait(lambda: _query(lab, "SELECT state FROM runs WHERE id = ?",
                                 run_id)[0][0] != "running", WAIT_S, "the run to stop",
                  eng.proc, lab.proc)
        finally:
            if eng.proc is not None:
                _stop(eng.proc)
        rows = _query(lab, "SELECT seq, t_s, ts_utc FROM samples WHERE run_id = ? ORDER BY seq",
                      run_id)
        state, reason, missed = _query(
            lab, "SELECT state, end_reason, missed_periods FROM runs WHERE id = ?", run_id)[0]
        interruptions = [(msg, json.loads(data)) for msg, data in _query(
            lab, "SELECT message, data FROM events WHERE run_id = ? AND kind = 'interruption' "
            "ORDER BY id", run_id)]
        clock_jumps = _clock_jumps(lab, run_id)
        rest = _query(lab, "SELECT start_t_s, end_t_s, end_reason FROM steps WHERE run_id = ? "
                      "AND step_index = 0", run_id)
    seqs = [r[0] for r in rows]
    lost, dups = lost_and_duplicates(seqs, list(range(1, max(seqs) + 1)))
    resumed = sum("resumed after" in msg for msg, _ in interruptions)
    record_fault("wall clock stepped ±1 h under the engine (4 steps running, 2 across a "
                 "kill -9 and restart)", faults=jumps, lost=lost, duplicates=dups,
                 runs_resumed=int(resumed == kills and state == "stopped"), runs=1,
                 missed_periods=int(missed or 0))
    # Numbered without a hole; the engine's time only grows.
    assert seqs == list(range(1, len(seqs) + 1))
    t_s = [r[1] for r in rows]
    assert all(b > a for a, b in zip(t_s, t_s[1:], strict=False)), "t_s went backwards"
    # ts_utc is the wall clock as it was: the jumps are in it, both ways.
    steps = [b[2] - a[2] for a, b in zip(rows, rows[1:], strict=False)]
    assert max(steps) > HOUR_S / 2 and min(steps) < -HOUR_S / 2, (max(steps), min(steps))
    # Stopped as asked; each restart resumed the run after a gap of seconds, not an hour.
    assert state == "stopped", reason
    assert resumed == kills, interruptions
    for msg, gap in interruptions:
        assert 0 <= gap["gap_wall_s"] < HOUR_S / 4, (msg, gap)
        assert abs(abs(gap["wall_clock_step_s"]) - HOUR_S) < HOUR_S / 4, (msg, gap)
    # Each jump the running engine saw is on the run's record, in order, with its size.
    assert [round(j / HOUR_S) for j in clock_jumps] == [1, -1, -1, 1], clock_jumps
    # The rest step lasted its duration on the engine's clock, jumps or not: not cut short
    # by the hour forward, not stretched by the hours back. (It ends at the first tick
    # past its deadline: later than that on a loaded machine, never an hour later; the
    # upper bound is that hour's order, not a timing bound.)
    ((start_t_s, end_t_s, end_reason),) = rest
    assert end_reason == "duration"
    assert REST_S <= end_t_s - start_t_s < REST_S + HOUR_S / 4, rest
