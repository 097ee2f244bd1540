"""Shared pytest configuration. Fixture modules are loaded as plugins to keep this short."""

pytest_plugins = ["tests.db_fixtures"]

# --- simulator/driver fixtures (sims + drivers owner) ---
pytest_plugins += ["tests.sim_fixtures"]
# --- end simulator/driver fixtures ---
