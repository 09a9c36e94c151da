"""Encoding explicit memory: an item's attention key/values as the local model reads it, and checks.

:func:`encode` reads each item's text right after the model's memory preamble
(:meth:`memplug.runtime.LocalModel.after_preamble`) and keeps its keys and
values, keys rotated to position 0, so that the runtime can inject them at any
offset. With token selection (``kv_keep`` below 1) each token is scored by the
attention it receives from an observation window after it (a generic question,
as in SnapKV) and only the best-scored fraction is kept (:func:`thin`).
:func:`verify` checks that an item's decoded KV still leads the model to the
item's key word where its text does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from memplug.runtime import KVChunk, anchor, cloze_prefix

# The observation window that scores a chunk's tokens for selection: what a reader will ask.
PROBE = "What do these memories say about the person, and what is the answer?"


def encode(model: Any, texts: Sequence[str], item_ids: Sequence[int] | None = None, scores: bool = True,
           batch_size: int = 8) -> list[KVChunk]:
    """Each text's keys/values as encoded after the preamble, keys rotated to position 0.

    With ``scores``, each token is also scored for token selection, by the
    attention it receives from the observation window placed after the chunk
    (the closing template and :data:`PROBE`), averaged over layers, heads and
    window tokens. The window only reads the chunk: it changes none of the
    chunk's keys or values.
    """
    item_ids = list(item_ids) if item_ids is not None else list(range(len(texts)))
    probe = model.ids(model.layout(PROBE)[1]) if scores else []
    chunks = [model.chunk_ids(t) for t in texts]
    read = model.after_preamble([c + probe for c in chunks], attention=scores, batch_size=batch_size)
    out = []
    for item_id, ids, (keys, values, paid) in zip(item_ids, chunks, read, strict=True):
        m = len(ids)
        received = paid[m:, :m].mean(dim=0) if scores else None
        out.append(KVChunk(int(item_id), m, keys[:, :, :m].contiguous(), values[:, :, :m].contiguous(), received,
                           ids=torch.tensor(ids, dtype=torch.int32)))
    return out


def select_tokens(scores: torch.Tensor, keep: float, protect_first: int = 1, protect_last: int = 1) -> torch.Tensor:
    """Indices (sorted) of the tokens to keep: the highest-scoring ``keep`` fraction.

    The first and last tokens of a chunk are always kept: the first is where
    attention pools when the chunk is read (an attention sink), the last is the
    separator the next chunk follows.
    """
    n = int(scores.shape[0])
    want = max(1, min(n, round(n * keep)))
    protected = set(range(min(protect_first, n))) | set(range(max(0, n - protect_last), n))
    ranked = [int(i) for i in torch.argsort(scores, descending=True, stable=True)]
    chosen = list(protected)
    for i in ranked:
        if len(chosen) >= max(want, len(protected)):
            break
        if i not in protected:
            chosen.append(i)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def thin(chunk: KVChunk, keep: float) -> KVChunk:
    """The chunk with only its highest-scoring ``keep`` fraction of tokens (span unchanged)."""
    if keep >= 1.0 or chunk.scores is None:
        return chunk
    idx = select_tokens(chunk.scores, keep)
    positions = chunk.positions if chunk.positions is not None else torch.arange(chunk.stored_tokens)
    return KVChunk(chunk.item_id, chunk.span, chunk.keys[:, :, idx].contiguous(),
                   chunk.values[:, :, idx].contiguous(), chunk.scores[idx],
                   ids=None if chunk.ids is None else chunk.ids[idx], positions=positions[idx].to(torch.int32))




def verify(model, texts, served, batch_size: int = 32) -> list[tuple[int, int]]:
    """(text score, KV score) per item, each 0 or 1: asked what it knows about the item's subject,
    its answer begun with the item up to the item's key word, whether the local model goes on with
    that word (greedy), given the item as text, then given ``served`` (the item's decoded KV) instead.

    One forward pass per side, no decoding. An item with no key word, or whose key word has fewer
    than two words before it, scores (0, 0).
    """
    rows, per_row, want, owners = [], [], [], []
    as_text: list = []  # one shared (empty) chunk list: text rows share one prefix
    for k, (text, chunk) in enumerate(zip(texts, served, strict=True)):
        statement = " ".join(text.split())
        prefix = cloze_prefix(statement)
        if not prefix:
            continue
        head, full = model.ids(prefix), model.ids(statement)
        if len(full) <= len(head) or full[:len(head)] != head:
            continue
        closing = model.ids(model.layout(f"What do you know about {anchor(statement)}?")[1])
        rows += [model.ids(model.chunk_text(text)) + closing + head, closing + head]
        per_row += [as_text, [chunk]]
        want += [full[len(head)]] * 2
        owners += [(k, 0), (k, 1)]
    scores = [[0, 0] for _ in texts]
    for start in range(0, len(rows), batch_size):
        part = slice(start, start + batch_size)
        steps = model.decode([], rows[part], 1, per_row_chunks=per_row[part])
        try:
            first = next(iter(steps)).tolist()
        finally:
            steps.close()  # the model is held until the generator ends
        for (k, side), token, got in zip(owners[part], want[part], first, strict=True):
            scores[k][side] += got == token
    return [(t, v) for t, v in scores]
