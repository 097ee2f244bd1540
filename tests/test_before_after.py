"""benchmarks/before_after.py: what it reads from each tree's output and how it judges it.

One job: check the parts of the before/after comparison that decide its table without
running a benchmark — which ``--set`` vocabulary a script gets, which figures are read
from each acquisition script's JSON (the one before the engine rebuild and the one
after), the 10 % verdict in both directions, the combined table, and that a child past
its time limit is stopped with its whole process group (``_child.run_limited``).
"""

from __future__ import annotations

import importlib.util
import os
import select
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def ba() -> ModuleType:
    sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location("before_after_under_test",
                                                  BENCH_DIR / "before_after.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# The shapes of the two scripts' last JSON line, reduced to what before_after reads.
OLD_OUT: dict[str, Any] = {
    "lateness_p99_ms": 20.0, "lateness_max_ms": 47.0, "breach_to_off_p99_ms": 0.9,
    "breach_to_ack_p99_ms": 3.0, "breaches": 12,
    "search": [{"stored_per_s": 2500.0, "window_lost": 0,
                "cpu_pct": {"engine": 7.5}, "api_req_per_s": 400.0}],
}
NEW_OUT: dict[str, Any] = {
    "lateness_p99_ms": None,  # top level: only for a lossless trial
    "trials": [{"lateness_p99_ms": 160.0, "lateness_max_ms": 290.0,
                "breach_to_off_p99_ms": 0.6, "breach_to_ack_p99_ms": 134.0, "breaches": 9,
                "stored_per_s": 2400.0, "window_lost": 863,
                "cpu_pct": {"engine": 6.0}, "api": {"req_per_s": 46.0}}],
}


def test_each_script_gets_its_own_set_vocabulary(ba: ModuleType, tmp_path: Path) -> None:
    old = tmp_path / "old.py"
    old.write_text("class Plan:\n    push_steps: list[int]\n")
    new = tmp_path / "new.py"
    new.write_text("class Plan:\n    period_s: float\n")
    old_args, new_args = ba.set_args(old), ba.set_args(new)
    assert "steps_10hz=4" in old_args and "period_s=0.1" not in old_args
    assert "period_s=0.1" in new_args and "start_cabinets=4" in new_args
    # Both at the same size: 4 cabinets, 3 breach channels each, a 10 s window.
    for args in (old_args, new_args):
        assert "breach_per_cab=3" in args and "cpc=64" in args


def test_the_window_figures_come_from_where_each_script_puts_them(ba: ModuleType) -> None:
    got = {m.name: m.get(OLD_OUT) for m in ba.ACQ_METRICS}
    assert got["loop lateness max"] == 47.0
    assert got["breach-to-ack p99"] == 3.0
    assert got["engine CPU per stored sample"] == pytest.approx(30.0)  # 7.5 % / 2500/s
    got = {m.name: m.get(NEW_OUT) for m in ba.ACQ_METRICS}
    assert got["loop lateness p99"] == 160.0  # the trial's, not the null top level
    assert got["breaches"] == 9
    assert got["API answered"] == 46.0
    assert got["engine CPU per stored sample"] == pytest.approx(25.0)


def test_the_verdict_allows_ten_percent_in_the_worse_direction_only(ba: ModuleType) -> None:
    late = next(m for m in ba.ACQ_METRICS if m.name == "loop lateness p99")
    rate = next(m for m in ba.INGEST_METRICS if m.name == "ingest")
    assert ba.verdict(late, 100.0, 109.0)[1] == "within 10 %"
    assert ba.verdict(late, 100.0, 111.0)[1].startswith("WORSE")
    assert ba.verdict(late, 100.0, 50.0)[1] == "within 10 %"
    assert ba.verdict(rate, 100.0, 91.0)[1] == "within 10 %"
    assert ba.verdict(rate, 100.0, 89.0)[1].startswith("WORSE")


def test_the_table_takes_the_median_of_each_side(ba: ModuleType) -> None:
    def run(side: str, p99: float) -> object:
        out = {**NEW_OUT, "trials": [{**NEW_OUT["trials"][0], "lateness_p99_ms": p99}]}
        return ba.Run("acq10_same", side, 1, [0.0, 0.0, 0.0], out=out)

    runs = [run("before", 10.0), run("before", 30.0), run("before", 20.0),
            run("after", 21.0), run("after", 19.0), run("after", 500.0)]
    bench = next(b for b in ba.BENCHES if b.name == "acq10_same")
    row = next(x for x in ba.table(runs, [bench]).splitlines() if "lateness p99" in x)
    assert "| 20.0 (10.0, 30.0, 20.0) | 21.0 (21.0, 19.0, 500.0) | 1.05 | within 10 % |" in row


def test_a_child_past_its_limit_is_stopped_with_its_children(ba: ModuleType,
                                                            tmp_path: Path) -> None:
    from _child import run_limited

    pid_file = tmp_path / "grandchild.pid"
    # The child starts a grandchild that ignores nothing and outlives it unless killed
    # with the group, then hangs (ignoring SIGTERM) past the limit.
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "print('{\"name\": \"x\", \"value\": 1}', flush=True)\n"
        "time.sleep(600)\n"
    )
    started: list[int] = []
    # The limit must outlast the child's start (an interpreter and a grandchild, then the
    # line): 2 s did not on a loaded CI machine. It bounds how long the hang lasts.
    child = run_limited([sys.executable, "-c", script], limit_s=10.0,
                        on_start=started.append, term_grace_s=0.5)
    assert child.timed_out
    assert child.json_lines() == [{"name": "x", "value": 1}]
    assert started and started[0] > 0
    grandchild = int(pid_file.read_text())
    try:
        fd = os.pidfd_open(grandchild)
    except ProcessLookupError:
        return  # already gone and reaped
    try:
        # Readable once the process has ended (SIGKILL is delivered asynchronously).
        ready, _, _ = select.select([fd], [], [], 30.0)
    finally:
        os.close(fd)
    assert ready, "the grandchild outlived the group kill"
