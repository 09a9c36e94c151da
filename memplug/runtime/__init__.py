"""Local models, loaded lazily: the embedder, the tokenizer and (for kv and lora) the causal LM.

Nothing here imports torch or transformers at import time.
"""

from .embedder import Embedder
from .tokenizer import TokenCounter, load_token_counter

__all__ = ["Embedder", "TokenCounter", "load_token_counter"]
