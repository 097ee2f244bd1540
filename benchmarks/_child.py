"""Run one benchmark process under a time limit and read its JSON lines.

Shared by ``run_all.py`` (``make bench``) and ``before_after.py``. The child gets its own
process group: past the limit it gets SIGTERM (the benchmarks stop their own children on
it), then the whole group SIGKILL, so no simulator or API outlives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TERM_GRACE_S = 20.0


@dataclass
class ChildRun:
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float
    timed_out: bool

    def json_lines(self) -> list[dict[str, Any]]:
        """Every stdout line that parses as a JSON object, in order."""
        out: list[dict[str, Any]] = []
        for line in self.stdout.splitlines():
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out


def run_limited(cmd: list[str], limit_s: float, env: dict[str, str] | None = None,
                cwd: str | None = None,
                on_start: Callable[[int], None] | None = None,
                term_grace_s: float = TERM_GRACE_S) -> ChildRun:
    """Run ``cmd`` to its end or to ``limit_s`` seconds, whichever comes first;
    ``on_start`` gets its pid (= its session's id, shared by its children); past the
    limit it has ``term_grace_s`` after SIGTERM before the group gets SIGKILL."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env, cwd=cwd)
    if on_start is not None:
        on_start(proc.pid)
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=term_grace_s)
        except subprocess.TimeoutExpired:
            stdout, stderr = "", ""
        stderr = (stderr or "") + f"\nstopped after its limit of {limit_s:g} s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if timed_out or proc.poll() is None:
            # After a timed-out communicate() the output read so far is kept in ``proc``
            # and this call returns all of it. Skipping it whenever the killed child had
            # already been reaped lost what a stopped benchmark had printed.
            stdout2, stderr2 = proc.communicate()
            stdout, stderr = stdout or stdout2, (stderr or "") + stderr2
    rc = proc.returncode if proc.returncode is not None else -1
    return ChildRun(rc, stdout or "", stderr or "", time.perf_counter() - t0, timed_out)
