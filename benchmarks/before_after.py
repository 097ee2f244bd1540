"""Two trees, the same benchmarks, alternating: medians, after/before ratios, 10 % verdicts.

Usage::

    python benchmarks/before_after.py BEFORE_TREE AFTER_TREE [--rounds 3] [--only NAME ...]
        [--pg-url postgresql://...] [--out results.json] [--first after]
    python benchmarks/before_after.py BEFORE_TREE AFTER_TREE --combine a.json b.json

One job: issue 11's last done-when ("`make bench` figures do not get worse: median of 3
runs before and after, none more than 10 % worse") on a machine shared with other work.
Each tree runs with its own ``.venv/bin/python`` and ``PYTHONPATH=<tree>``; the
benchmarks run alternating, before then after, round by round (A B A B A B), so slow
drifts of the machine's load hit both sides alike. The load average is taken before and
after every run and printed with it.

The benchmarks (``BENCHES``):

* ``acq10_own``: each tree's OWN ``benchmarks/acquisition_scale.py`` at one configuration
  both accept: 4 cabinets x 64 channels at 10 Hz (control period = sample period), 3
  breach channels per cabinet (12 breaches), a 10 s window after 2 s settle, under the
  tree's API load. The scripts differ and cannot be made to agree entirely: the tree
  before the engine rebuild (``ccc654e``) measures lateness and breaches only in its
  10 Hz and 1 Hz searches (100 Hz runs there without breaches and without API load), its
  API load is a closed-loop hammer of ``GET /runs/{id}`` over 16 connections (as fast as
  the API answers) and its ordinary channels rest; the tree after runs the standard API
  load (50 requests/s open loop, a mix of status, cycles, downsampled and full samples)
  and its ordinary channels charge CC-CV (``cycle_s`` set so long that no set point
  changes in the window: the closest to a rest it offers).
* ``acq10_same``: the AFTER tree's ``acquisition_scale.py`` run on both trees' code (its
  imports reach only what both trees have), same configuration: the same harness, the
  same API load and workload, only the engine differs.
* ``ingest_sqlite`` and ``ingest_pg``: each tree's own ``ingest.py`` / ``ingest_pg.py``
  with the same rows and repeats (``ingest_pg`` needs ``--pg-url`` or
  ``LABDAQ_BENCH_PG_URL``/``LABDAQ_TEST_PG_URL``); rows/s, and the ratio to the raw
  baseline each measures in the same run (the figure a busy machine disturbs least).

Beside every run, ``RunWatch`` records the machine's own scheduling lateness over the same
minutes and the CPU time of each of the benchmark's processes (engine, sample writer,
simulator, API), shown for context. The engine's CPU per stored sample (its process's CPU in
the window over the rows stored) says what the engine costs, which the machine's load
moves far less than any wall-clock figure.

Verdict per metric: "ok" when the median after is at most 10 % worse than the median
before (latency: after <= 1.10 x before; rate: after >= 0.90 x before). The spread of the
runs is printed beside each median: on a shared 2-core machine it is often wider than
10 %, and the table says so rather than hiding it.

Prints a Markdown table on stdout; every run's parsed JSON, load and stderr tail go to
``--out`` when given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _child import run_limited  # noqa: E402
from _run_watch import RunWatch  # noqa: E402

LIMIT_S = 900.0
WORSE_FRACTION = 0.10

# The fixed acquisition configuration, in each script's own --set vocabulary. The old
# script's Plan has push_steps / steps_10hz (its 10 Hz search runs under API load with
# breach channels); the new one's has period_s / start_cabinets.
CABINETS, BREACH_PER_CAB, WINDOW_S, SETTLE_S = 4, 3, 10, 2
OLD_ACQ_SET = {
    "cpc": "64", "push_steps": "", "steps_1hz": "", "steps_10hz": str(CABINETS),
    "window_10hz_s": str(WINDOW_S), "breach_per_cab": str(BREACH_PER_CAB),
    "settle_s": str(SETTLE_S), "bare_cabinets": "1", "bare_s": "1",
}
NEW_ACQ_SET = {
    "cpc": "64", "period_s": "0.1", "start_cabinets": str(CABINETS),
    "max_cabinets": str(CABINETS), "window_s": str(WINDOW_S),
    "breach_per_cab": str(BREACH_PER_CAB), "settle_s": str(SETTLE_S),
    # No set-point change in the window (the old script's channels rest).
    "cycle_s": "1000000",
    # One trial, no bisection, no halving; the bare loop and ceiling as short as allowed.
    "budget_s": "1", "min_channels": "64", "bare_s": "1", "sim_ceiling_s": "1",
}
INGEST_ARGS = {"ingest_sqlite": ["--rows", "300000", "--repeats", "1"],
               "ingest_pg": ["--rows", "250000", "--repeats", "1"]}


def set_args(script: Path) -> list[str]:
    """The --set options of the fixed configuration in ``script``'s vocabulary."""
    plan = OLD_ACQ_SET if "push_steps" in script.read_text() else NEW_ACQ_SET
    return [x for k, v in plan.items() for x in ("--set", f"{k}={v}")]


def acq_step(out: dict[str, Any]) -> dict[str, Any]:
    """The one measured window's figures, whichever script wrote ``out``."""
    if "trials" in out:  # after: every trial's summary holds its own figures
        trial: dict[str, Any] = out["trials"][0]
        return {**trial, "engine_cpu_pct": trial["cpu_pct"].get("engine"),
                "api_req_per_s": trial["api"].get("req_per_s")}
    # before: the 10 Hz window's lateness and breach figures are the top-level ones (the
    # only loaded step); its summary has no maximum lateness.
    step = out["search"][-1]
    return {**step, "lateness_max_ms": out["lateness_max_ms"],
            "lateness_p99_ms": out["lateness_p99_ms"],
            "breach_to_off_p99_ms": out["breach_to_off_p99_ms"],
            "breach_to_ack_p99_ms": out["breach_to_ack_p99_ms"],
            "breaches": out["breaches"], "engine_cpu_pct": step["cpu_pct"].get("engine")}


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    lower_is_better: bool | None  # None: shown for context, no verdict
    get: Callable[[dict[str, Any]], float | None]


def _acq(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda out: acq_step(out).get(key)


ACQ_METRICS = (
    Metric("loop lateness p99", "ms", True, _acq("lateness_p99_ms")),
    Metric("loop lateness max", "ms", True, _acq("lateness_max_ms")),
    Metric("breach-to-off p99", "ms", True, _acq("breach_to_off_p99_ms")),
    Metric("breach-to-ack p99", "ms", True, _acq("breach_to_ack_p99_ms")),
    Metric("breaches", "", None, _acq("breaches")),
    Metric("stored in window", "rows/s", None, _acq("stored_per_s")),
    Metric("periods lost in window", "", None, _acq("window_lost")),
    Metric("engine process CPU", "%", None, _acq("engine_cpu_pct")),
    Metric("engine CPU per stored sample", "us", True, lambda out: _cpu_per_sample(out)),
    Metric("API answered", "req/s", None, _acq("api_req_per_s")),
    Metric("probe lateness p99 (machine)", "ms", None,
           lambda out: out.get("probe_lateness_p99_ms")),
    Metric("probe lateness max (machine)", "ms", None,
           lambda out: out.get("probe_lateness_max_ms")),
    Metric("engine process CPU, whole run", "s", None,
           lambda out: out.get("cpu_s_by_role", {}).get("benchmark")),
    Metric("writer process CPU, whole run", "s", None,
           lambda out: out.get("cpu_s_by_role", {}).get("writer")),
    Metric("API process CPU, whole run", "s", None,
           lambda out: out.get("cpu_s_by_role", {}).get("api")),
)
def _cpu_per_sample(out: dict[str, Any]) -> float | None:
    """Engine process CPU in the window per stored channel-sample (the window's rate)."""
    step = acq_step(out)
    cpu, rate = step.get("engine_cpu_pct"), step.get("stored_per_s")
    return 1e4 * cpu / rate if cpu is not None and rate else None


INGEST_METRICS = (
    Metric("ingest", "rows/s", False, lambda out: out.get("value")),
    Metric("ratio to raw", "x", False, lambda out: out.get("ratio")),
    Metric("raw baseline", "rows/s", None, lambda out: out.get("baseline")),
)


@dataclass(frozen=True)
class Bench:
    name: str
    # (tree this run measures, the after tree) -> the script's path and arguments
    argv: Callable[[Path, Path], list[str]]
    metrics: tuple[Metric, ...]
    result_name: str | None = None  # which JSON line (by "name"); None: the last


def _own_acq(tree: Path, _after: Path) -> list[str]:
    script = tree / "benchmarks" / "acquisition_scale.py"
    return [str(script), *set_args(script)]


def _same_acq(_tree: Path, after: Path) -> list[str]:
    script = after / "benchmarks" / "acquisition_scale.py"
    return [str(script), *set_args(script)]


def _ingest(stem: str, key: str) -> Callable[[Path, Path], list[str]]:
    return lambda tree, _after: [str(tree / "benchmarks" / f"{stem}.py"), *INGEST_ARGS[key]]


CPU_METRICS = (
    Metric("labdaq writer CPU", "us/row", True, lambda out: out.get("value")),
    Metric("CPU ratio to raw", "x", True, lambda out: out.get("ratio")),
    Metric("raw baseline CPU", "us/row", None, lambda out: out.get("baseline")),
)


def _ingest_cpu(backend: str, rows: int) -> Callable[[Path, Path], list[str]]:
    # The helper is this tree's; what it measures is the other tree's ingest module.
    helper = Path(__file__).resolve().parent / "_ingest_cpu.py"
    return lambda tree, _after: [str(helper), str(tree), backend, "--rows", str(rows)]


BENCHES = (
    Bench("acq10_own", _own_acq, ACQ_METRICS),
    Bench("acq10_same", _same_acq, ACQ_METRICS),
    Bench("ingest_sqlite", _ingest("ingest", "ingest_sqlite"), INGEST_METRICS,
          "sqlite_sample_ingest"),
    Bench("ingest_pg", _ingest("ingest_pg", "ingest_pg"), INGEST_METRICS,
          "pg_sample_ingest"),
    Bench("ingest_cpu_sqlite", _ingest_cpu("sqlite", 200_000), CPU_METRICS,
          "sqlite_ingest_cpu"),
    Bench("ingest_cpu_pg", _ingest_cpu("pg", 100_000), CPU_METRICS, "pg_ingest_cpu"),
)


@dataclass
class Run:
    bench: str
    side: str  # "before" | "after"
    round_no: int
    load_before: list[float]
    load_after: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    out: dict[str, Any] | None = None
    error: str = ""


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_one(bench: Bench, side: str, tree: Path, after: Path, round_no: int,
            pg_url: str | None) -> Run:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    if pg_url:
        env["LABDAQ_BENCH_PG_URL"] = pg_url
    cmd = [str(tree / ".venv" / "bin" / "python"), *bench.argv(tree, after)]
    run = Run(bench.name, side, round_no, loadavg())
    with RunWatch() as watch:
        child = run_limited(cmd, LIMIT_S, env=env, cwd=str(tree),
                            on_start=lambda pid: setattr(watch, "session", pid))
    run.load_after, run.elapsed_s = loadavg(), round(child.elapsed_s, 1)
    lines = child.json_lines()
    if bench.result_name is not None:
        lines = [x for x in lines if x.get("name") == bench.result_name]
    if child.returncode != 0 or not lines or lines[-1].get("value", 0) is None:
        tail = child.stderr.strip().splitlines()[-3:]
        run.error = (f"exit {child.returncode}: " + " | ".join(tail)
                     + (f" | {lines[-1].get('note')}" if lines else ""))
    else:
        run.out = {**lines[-1], **watch.figures()}
    return run


def values(runs: list[Run], bench: Bench, metric: Metric, side: str) -> list[float]:
    got: list[float] = []
    for r in runs:
        if r.bench == bench.name and r.side == side and r.out is not None:
            v = _safe(metric, r.out)
            if v is not None:
                got.append(float(v))
    return got


def fmt(x: float) -> str:
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


def verdict(metric: Metric, before: float, after: float) -> tuple[float | None, str]:
    if before == 0:
        return None, "n/a (before is 0)"
    ratio = after / before
    if metric.lower_is_better is None:
        return ratio, ""
    worse = (ratio > 1 + WORSE_FRACTION if metric.lower_is_better
             else ratio < 1 - WORSE_FRACTION)
    return ratio, "WORSE by more than 10 %" if worse else "within 10 %"


def table(runs: list[Run], benches: list[Bench]) -> str:
    lines = ["| benchmark | metric | before: median (runs) | after: median (runs) | "
             "after/before | verdict |", "|---|---|---|---|---:|---|"]
    for bench in benches:
        for metric in bench.metrics:
            b = values(runs, bench, metric, "before")
            a = values(runs, bench, metric, "after")
            unit = f" {metric.unit}" if metric.unit else ""
            if not b or not a:
                lines.append(f"| {bench.name} | {metric.name}{unit} | "
                             f"{', '.join(map(fmt, b)) or 'none'} | "
                             f"{', '.join(map(fmt, a)) or 'none'} | | no result |")
                continue
            mb, ma = statistics.median(b), statistics.median(a)
            ratio, word = verdict(metric, mb, ma)
            lines.append(
                f"| {bench.name} | {metric.name}{unit} | {fmt(mb)} ({', '.join(map(fmt, b))})"
                f" | {fmt(ma)} ({', '.join(map(fmt, a))}) | "
                f"{'' if ratio is None else f'{ratio:.2f}'} | {word} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("before", type=Path, help="tree before the change (with its .venv)")
    ap.add_argument("after", type=Path, help="tree after the change (with its .venv)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None,
                    help=f"benchmarks to run, of {[b.name for b in BENCHES]}")
    ap.add_argument("--pg-url", default=os.environ.get("LABDAQ_BENCH_PG_URL")
                    or os.environ.get("LABDAQ_TEST_PG_URL"))
    ap.add_argument("--out", type=Path, help="write every run (JSON) here")
    ap.add_argument("--first", choices=["before", "after"], default="before",
                    help="which tree runs first in each pair (a second pass with the other "
                    "first evens out a load that rises or falls through the runs)")
    ap.add_argument("--combine", type=Path, nargs="+", metavar="OUT_JSON",
                    help="run nothing: print the table of the runs saved by earlier --out "
                    "files together (e.g. a pass with each tree first)")
    args = ap.parse_args()
    if args.combine:
        saved = [json.loads(p.read_text()) for p in args.combine]
        got = [Run(**r) for d in saved for r in d["runs"]]
        names = {r.bench for r in got}
        print(f"{len(got)} runs from {', '.join(str(p) for p in args.combine)}\n")
        print(table(got, [b for b in BENCHES if b.name in names]))
        return
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for side, tree in trees.items():
        if not (tree / ".venv" / "bin" / "python").exists():
            ap.error(f"{side} tree {tree} has no .venv (make .venv/.installed-dev there)")
    benches = [b for b in BENCHES if args.only is None or b.name in args.only]
    if not args.pg_url:
        benches = [b for b in benches if b.name not in ("ingest_pg", "ingest_cpu_pg")]
        print("no PostgreSQL URL: ingest_pg and ingest_cpu_pg not run", file=sys.stderr)
    started = dt.datetime.now(dt.UTC)
    load0 = loadavg()
    runs: list[Run] = []
    for round_no in range(1, args.rounds + 1):
        for bench in benches:
            for side in (("before", "after") if args.first == "before"
                         else ("after", "before")):
                r = run_one(bench, side, trees[side], trees["after"], round_no, args.pg_url)
                runs.append(r)
                figures = ", ".join(
                    f"{m.name} {fmt(v)}" for m in bench.metrics
                    if r.out is not None and (v := _safe(m, r.out)) is not None)
                print(f"[{dt.datetime.now(dt.UTC):%H:%M:%S}] round {round_no} {bench.name} "
                      f"{side}: {r.elapsed_s:.0f} s, load {r.load_before} -> "
                      f"{r.load_after}; {figures or r.error}", file=sys.stderr, flush=True)
                if args.out:
                    args.out.write_text(json.dumps(
                        {"trees": {k: str(v) for k, v in trees.items()},
                         "started": started.isoformat(), "runs": [vars(x) for x in runs]},
                        indent=1))
    load1 = loadavg()
    print(f"{started:%Y-%m-%d %H:%M} UTC to {dt.datetime.now(dt.UTC):%H:%M} UTC, "
          f"{args.rounds} rounds alternating, {args.first} first; load average (1/5/15 min) "
          f"{load0} at the start, {load1} at the end; before = {trees['before']}, "
          f"after = {trees['after']}\n")
    print(table(runs, benches))


def _safe(metric: Metric, out: dict[str, Any]) -> float | None:
    try:
        return metric.get(out)
    except (KeyError, IndexError, TypeError):
        return None


if __name__ == "__main__":
    main()
