"""labdaq.supervisor with real child processes: restart after a death, backoff that grows
with deaths in a row, give-up after max_restarts, dependencies, stop order.

The clock is injected, so the backoff is checked as arithmetic on it; processes are real
(tiny Python programs) and every wait polls a condition with a generous timeout.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from labdaq.supervisor import Child, ChildEvent, RestartPolicy, Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def _dies(code: int) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.exit({code})"]


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _until(sup: Supervisor, pred: Callable[[], bool], what: str,
           timeout_s: float = 60.0) -> list[ChildEvent]:
    """Step the supervisor until ``pred``; returns the events seen on the way."""
    events: list[ChildEvent] = []
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        events += sup.step()
        time.sleep(0.02)
    return events


def test_policy_backoff_doubles_up_to_its_cap() -> None:
    p = RestartPolicy(backoff_s=0.5, backoff_max_s=3.0)
    assert [p.delay_s(k) for k in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_child_that_keeps_dying_is_restarted_with_backoff_then_given_up() -> None:
    clock = FakeClock()
    policy = RestartPolicy(backoff_s=1.0, backoff_max_s=4.0, max_restarts=3, stable_s=30.0)
    child = Child("engine", _dies(7))
    sup = Supervisor([child], policy, clock=clock)
    sup.start(child)
    seen: list[ChildEvent] = []
    for streak, delay in ((1, 1.0), (2, 2.0), (3, 4.0)):
        events = _until(sup, lambda: child.restart_at is not None, f"death {streak}")
        assert [(e.kind, e.returncode, e.streak, e.restart_in_s) for e in events] == [
            ("exited", 7, streak, delay)]
        # Not before its delay, on the supervisor's clock.
        clock.t += delay - 0.01
        assert sup.step() == []
        clock.t += 0.01
        restarted = sup.step()
        assert [(e.kind, e.streak) for e in restarted] == [("restarted", streak)]
        seen += events + restarted
    events = _until(sup, lambda: child.gave_up, "the give-up")
    assert [(e.kind, e.returncode, e.streak) for e in events] == [("gave_up", 7, 4)]
    assert child.restarts == 3
    clock.t += 3600
    assert sup.step() == [] and child.restart_at is None


def test_a_child_that_stayed_up_starts_a_new_streak(tmp_path: Path) -> None:
    clock = FakeClock()
    policy = RestartPolicy(backoff_s=1.0, max_restarts=1, stable_s=10.0)
    flag = tmp_path / "go"
    # Dies once the test says so (the flag file): "up for a while, then dies".
    waits = [sys.executable, "-c",
             f"import os, sys, time\nwhile not os.path.exists({str(flag)!r}): "
             "time.sleep(0.02)\nos.remove(" + repr(str(flag)) + ")\nsys.exit(3)"]
    child = Child("sim", waits)
    sup = Supervisor([child], policy, clock=clock)
    sup.start(child)
    for _ in range(3):  # max_restarts=1, yet three deaths: each after a stable period
        clock.t += 11.0
        flag.touch()
        events = _until(sup, lambda: child.restart_at is not None, "a death")
        assert [(e.kind, e.streak) for e in events] == [("exited", 1)]
        clock.t += 1.0
        assert [e.kind for e in sup.step()] == ["restarted"]
    assert not child.gave_up
    asyncio.run(sup.stop_all(["sim"], timeout_s=10))


def test_dependent_child_waits_for_what_it_needs() -> None:
    clock = FakeClock()
    policy = RestartPolicy(backoff_s=1.0, max_restarts=5)
    sim = Child("sim", _dies(1))
    engine = Child("engine", _dies(2), depends_on=("sim",))
    sup = Supervisor([sim, engine], policy, clock=clock)
    sup.start(sim)
    sup.start(engine)
    _until(sup, lambda: sim.restart_at is not None and engine.restart_at is not None,
           "both deaths")
    sim.restart_argv = SLEEPER  # the lab comes back for good this time
    clock.t += 1.0
    events = sup.step()
    # The lab is restarted first; the engine only once the lab runs (same step: the lab
    # comes first in the list and runs by then).
    assert [(e.kind, e.child) for e in events] == [("restarted", "sim"), ("restarted", "engine")]
    asyncio.run(sup.stop_all(["engine", "sim"], timeout_s=10))


def test_dependent_child_is_not_restarted_while_its_dependency_is_down() -> None:
    clock = FakeClock()
    sim = Child("sim", SLEEPER)  # not running yet
    engine = Child("engine", _dies(2), depends_on=("sim",), restart_argv=SLEEPER)
    sup = Supervisor([sim, engine], RestartPolicy(backoff_s=1.0, max_restarts=3), clock=clock)
    sup.start(engine)
    _until(sup, lambda: engine.restart_at is not None, "the engine's death")
    clock.t += 100.0
    assert sup.step() == []
    assert engine.proc is not None and engine.proc.poll() == 2
    sup.start(sim)
    assert [(e.kind, e.child) for e in sup.step()] == [("restarted", "engine")]
    asyncio.run(sup.stop_all(["engine", "sim"], timeout_s=10))


def test_stop_all_goes_in_order_and_stops_restarts(tmp_path: Path) -> None:
    log = tmp_path / "order"
    # Each child appends its name when SIGTERM reaches it, then exits.
    def prog(name: str) -> list[str]:
        return [sys.executable, "-c",
                "import signal, sys, time\n"
                f"def bye(*_):\n    open({str(log)!r}, 'a').write({name!r} + '\\n'); "
                "sys.exit(0)\n"
                "signal.signal(signal.SIGTERM, bye)\n"
                f"open({str(log)!r} + '.{name}', 'w').close()\n"
                "while True: time.sleep(0.05)\n"]

    children = [Child(n, prog(n)) for n in ("sim", "engine", "api")]
    sup = Supervisor(children, RestartPolicy(backoff_s=0.01))
    for c in children:
        sup.start(c)
    _until(sup, lambda: all(Path(f"{log}.{c.name}").exists() for c in children),
           "the children to install their handlers")
    clean = asyncio.run(sup.stop_all(["api", "engine", "sim"], timeout_s=30))
    assert clean == {"api": True, "engine": True, "sim": True}
    assert log.read_text().split() == ["api", "engine", "sim"]
    assert sup.step() == []  # stopped children are not restarted


def test_a_restarted_lab_serves_on_the_ports_of_its_description(tmp_path: Path) -> None:
    """What `labdaq sim --ports-from` does for `serve`: the same resource strings again."""
    import json

    from labdaq.cli_sim import _ports_from
    from labdaq.sims.lab import SimLab

    first = SimLab(smus=1, cabinets=1)
    desc = first.start()
    first.stop()
    path = tmp_path / "simlab.json"
    path.write_text(json.dumps(desc))
    again = SimLab(smus=1, cabinets=1, ports=_ports_from(path))
    try:
        desc2 = again.start()
    finally:
        again.stop()
    assert [i["resource"] for i in desc2["instruments"]] == [
        i["resource"] for i in desc["instruments"]]
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a lab description"):
        _ports_from(path)
