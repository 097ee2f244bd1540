"""Run every benchmark, print a table of ratios and write it into README.md.

Usage: python benchmarks/run_all.py [--quick] [--no-readme]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def run(script: Path, quick: bool, log_dir: Path) -> list[dict]:
    cmd = [sys.executable, str(script)] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    # Each benchmark's own account (every window, every step) is kept: the table holds
    # only the figures, and a surprising figure needs the lines behind it.
    (log_dir / f"{script.stem}.log").write_text(proc.stderr)
    results = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if proc.returncode != 0 or not results:
        results.append(
            {
                "name": script.stem,
                "value": None,
                "unit": "error",
                "baseline": None,
                "ratio": None,
                "note": proc.stderr.strip().splitlines()[-1:],
            }
        )
    return results


def table(results: list[dict]) -> str:
    lines = ["| benchmark | value | unit | baseline | ratio | note |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['value']} | {r['unit']} | {r.get('baseline')} | "
            f"{r.get('ratio')} | {r.get('note', '')} |"
        )
    heads = [f"- **{r['name']}**: {r['headline']}" for r in results if r.get("headline")]
    if heads:
        lines += ["", *heads]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    scripts = sorted(p for p in HERE.glob("*.py") if not p.name.startswith(("_", "run_all")))
    results: list[dict] = []
    log_dir = Path(tempfile.gettempdir()) / "labdaq-bench-logs"
    log_dir.mkdir(exist_ok=True)
    print(f"logs in {log_dir}", file=sys.stderr, flush=True)
    for s in scripts:
        print(f"running {s.name} ...", file=sys.stderr, flush=True)
        results += run(s, args.quick, log_dir)
    text = table(results)
    print(text)
    if not args.no_readme and README.exists():
        stamp = (
            f"Measured {dt.date.today().isoformat()} by `make bench` on {platform.machine()}, "
            f"Python {platform.python_version()}{' (--quick)' if args.quick else ''}:\n\n"
        )
        body = README.read_text()
        if START in body and END in body:
            head, rest = body.split(START, 1)
            _, tail = rest.split(END, 1)
            README.write_text(f"{head}{START}\n{stamp}{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
