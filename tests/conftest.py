"""Test set-up: one real embedded Postgres per test session, in a temporary folder.

Each test works in scopes of its own (fresh user ids), so tests share the server
without seeing each other's data. Installed third-party plugins are kept out:
only the built-in tiers load, plus whatever a test registers itself.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="memplug-test-"))
os.environ["MEMPLUG_HOME"] = str(_HOME)
os.environ["MEMPLUG_PLUGINS"] = "context,pgvector"
os.environ.pop("MEMPLUG_DSN", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The tokenizer conversion (about 8 s) is cached outside the per-run home when possible.
_MODEL_CACHE = Path(os.environ.get("MEMPLUG_TEST_MODEL_CACHE", Path(tempfile.gettempdir()) / "memplug-test-models"))


def pytest_configure(config):
    _MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    (_HOME / "models").symlink_to(_MODEL_CACHE, target_is_directory=True)


def pytest_unconfigure(config):
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def dsn() -> str:
    """DSN of the session's embedded Postgres (started on first use, stopped at exit)."""
    from memplug.embedded import embedded_dsn

    return embedded_dsn(_HOME)


@pytest.fixture
def memory(dsn):
    from memplug import Memory

    with Memory(dsn) as mem:
        yield mem


@pytest.fixture
def make_memory(dsn):
    """Build extra Memory instances (other options or plugins); all closed after the test."""
    from memplug import Memory

    made = []

    def make(**kwargs):
        mem = Memory(dsn, **kwargs)
        made.append(mem)
        return mem

    yield make
    for mem in made:
        mem.close()


@pytest.fixture
def user() -> str:
    """A user id no other test uses."""
    return "u" + uuid.uuid4().hex[:12]


@pytest.fixture
def users():
    def make(n: int) -> list[str]:
        return ["u" + uuid.uuid4().hex[:12] for _ in range(n)]

    return make
