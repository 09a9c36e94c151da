"""Attention key/values of memory chunks, and their exact rotary re-rotation.

A chunk's keys are stored "at position 0": token ``i`` of the chunk carries the
rotation of position ``i``. Rotary embeddings compose (R(a)·R(b) = R(a+b)), so
placing the chunk at offset ``o`` is one rotation of every key by ``o``, and a
chunk whose tokens were thinned out keeps each survivor's own rotation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class KVChunk:
    """One memory item's keys and values, for every layer: tensors of shape
    (layers, kv_heads, stored_tokens, head_dim), keys rotated to position 0.

    ``span`` is how many positions the item occupies in the prompt; it exceeds
    ``stored_tokens`` when token selection dropped some of them.
    """

    item_id: int
    span: int
    keys: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor | None = None  # per token: attention it received while encoded

    @property
    def stored_tokens(self) -> int:
        return int(self.keys.shape[2])


def rotate(keys: torch.Tensor, offset: int | torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate rotary-embedded keys (..., tokens, head_dim) by ``offset`` positions ("rotate half" layout).

    ``offset`` is one int, or a tensor with one offset per token. Angles are
    computed in float64 so that rotating away and back is exact to the
    precision of the keys' dtype.
    """
    if isinstance(offset, int) and offset == 0:
        return keys.clone()
    offsets = torch.as_tensor(offset, dtype=torch.float64, device=keys.device).reshape(-1, 1)
    angles = offsets * inv_freq.to(dtype=torch.float64, device=keys.device)  # (tokens or 1, head_dim / 2)
    cos = angles.cos().to(keys.dtype)
    sin = angles.sin().to(keys.dtype)
    half = keys.shape[-1] // 2
    first, second = keys[..., :half], keys[..., half:]
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), written in place into one new tensor.
    out = torch.empty_like(keys)
    torch.mul(first, cos, out=out[..., :half])
    out[..., :half].addcmul_(second, sin, value=-1)
    torch.mul(second, cos, out=out[..., half:])
    out[..., half:].addcmul_(first, sin)
    return out


def stack_prefix(parts: list[tuple[torch.Tensor, torch.Tensor, int]], inv_freq: torch.Tensor,
                 dtype: torch.dtype, device: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Concatenate (keys, values, span) parts in order, each key rotated to its offset.

    Returns new tensors (never views of the inputs) and the next free position.
    All parts are rotated in one vectorised pass, with one offset per token.
    """
    offsets, start = [], 0
    for k, _, span in parts:
        offsets.append(torch.full((k.shape[2],), start, dtype=torch.float64))
        start += span
    keys = torch.cat([k for k, _, _ in parts], dim=2).to(device=device, dtype=torch.float32)
    keys = rotate(keys, torch.cat(offsets).to(device), inv_freq).to(dtype)
    values = torch.cat([v for _, v, _ in parts], dim=2).to(device=device, dtype=dtype)
    return keys, values, start
