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


# The longest runs on the real SmolLM2 (minutes each on a 2-core CPU) are left to `make test-all`; every
# tier keeps tests on the real Postgres and models in the default suite (the lora tier: its conformance
# round trip and forget scan, the training lock, and the vLLM test's two trainings).
SLOW = {
    "tests/test_conformance.py::TestLoraTier::test_concurrent_writers",
    "tests/test_conformance.py::TestLoraTier::test_scopes_never_see_each_other",
    "tests/test_conformance.py::TestLoraTier::test_bad_input_changes_nothing",
    "tests/test_conformance.py::TestLoraTier::test_moves_in_and_out",
    "tests/test_lora_tier.py::test_adapter_trains_applies_isolates_and_forgets",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW:
            item.add_marker(pytest.mark.slow)


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


TINY_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def tiny_parts():
    """A tiny Llama built from a config, with the real SmolLM2 tokenizer and a ChatML template:
    the model's shapes and mechanics without its weights (a module deep-copies the model to change it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from memplug.runtime.tokenizer import load_token_counter
    from memplug.settings import Settings

    counter = load_token_counter(Settings().home)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(counter.path), eos_token="<|im_end|>",
                                  pad_token="<|im_end|>")
    tok.chat_template = TINY_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval(), tok
