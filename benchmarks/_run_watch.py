"""What the machine did while one benchmark process ran, measured from outside it.

Used by ``before_after.py``: the machine's own scheduling lateness over the same minutes,
and the CPU time of each of the benchmark's processes by role.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any


class RunWatch:
    """What the machine did while one benchmark ran, measured from outside it.

    * Scheduling lateness: a thread of this process sleeps to an absolute 10 ms grid (as
      the engine's loop does) and records how late it woke: on a shared machine, the
      lateness no engine could do better than over the same minutes.
    * CPU seconds of every process of the benchmark's session by role (the benchmark
      process itself, which runs the engine; its sample writer child; simulator; API;
      load client), from /proc every 0.25 s: the acquisition scripts report the engine's
      CPU but not its writer's, which is where positions are written since the rebuild.
    """

    PERIOD_S = 0.01
    SCAN_S = 0.25
    ROLES = (("writer_process", "writer"), (" sim ", "sim"), (" api ", "api"),
             ("--api-load", "load"), ("--hammer", "load"), ("--bare", "bare"))

    def __init__(self) -> None:
        self._late_s: list[float] = []
        self._cpu: dict[int, tuple[str, float]] = {}  # pid -> (role, last CPU seconds)
        self.session = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._probe, name="probe", daemon=True),
                         threading.Thread(target=self._scan, name="scan", daemon=True)]

    def _probe(self) -> None:
        due = time.monotonic() + self.PERIOD_S
        while not self._stop.is_set():
            time.sleep(max(0.0, due - time.monotonic()))
            now = time.monotonic()
            self._late_s.append(now - due)
            # Like a tick loop: the next due time on the grid after now.
            due += self.PERIOD_S * max(1, int((now - due) / self.PERIOD_S) + 1)

    def _scan(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while True:
            if self.session:
                for d in Path("/proc").iterdir():
                    if not d.name.isdigit():
                        continue
                    try:
                        fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                        if int(fields[3]) != self.session:
                            continue
                        cpu = (int(fields[11]) + int(fields[12])) / tick
                        pid = int(d.name)
                        # "other" is looked at again: a child just forked still shows
                        # its parent's command line until it execs.
                        role = self._cpu.get(pid, ("other", 0.0))[0]
                        if role == "other":
                            role = self._role(d, pid)
                    except (OSError, IndexError, ValueError):
                        continue  # gone meanwhile
                    self._cpu[pid] = (role, cpu)
            if self._stop.wait(self.SCAN_S):
                return

    def _role(self, d: Path, pid: int) -> str:
        if pid == self.session:
            return "benchmark"
        cmd = " " + (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        return next((role for key, role in self.ROLES if key in cmd), "other")

    def __enter__(self) -> RunWatch:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        late = sorted(self._late_s)
        if late:
            out["probe_lateness_p99_ms"] = round(1e3 * late[int(0.99 * (len(late) - 1))], 3)
            out["probe_lateness_max_ms"] = round(1e3 * late[-1], 3)
        cpu: dict[str, float] = {}
        for role, seconds in self._cpu.values():
            cpu[role] = round(cpu.get(role, 0.0) + seconds, 2)
        out["cpu_s_by_role"] = cpu
        return out
