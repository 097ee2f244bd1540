"""Shared India–Canada test benchmarks: the clause catalogue (seeds/benchmarks/*.yaml) and
its schema. Evaluation of runs against it is planned; see docs/benchmarks.md."""

from labdaq.benchmarks.catalogue import (
    METRICS,
    Catalogue,
    CatalogueError,
    Entry,
    load_catalogue,
)

__all__ = ["METRICS", "Catalogue", "CatalogueError", "Entry", "load_catalogue"]
