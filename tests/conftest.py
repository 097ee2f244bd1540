"""Shared pytest configuration. Fixture modules are loaded as plugins to keep this short."""

pytest_plugins = ["tests.db_fixtures"]
