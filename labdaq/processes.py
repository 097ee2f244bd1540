"""Child processes: start, wait for, stop. Shared by `labdaq serve` and the benchmarks.

One place for what starting labdaq's own processes takes: the command line of a
``labdaq`` subcommand in the same interpreter, an environment whose output is unbuffered,
stopping with SIGTERM first (the engine turns outputs off on it) and SIGKILL only when that
is not honoured in time, waiting for a file or an HTTP answer while checking that the
child is still alive, and starting a simulated lab and reading its description.
Restart policy lives in labdaq.supervisor, which builds on this.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

#: Exit status of a child that stopped because of a failure it cannot repair in place
#: (EX_TEMPFAIL): the engine after its sample writer died. Its supervisor restarts it.
EXIT_RESTART = 75

Proc = subprocess.Popen[Any]


class ChildFailed(RuntimeError):
    """A child exited, or did not become ready in time, while we waited for it."""


def labdaq_argv(*args: str) -> list[str]:
    """The command line of ``labdaq <args>`` in this interpreter (the same virtualenv)."""
    return [sys.executable, "-m", "labdaq.cli", *args]


#: glibc malloc arenas per child, unless the environment says otherwise. The default (8
#: per core) gives each of the API's threads (a worker pool, one per aiosqlite connection)
#: an arena of its own, and what a thread frees stays in its arena: resident memory
#: crept up through the 1 h soak (tests/test_soak_api_load.py) while Python's and
#: SQLite's own allocations did not.
MALLOC_ARENA_MAX = "2"


def child_env(drop: Sequence[str] = (), **extra: str) -> dict[str, str]:
    """Our environment for a child: unbuffered output (its log lines arrive as written),
    at most :data:`MALLOC_ARENA_MAX` malloc arenas, plus ``extra``, minus the variables in
    ``drop``."""
    env = {"MALLOC_ARENA_MAX": MALLOC_ARENA_MAX, **os.environ, "PYTHONUNBUFFERED": "1",
           **extra}
    for name in drop:
        env.pop(name, None)
    return env


def spawn(
    argv: Sequence[str],
    *,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    log_path: Path | None = None,
    new_session: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    text: bool = False,
) -> Proc:
    """Start ``argv``. ``log_path`` takes its stderr (appended: a restarted child keeps
    its predecessor's lines). ``new_session``: a terminal's Ctrl-C reaches only us, and we
    stop the children in our own order."""
    err: Any = stderr
    fh = None
    if log_path is not None:
        fh = log_path.open("ab")
        err = fh
    try:
        return subprocess.Popen(
            list(argv), stdout=stdout, stderr=err, stdin=subprocess.DEVNULL,
            start_new_session=new_session, env=dict(env) if env is not None else child_env(),
            cwd=cwd, text=text,
        )
    finally:
        if fh is not None:
            fh.close()  # the child has its own copy


def stop(proc: Proc, timeout_s: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``. Returns False when
    it had to be killed (it could not clean up: the engine then left outputs as they were)."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


def wait_until(pred: Callable[[], bool], timeout_s: float, what: str,
               proc: Proc | None = None, poll_s: float = 0.05) -> None:
    """Poll ``pred`` until true; ChildFailed if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise ChildFailed(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise ChildFailed(f"{what}: not within {timeout_s:g} s")
        time.sleep(poll_s)


def http_ok(host: str, port: int, path: str, timeout_s: float = 1.0) -> bool:
    """True if ``GET path`` answers 200."""
    try:
        con = http.client.HTTPConnection(host, port, timeout=timeout_s)
        try:
            con.request("GET", path)
            return con.getresponse().status == 200
        finally:
            con.close()
    except OSError:
        return False


def wait_for_http(host: str, port: int, path: str, timeout_s: float,
                  proc: Proc | None = None) -> None:
    wait_until(lambda: http_ok(host, port, path), timeout_s, f"GET {path} on port {port}",
               proc, poll_s=0.1)


def sim_argv(describe: Path, *args: str, ports_from: Path | None = None) -> list[str]:
    """``labdaq sim`` writing its description to ``describe``; ``ports_from`` serves each
    TCP instrument on the port it had in that description (a restarted lab keeps the
    resource strings the database and the engine know)."""
    extra = ["--ports-from", str(ports_from)] if ports_from is not None else []
    return labdaq_argv("sim", "--describe", str(describe), *extra, *args)


def read_sim_description(describe: Path, proc: Proc, timeout_s: float = 60.0
                         ) -> dict[str, Any]:
    """Wait for a starting ``labdaq sim`` to write its description, and read it."""
    wait_until(describe.exists, timeout_s, "the simulated lab to describe itself", proc)
    desc: dict[str, Any] = json.loads(describe.read_text())
    return desc


class Children:
    """Every child a program starts, each with a stderr log in ``log_dir``; all stopped by
    ``stop_all`` (latest first)."""

    def __init__(self, log_dir: Path) -> None:
        self.procs: list[tuple[str, Proc]] = []
        self.log_dir = log_dir

    def spawn(self, name: str, argv: Sequence[str], **kwargs: Any) -> Proc:
        proc = spawn(argv, log_path=self.log_dir / f"{name}.stderr", **kwargs)
        self.procs.append((name, proc))
        return proc

    def tail(self, name: str, chars: int = 2000) -> str:
        path = self.log_dir / f"{name}.stderr"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self, proc: Proc, timeout_s: float = 10.0) -> bool:
        return stop(proc, timeout_s)

    def stop_all(self, timeout_s: float = 10.0) -> None:
        for _name, proc in reversed(self.procs):
            stop(proc, timeout_s)
