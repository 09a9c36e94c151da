"""The framework examples: adding memplug is at most five lines, and it personalises.

Each example runs on the real local model, before and after; only the after version
knows each user's cat, and each user gets their own.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"example_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("example", ["langchain_agent", "llamaindex_chat"])
def test_example_adds_memplug_in_five_lines_and_personalises(example):
    pytest.importorskip("langchain" if example.startswith("langchain") else "llama_index.core")
    before, after = (EXAMPLES / example / f"{n}.py" for n in ("before", "after"))
    diff = difflib.unified_diff(before.read_text().splitlines(), after.read_text().splitlines(), lineterm="")
    added = [line for line in diff if line.startswith("+") and not line.startswith("+++")]
    assert len(added) <= 5, added

    plain = load(before).main()
    assert not any(name in reply for reply in plain.values() for name in ("Pepper", "Socks")), plain
    personal = load(after).main()
    assert "Pepper" in personal["alice"] and "Socks" not in personal["alice"], personal
    assert "Socks" in personal["bob"] and "Pepper" not in personal["bob"], personal
