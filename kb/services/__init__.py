"""Writes of the core domain, one module per entity; see docs/ARCHITECTURE.md."""
