"""Run every benchmark, print a table of ratios and write it into README.md.

Usage: python benchmarks/run_all.py [--quick] [--no-readme] [--only NAME ...]

Each benchmark runs in its own process with a time limit (``LIMIT_S``), so ``make bench``
always ends; the table says how long each took, and its header the date, the machine's
load average before and after (the 2 cores are shared) and the total time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _child import run_limited  # noqa: E402

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
# Seconds each benchmark may take at most (make bench's budget is 10 minutes in all;
# acquisition_scale plans for 6). A benchmark past its limit is stopped and reported as
# an error row.
LIMIT_S = {"acquisition_scale": 400.0, "export": 300.0, "api_latency": 240.0,
           # Three rounds of two 250k-row ingests, each in a fresh database: ~40 s quiet,
           # 160 s at load average 27.
           "ingest_pg": 240.0}
DEFAULT_LIMIT_S = 150.0


def run(script: Path, quick: bool, log_dir: Path) -> tuple[list[dict], float]:
    cmd = [sys.executable, str(script)] + (["--quick"] if quick else [])
    child = run_limited(cmd, LIMIT_S.get(script.stem, DEFAULT_LIMIT_S))
    stderr = child.stderr
    rc = child.returncode
    elapsed = child.elapsed_s
    # Each benchmark's own account (every window, every step) is kept: the table holds
    # only the figures, and a surprising figure needs the lines behind it.
    (log_dir / f"{script.stem}.log").write_text(stderr)
    results = child.json_lines()
    if rc != 0 or not results:
        results.append(
            {
                "name": script.stem,
                "value": None,
                "unit": "error",
                "baseline": None,
                "ratio": None,
                "note": stderr.strip().splitlines()[-1:],
            }
        )
    for r in results:
        r.setdefault("seconds", round(elapsed))
    return results, elapsed


def table(results: list[dict]) -> str:
    lines = ["| benchmark | value | unit | baseline | ratio | s | note |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['value']} | {r['unit']} | {r.get('baseline')} | "
            f"{r.get('ratio')} | {r.get('seconds', '')} | {r.get('note', '')} |"
        )
    heads = [f"- **{r['name']}**: {r['headline']}" for r in results if r.get("headline")]
    if heads:
        lines += ["", *heads]
    return "\n".join(lines)


def _busy_fraction(window_s: float = 1.0) -> float:
    """How busy the machine's CPUs were over ``window_s`` (0..1), from /proc/stat."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(window_s)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def settle(max_wait_s: float = 60.0, busy_below: float = 0.15) -> str:
    """Wait until what the previous benchmark left behind (its children's exit, the
    database's checkpoints and vacuum, the OS freeing its files) has died down, so each
    benchmark starts on the machine as it is, not on its predecessor's tail."""
    t0 = time.perf_counter()
    busy = 1.0
    while time.perf_counter() - t0 < max_wait_s:
        busy = _busy_fraction()
        if busy < busy_below:
            break
    return f"settled in {time.perf_counter() - t0:.0f} s (machine {100 * busy:.0f} % busy)"


def loadavg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


#: Benchmarks run by hand (their docstrings say how), not by `make bench`.
BY_HAND = {"audit_chain", "before_after", "sim_logging", "writer_pace"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="benchmark names (file stems)")
    args = ap.parse_args()
    # Helpers start with "_"; acq_*.py are acquisition_scale.py's parts, not benchmarks.
    scripts = sorted(p for p in HERE.glob("*.py")
                     if not p.name.startswith(("_", "run_all", "acq_")) and p.stem not in BY_HAND)
    if args.only:
        scripts = [p for p in scripts if p.stem in args.only]
    results: list[dict] = []
    log_dir = Path(tempfile.gettempdir()) / "labdaq-bench-logs"
    log_dir.mkdir(exist_ok=True)
    print(f"logs in {log_dir}", file=sys.stderr, flush=True)
    started = dt.datetime.now(dt.UTC)
    load0 = loadavg()
    t0 = time.perf_counter()
    for s in scripts:
        if Path("/proc/stat").exists():
            print(settle(), file=sys.stderr, flush=True)
        print(f"running {s.name} ...", file=sys.stderr, flush=True)
        got, elapsed = run(s, args.quick, log_dir)
        results += got
        print(f"  {s.stem}: {elapsed:.0f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - t0
    load1 = loadavg()
    text = table(results)
    print(text)
    print(f"total {total:.0f} s; load average {load0} before, {load1} after", file=sys.stderr)
    if not args.no_readme and README.exists() and not args.only:
        acq = next((r for r in results if r["name"] == "engine_lossless_channel_samples"),
                   None)
        lossless = (
            f" The acquisition headline is the largest rate stored with **zero** missed "
            f"sample periods: {acq['value']:,.0f} channel-samples/s."
            if acq and acq.get("value") is not None else "")
        stamp = (
            f"Measured {started:%Y-%m-%d %H:%M} UTC by `make bench` on {platform.machine()} "
            f"({os.cpu_count()} cores, shared with other work), Python "
            f"{platform.python_version()}{' (--quick)' if args.quick else ''}, in "
            f"{total / 60:.1f} min; load average (1/5/15 min) {load0} before, {load1} "
            f"after.{lossless}\n\n"
        )
        body = README.read_text()
        if START in body and END in body:
            head, rest = body.split(START, 1)
            _, tail = rest.split(END, 1)
            README.write_text(f"{head}{START}\n{stamp}{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
