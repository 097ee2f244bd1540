"""Keep the API's start-up heap out of Python's full garbage collections.

The API process starts with a large heap of GC-tracked objects (FastAPI, pydantic,
SQLAlchemy, pyarrow, the routes and their schemas) that live as long as the process. A
full (generation 2) collection walks all of them, and in CPython it holds the GIL while
it does, so the event loop and every worker thread stand still meanwhile, and every
request that arrives waits (docs/performance.md, "API latency: stalls").

:func:`freeze_startup_heap` runs once the application has started (its lifespan, after the
routes, database engines and pools exist): one collection to drop start-up garbage, then
``gc.freeze()`` moves every surviving object to the permanent generation, which later
collections do not walk. Objects the process makes afterwards are collected as before;
only the start-up heap, which would never become garbage anyway, is left alone.

Only for the API's own process (``labdaq api``, which ``labdaq serve`` runs):
``create_app`` does it when asked, so tests that build many apps in one process do not
freeze each other's garbage.
"""

from __future__ import annotations

import gc
import logging

_log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect, then freeze what is left; returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    _log.info("start-up heap frozen", extra={"gc_frozen_objects": frozen})
    return frozen
