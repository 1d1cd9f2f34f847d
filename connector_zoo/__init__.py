"""Shared plumbing of connector-zoo: the registry mechanism and file helpers (no model code)."""

__version__ = "0.1.0"
