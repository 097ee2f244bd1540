"""Seed data (YAML) shipped as package data; read with importlib.resources."""
