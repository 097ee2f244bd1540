"""Instrument drivers and transports (installed as ``labdaq.drivers``)."""
