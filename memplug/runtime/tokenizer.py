"""Token counting with the local model's real tokenizer.

The first use converts the tokenizer (from the packaged GGUF, or from
``MEMPLUG_MODEL``) to a ``tokenizer.json`` under ``$MEMPLUG_HOME/models``;
later loads read that file with the ``tokenizers`` library in about 0.1 s and
never touch torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..artifacts import write_atomic
from ..errors import ModelUnavailable
from .model_files import cache_dir, packaged_gguf


class TokenCounter:
    """Counts tokens as the local model sees them."""

    def __init__(self, tokenizer_json: Path):
        from tokenizers import Tokenizer

        self.path = Path(tokenizer_json)
        self._tok = Tokenizer.from_file(str(self.path))

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def count_many(self, texts: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]


def load_token_counter(home: Path, model: str | None = None) -> TokenCounter:
    target = cache_dir(home, model) / "tokenizer.json"
    if not target.is_file():
        _convert(target, model)
    return TokenCounter(target)


def _convert(target: Path, model: str | None) -> None:
    if model and (Path(model) / "tokenizer.json").is_file():
        source = Path(model) / "tokenizer.json"
        write_atomic(target, source.read_bytes())
        return
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        if model:
            tok = AutoTokenizer.from_pretrained(model)
        else:
            gguf = packaged_gguf()
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ModelUnavailable:
        raise
    except Exception as e:
        raise ModelUnavailable(f"could not load the tokenizer of {model or 'the packaged SmolLM2'}: {e}") from e
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None:
        raise ModelUnavailable(f"the tokenizer of {model!r} has no fast (tokenizers) backend")
    write_atomic(target, backend.to_str().encode())
