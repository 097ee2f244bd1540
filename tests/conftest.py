"""Shared pytest configuration. Fixture modules are loaded as plugins to keep this short."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.db_fixtures"]

# --- simulator/driver fixtures (sims + drivers owner) ---
pytest_plugins += ["tests.sim_fixtures"]
# --- end simulator/driver fixtures ---

# Per-test limit for tests marked slow (the default for the others is `timeout` in
# pyproject.toml). A limit only stops a hung test; none of them is a performance bound.
SLOW_TEST_TIMEOUT_S = 900


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT_S))
