"""Where a live process is waiting, on request, without stopping it.

One job: ``kill -USR1 <pid>`` writes every thread's Python stack to stderr (faulthandler,
at C level, so it answers even while the event loop is blocked); ``kill -USR2 <pid>``
writes every thread's and every asyncio task's (from the loop, so only while the loop
runs). A process that keeps its heartbeat yet makes no progress (a run claimed and never
sampled) shows which await it is stuck on; tests send these before they fail on a timeout.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import sys
from typing import Any


def install(loop: asyncio.AbstractEventLoop) -> None:
    """SIGUSR1: every thread's stack; SIGUSR2: every thread's and every task's."""
    try:
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    except (OSError, ValueError, AttributeError):
        pass  # stderr has no file descriptor (captured in-process): SIGUSR2 still works
    loop.add_signal_handler(signal.SIGUSR2, dump, loop)


def dump(loop: asyncio.AbstractEventLoop) -> None:
    out = sys.stderr
    out.write(f"--- stacks of pid {os.getpid()}: threads ---\n")
    out.flush()
    faulthandler.dump_traceback(file=out, all_threads=True)
    tasks = sorted(asyncio.all_tasks(loop), key=lambda t: t.get_name())
    out.write(f"--- stacks of pid {os.getpid()}: {len(tasks)} asyncio tasks ---\n")
    for task in tasks:
        out.write(f"task {task.get_name()}:\n{_await_chain(task.get_coro())}")
    out.write(f"--- end of stacks of pid {os.getpid()} ---\n")
    out.flush()


def _await_chain(coro: Any) -> str:
    """Each coroutine the task is suspended in, outermost first, down to the awaited
    object (``Task.print_stack`` shows only the outermost frame of a coroutine)."""
    lines = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            lines.append(f"  awaiting {coro!r}")
            break
        code = frame.f_code
        lines.append(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}')
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return "\n".join(lines) + "\n"
