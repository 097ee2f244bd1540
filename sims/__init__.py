"""Simulated instruments and cell physics (installed as ``labdaq.sims``)."""
