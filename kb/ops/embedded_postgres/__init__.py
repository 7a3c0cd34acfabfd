"""A Django database engine for the embedded PostgreSQL server (see kb.ops.database)."""
