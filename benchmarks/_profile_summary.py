"""Where the engine's event loop spends its time, from a py-spy profile of a benchmark.

One job: read py-spy's raw (collapsed-stack) output of the process that runs the
AcquisitionNode and print shares of its main thread's samples: by task, by the frame
under ``InstrumentGroup._loop``, and under any function named with ``--under``.
Not a benchmark (``run_all`` skips files starting with ``_``). Used for
docs/performance.md::

    py-spy record -o prof.txt -f raw -r 250 --threads -- \\
        python benchmarks/acquisition_scale.py --set start_cabinets=4 --set max_cabinets=4 \\
        --set budget_s=1 --set min_channels=64 --set bare_s=2
    python benchmarks/_profile_summary.py prof.txt --under InstrumentGroup._measure
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_PATH = re.compile(r" \(.*?(labdaq/|asyncio/|site-packages/|python3\.\d+/)")


def stacks(path: Path) -> list[tuple[list[str], int]]:
    """Main-thread stacks (outermost first, file paths shortened) with their counts."""
    out = []
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if stack and "MainThread" in frames[0]:
            out.append(([_PATH.sub(r" (\1", f) for f in frames[1:]], int(n)))
    return out


def names(frames: list[str]) -> list[str]:
    return [f.split(" (")[0] for f in frames]


def show(title: str, counts: Counter[str], total: int, top: int = 15) -> None:
    print(f"--- {title} ({total} samples)")
    for key, n in counts.most_common(top):
        print(f"{100 * n / max(total, 1):5.1f} %  {key}")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("profile", type=Path, help="py-spy record -f raw output")
    ap.add_argument("--under", action="append", default=[],
                    help="also break down the frames under this function (repeatable)")
    ap.add_argument("--depth", type=int, default=2)
    args = ap.parse_args()
    data = stacks(args.profile)
    total = sum(n for _, n in data)
    tasks: Counter[str] = Counter()
    loop: Counter[str] = Counter()
    in_loop = 0
    for frames, n in data:
        fn = names(frames)
        if "Handle._run" in fn:
            k = len(fn) - 1 - fn[::-1].index("Handle._run")
            tasks[fn[k + 1] if k + 1 < len(fn) else "Handle._run"] += n
        else:
            tasks[f"(event loop itself) {fn[-1] if fn else ''}"] += n
        if "InstrumentGroup._loop" in fn:
            in_loop += n
            i = fn.index("InstrumentGroup._loop")
            if i + 1 < len(fn) and fn[i + 1] == "InstrumentGroup._tick":
                loop[frames[i + 2] if i + 2 < len(frames) else "_tick itself"] += n
            else:
                loop[f"loop: {frames[i + 1] if i + 1 < len(frames) else 'itself'}"] += n
    show("main thread by task", tasks, total)
    show("InstrumentGroup._loop by the frame under it (share of the loop)", loop, in_loop)
    for target in args.under:
        sub: Counter[str] = Counter()
        t = 0
        for frames, n in data:
            fn = names(frames)
            if target in fn:
                i = fn.index(target)
                t += n
                sub[" > ".join(frames[i + 1: i + 1 + args.depth]) or "itself"] += n
        show(f"under {target}", sub, t)


if __name__ == "__main__":
    main()
