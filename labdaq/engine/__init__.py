"""Acquisition engine: scheduler, channel workers, safety checks, batched sample writer."""
