"""kb.ingestion is pure functions: its tests need neither the database nor Django settings."""

import pytest


@pytest.fixture(autouse=True)
def _isolated_settings():
    """These are pure functions: replace the suite-wide Django settings fixture with nothing."""
