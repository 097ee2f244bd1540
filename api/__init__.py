"""HTTP API and dashboard (installed as ``labdaq.api``)."""
