"""The local models and what drives them: the embedder, the tokenizer and the causal LM.

:class:`LocalModel` generates with the memories of a :class:`~memplug.Recall`:
text hits go into the prompt, explicit memory (:class:`KVChunk` values from a
:class:`~memplug.KVPrefix`) is injected into attention at its offset
(:class:`PackedKV`, :func:`assemble`, :func:`rotate`), and a scope's LoRA adapter
(:class:`~memplug.AdapterRef`) is loaded into a slot and applied. Those are
the extension points the kv and lora tiers build on; the tiers own how
their memory is made (encoding, training).

Importing this package loads no torch or transformers: names are resolved on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines it (relative to this package)
_EXPORTS = {
    "Embedder": "embedder",
    "TokenCounter": "tokenizer", "load_token_counter": "tokenizer",
    "LocalModel": "chat", "chat_messages": "prompt",
    "KVChunk": "kv", "PackedKV": "kv", "rotate": "kv", "assemble": "kv", "dequantize": "kv",
    "pack_codes": "kv", "unpack_codes": "kv",
    "load_model": "model", "fresh_model": "model", "loaded": "model", "model_cache_dir": "model",
    "run_in_child": "child", "ChildFailed": "child", "child_available": "child",
    "STOPWORDS": "statements", "words": "statements", "stem": "statements", "stems": "statements",
    "content_words": "statements", "answer_key": "statements", "without_value": "statements",
    "anchor": "statements", "contains_word": "statements", "recalled": "statements",
    "cloze_prefix": "statements",
}
_ALIASES = {"model_cache_dir": "cache_dir", "run_in_child": "call", "child_available": "available"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memplug.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
