"""The pytest plugin (entry point ``pytest11: memplug``): fixtures for testing memplug plugins."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def memplug_home(tmp_path_factory) -> Path:
    """A memplug home for the test session: ``MEMPLUG_HOME`` if set, else a temporary folder."""
    home = os.environ.get("MEMPLUG_HOME")
    return Path(home) if home else tmp_path_factory.mktemp("memplug-home")


@pytest.fixture(scope="session")
def memplug_dsn(memplug_home) -> str:
    """``MEMPLUG_TEST_DSN`` if set, else the session's embedded Postgres (started on first use)."""
    dsn = os.environ.get("MEMPLUG_TEST_DSN")
    if dsn:
        return dsn
    from memplug.embedded import embedded_dsn

    return embedded_dsn(memplug_home)


@pytest.fixture
def memplug_user() -> str:
    """A user id no other test uses."""
    return "t" + uuid.uuid4().hex[:12]
