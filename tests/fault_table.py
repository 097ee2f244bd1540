"""Print the fault campaign's table from its JSON lines and write it into the README.

Usage: python -m tests.fault_table REPORT.jsonl [--readme]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- faults:start -->", "<!-- faults:end -->"


def table(rows: list[dict]) -> str:
    def opt(v: float | int | None, fmt: str = "{}") -> str:
        return "n/a" if v is None else fmt.format(v)

    out = [
        "| scenario | faults | committed samples lost | duplicates | runs resumed "
        "| missed periods recorded | RSS growth | time to recover (max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['scenario']} | {r['faults']} | {r['lost']} | {r['duplicates']} "
            f"| {r['runs_resumed']}/{r['runs']} | {opt(r['missed_periods'])} "
            f"| {opt(r['rss_growth_mb'], '{:.1f} MB')} | {opt(r['recover_max_s'], '{:.1f} s')} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("report", type=Path)
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = ap.parse_args()
    rows = [json.loads(x) for x in args.report.read_text().splitlines() if x.strip()]
    text = table(rows)
    print(text)
    if args.readme:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        block = (f"{START}\n_`make faults` on {dt.date.today().isoformat()}, load average "
                 f"at the end {load}:_\n\n{text}\n{END}")
        readme = README.read_text()
        head, _, rest = readme.partition(START)
        _, _, tail = rest.partition(END)
        README.write_text(head + block + tail)


if __name__ == "__main__":
    main()
