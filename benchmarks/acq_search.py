"""The plan of benchmarks/acquisition_scale.py (:class:`Plan`, its full and quick forms,
``--set`` overrides) and the search over cabinet counts: doubling while lossless, then
bisecting; one cabinet's channels halved when not even one cabinet is lossless.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from acq_common import log
from acq_trial import Lab, Step, Trial


@dataclass
class Plan:
    cpc: int  # channels used per 64-channel cabinet
    period_s: float  # sample period = control period
    max_cabinets: int  # the simulated lab's size: the search's upper bound
    start_cabinets: int  # first count tried
    window_s: float
    settle_s: float  # after the last run joined, before the window opens
    cycle_s: float  # one CC-CV charge + discharge cycle of an ordinary channel
    breach_per_cab: int
    api_rate_hz: float  # the standard API load: open-loop requests per second
    api_conns: int
    bare_s: float  # the bare loop's measured window (after 0.5 s warm-up)
    sim_ceiling_s: float
    budget_s: float  # for the search: no trial starts if its estimated end is past this
    min_channels: int = 8  # on one cabinet, when a whole one is not lossless
    api_kinds: tuple[str, ...] | None = None  # part of API_MIX to send; None: all of it
    # 1: the cabinets log on their own clock and the engine fetches blocks of readings
    # (the instruments' acquisition = "buffered" option); 0: one MEAS:ALL? per tick.
    buffered: int = 0
    fetch_s: float = 0.05  # buffered: the engine's fetch period
    ring_points: int = 1000  # buffered: the cabinets' logging ring, in readings
    # buffered: the simulator's ceiling at most is measured with every cabinet logging
    # this often (the timer's shortest), fetched back to back: far more than it can take.
    ceiling_period_s: float = 0.001

    @property
    def mode(self) -> str:
        if self.buffered:
            return (f"buffered (the cabinets log every {self.period_s * 1e3:g} ms on their "
                    f"own clock into a {self.ring_points}-reading ring; the engine fetches "
                    f"every {self.fetch_s * 1e3:g} ms)")
        return "per tick (one MEAS:ALL? per cabinet per sample period)"


# Both forms measure buffered acquisition (the cabinets log on their own clock, the
# engine fetches blocks): the mode that stores the most with nothing lost on this machine
# (docs/performance.md); ``--set buffered=0`` measures one MEAS:ALL? per tick instead.
FULL = Plan(cpc=64, period_s=0.01, max_cabinets=24, start_cabinets=8, window_s=10.0,
            settle_s=2.0, cycle_s=20.0, breach_per_cab=2, api_rate_hz=50.0, api_conns=8,
            bare_s=30.0, sim_ceiling_s=4.0, budget_s=180.0, buffered=1)
QUICK = Plan(cpc=8, period_s=0.01, max_cabinets=2, start_cabinets=2, window_s=2.0,
             settle_s=1.0, cycle_s=2.0, breach_per_cab=1, api_rate_hz=20.0, api_conns=4,
             bare_s=1.5, sim_ceiling_s=1.0, budget_s=40.0, min_channels=4, buffered=1)


def apply_overrides(plan: Plan, items: list[str]) -> Plan:
    """``--set field=value`` for exploring other configurations."""
    for item in items:
        key, _, text = item.partition("=")
        current = getattr(plan, key)  # AttributeError names an unknown field
        plan = replace(plan, **{key: type(current)(text)})
    return plan


def next_count(lo: int, hi: int, top: int) -> int | None:
    """The next cabinet count to try, knowing ``lo`` lossless (0: none yet) and ``hi``
    lossy (``top + 1``: none yet); None when they meet. Doubles up while nothing was
    lossy, bisects once something was."""
    if lo + 1 >= hi:
        return None
    if hi > top:
        return min(top, max(lo + 1, 2 * lo))
    return (lo + hi) // 2


async def search(lab: Lab, plan: Plan, t_start: float) -> list[Step]:
    """Trials from ``start`` on: up while lossless, bisecting after the first loss."""
    top = min(plan.max_cabinets, len(lab.ports))
    # The same first count every run (not the last run's result, which another run on the
    # machine may have left): two runs then take the same path while their verdicts agree.
    k: int | None = max(1, min(top, plan.start_cabinets))
    lo, hi = 0, top + 1
    steps: list[Step] = []
    t_phase = time.perf_counter()
    per_run_s = 0.05  # claim + stop per run, first guess; measured from then on
    while k is not None:
        est = k * plan.cpc * per_run_s + plan.settle_s + plan.window_s + 8
        if steps and time.perf_counter() - t_phase + est > plan.budget_s:
            log(f"search: {k} cabinets not tried (time budget {plan.budget_s:g} s)")
            break
        st = await Trial(lab, plan, k).run()
        steps.append(st)
        per_run_s = max(0.0, st.trial_s - plan.settle_s - plan.window_s) / max(1, st.new_runs)
        log(f"[{time.perf_counter() - t_start:5.1f} s]" + st.line())
        if st.lossless:
            lo = k
        else:
            hi = k
        k = next_count(lo, hi, top)
    # Not even one whole cabinet: halve the channels of one cabinet (a figure above zero
    # says how far off the target is) down to min_channels.
    cpc = plan.cpc // 2
    while lo == 0 and steps and cpc >= max(plan.min_channels, plan.breach_per_cab + 1):
        est = cpc * per_run_s + plan.settle_s + plan.window_s + 8
        if time.perf_counter() - t_phase + est > plan.budget_s:
            log(f"search: 1 cabinet x {cpc} ch not tried (time budget {plan.budget_s:g} s)")
            break
        st = await Trial(lab, plan, 1, cpc).run()
        steps.append(st)
        log(f"[{time.perf_counter() - t_start:5.1f} s]" + st.line())
        if st.lossless:
            break
        cpc //= 2
    return steps


