"""Attention key/values of memory chunks, as stored and as injected, and their exact rotary re-rotation.

A chunk's keys are stored "at position 0": token ``i`` of the chunk carries the
rotation of position ``i``. Rotary embeddings compose (R(a)·R(b) = R(a+b)), so
placing the chunk at offset ``o`` is one rotation of every key by ``o``, and a
chunk whose tokens were thinned out keeps each survivor's own rotation.

A :class:`PackedKV` holds several items' key/values as a tier stores them
(integer codes with a scale and minimum per group of channels, or a float
cast). :func:`assemble` moves one to the model's device as it is stored and
de-quantizes and re-rotates every token of every item there in one batched
step: the host does no per-element work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import accumulate
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
    ids: torch.Tensor | None = None  # per stored token: its token id
    positions: torch.Tensor | None = None  # per stored token: its position in the item (None: 0, 1, 2...)

    @property
    def stored_tokens(self) -> int:
        return int(self.keys.shape[2])


def rotate(keys: torch.Tensor, offset: int | torch.Tensor, inv_freq: torch.Tensor,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate rotary-embedded keys (..., tokens, head_dim) by ``offset`` positions ("rotate half" layout).

    ``offset`` is one int, or a tensor with one offset per token. Angles are
    computed in float64 so that rotating away and back is exact to the
    precision of the keys' dtype. ``out`` (of the keys' shape and dtype, any
    strides) receives the result instead of a new tensor.
    """
    if isinstance(offset, int) and offset == 0:
        return keys.clone() if out is None else out.copy_(keys)
    offsets = torch.as_tensor(offset, dtype=torch.float64, device=keys.device).reshape(-1, 1)
    angles = offsets * inv_freq.to(dtype=torch.float64, device=keys.device)  # (tokens or 1, head_dim / 2)
    cos = angles.cos().to(keys.dtype)
    sin = angles.sin().to(keys.dtype)
    half = keys.shape[-1] // 2
    first, second = keys[..., :half], keys[..., half:]
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), written into one tensor.
    out = torch.empty_like(keys) if out is None else out
    torch.mul(first, cos, out=out[..., :half])
    out[..., :half].addcmul_(second, sin, value=-1)
    torch.mul(second, cos, out=out[..., half:])
    out[..., half:].addcmul_(first, sin)
    return out


# -- stored KV of several items, as stored ----------------------------------------------------------

BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4, "int3": 3, "int2": 2}
FLOAT_CODECS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class PackedKV:
    """The stored key/values of several items in one set of tensors, still compressed.

    ``keys`` and ``values`` map part names to tensors whose third axis is the
    token: ``{"data"}`` for the float codecs (``fp32``, ``fp16``, ``bf16``), or
    ``{"q", "scale", "min"}`` for the integer ones (codes packed ``bits`` per
    value, and an fp16 scale and minimum per ``group`` channels). Item ``k``
    owns stored tokens ``starts[k]`` to ``starts[k] + counts[k]`` and occupies
    ``spans[k]`` positions in a prompt. ``positions`` holds each stored token's
    position inside its item (token selection leaves gaps), ``ids`` its token id
    (what a repair recomputes); either may be None.

    The tensors move to a device as they are: integer codes travel compressed
    and :meth:`dequantize` expands them where they are, in one step for every
    item. Nothing modifies the tensors in place; :meth:`select` and
    :meth:`concat` build new ones.
    """

    codec: str
    group: int
    head_dim: int
    keys: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    item_ids: tuple[int, ...]
    starts: tuple[int, ...]
    counts: tuple[int, ...]
    spans: tuple[int, ...]
    positions: torch.Tensor | None = None
    ids: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        """Stored tokens."""
        return sum(self.counts)

    @property
    def nbytes(self) -> int:
        parts = [*self.keys.values(), *self.values.values(), self.positions, self.ids]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def device(self) -> torch.device:
        return next(iter(self.keys.values())).device

    @classmethod
    def from_chunks(cls, chunks: Sequence[KVChunk]) -> PackedKV:
        """Float32 chunks as one uncompressed pack (``codec="fp32"``)."""
        if not chunks:
            raise ValueError("no chunks to pack")
        counts = tuple(c.stored_tokens for c in chunks)
        starts = _starts(counts)
        positions = torch.cat([c.positions if c.positions is not None else torch.arange(c.stored_tokens)
                               for c in chunks]).to(torch.int32)
        ids = (torch.cat([c.ids for c in chunks]).to(torch.int32)
               if all(c.ids is not None for c in chunks) else None)
        return cls("fp32", 0, int(chunks[0].keys.shape[-1]),
                   {"data": torch.cat([c.keys.float() for c in chunks], dim=2)},
                   {"data": torch.cat([c.values.float() for c in chunks], dim=2)},
                   tuple(c.item_id for c in chunks), starts, counts, tuple(c.span for c in chunks), positions, ids)

    def select(self, item_ids: Sequence[int]) -> PackedKV:
        """A pack of these items only, in this order (each must be in this pack), in new tensors."""
        where = {i: k for k, i in enumerate(self.item_ids)}
        missing = [i for i in item_ids if i not in where]
        if missing:
            raise KeyError(f"items {missing} are not in this pack")
        picked = [where[i] for i in item_ids]
        ranges = [(self.starts[k], self.starts[k] + self.counts[k]) for k in picked]
        # Slices joined, not index_select: items are runs of tokens, and copying runs is a memcpy each.

        def take(t, dim):
            if not ranges:
                return t.narrow(dim, 0, 0).clone()
            return torch.cat([t.narrow(dim, a, b - a) for a, b in ranges], dim=dim)

        counts = tuple(self.counts[k] for k in picked)
        starts = _starts(counts)
        return replace(self, keys={n: take(t, 2) for n, t in self.keys.items()},
                       values={n: take(t, 2) for n, t in self.values.items()}, item_ids=tuple(item_ids),
                       starts=starts, counts=counts, spans=tuple(self.spans[k] for k in picked),
                       positions=None if self.positions is None else take(self.positions, 0),
                       ids=None if self.ids is None else take(self.ids, 0))

    @staticmethod
    def concat(packs: Sequence[PackedKV]) -> PackedKV:
        """One pack holding every item of ``packs`` in order (one codec, one device)."""
        first = packs[0]
        if len(packs) == 1:
            return first
        if any((p.codec, p.group, p.head_dim) != (first.codec, first.group, first.head_dim) for p in packs):
            raise ValueError("packs of different codecs cannot be concatenated")

        def cat(attr):
            return {name: torch.cat([getattr(p, attr)[name] for p in packs], dim=2) for name in getattr(first, attr)}

        ids = [p.ids for p in packs]

        counts = tuple(c for p in packs for c in p.counts)
        starts = _starts(counts)
        return replace(first, keys=cat("keys"), values=cat("values"),
                       item_ids=tuple(i for p in packs for i in p.item_ids), starts=starts, counts=counts,
                       spans=tuple(s for p in packs for s in p.spans),
                       positions=torch.cat([p.token_positions().int() for p in packs]),
                       ids=None if any(t is None for t in ids) else torch.cat(ids))

    def to(self, device: Any) -> PackedKV:
        """This pack on ``device``: from CPU to a GPU through pinned memory, without waiting for the copy."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" names the current GPU
            device = torch.device("cuda", torch.cuda.current_device())
        if self.device == device:
            return self

        def move(t):
            if t is None or t.device == device:
                return t
            pin = device.type == "cuda" and t.device.type == "cpu"  # only host memory is pinned
            if pin and not t.is_pinned():
                t = t.pin_memory()
            return t.to(device, non_blocking=pin)

        return replace(self, keys={n: move(t) for n, t in self.keys.items()},
                       values={n: move(t) for n, t in self.values.items()},
                       positions=move(self.positions), ids=move(self.ids))

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as float32 (layers, kv_heads, tokens, head_dim), computed where the pack is."""
        return (dequantize(self.keys, self.codec, self.group, self.head_dim),
                dequantize(self.values, self.codec, self.group, self.head_dim))

    def token_positions(self) -> torch.Tensor:
        """Each stored token's position inside its item (int64, on the pack's device)."""
        if self.positions is not None:
            return self.positions.long()
        return torch.cat([torch.arange(c, device=self.device) for c in self.counts]) if self.counts else \
            torch.zeros(0, dtype=torch.long, device=self.device)

    def chunks(self) -> list[KVChunk]:
        """Each item as a float32 :class:`KVChunk` on the CPU."""
        keys, values = (x.cpu() for x in self.dequantize())
        positions, ids = self.token_positions().cpu(), None if self.ids is None else self.ids.cpu()
        out = []
        for item_id, start, count, span in zip(self.item_ids, self.starts, self.counts, self.spans, strict=True):
            part = slice(start, start + count)
            out.append(KVChunk(item_id, span, keys[:, :, part].clone(), values[:, :, part].clone(),
                               ids=None if ids is None else ids[part].clone(), positions=positions[part].clone()))
        return out


def _starts(counts: Sequence[int]) -> tuple[int, ...]:
    """Where each item's tokens begin, items laid one after another."""
    return tuple(accumulate(counts[:-1], initial=0)) if counts else ()


def dequantize(parts: dict[str, torch.Tensor], codec: str, group: int, head_dim: int) -> torch.Tensor:
    """Float32 tensors (..., tokens, head_dim) from stored parts (see :class:`PackedKV`), on their device."""
    if codec in FLOAT_CODECS:
        return parts["data"].float()
    packed = parts["q"]
    *lead, _ = packed.shape
    x = torch.empty(*lead, head_dim, dtype=torch.float32, device=packed.device)
    if BITS[codec] == 4:  # the default: each nibble straight into its float, no wider temporaries
        x[..., 0::2] = packed & 0x0F
        x[..., 1::2] = packed >> 4
    else:
        x.copy_(unpack_codes(packed, BITS[codec], head_dim))
    groups = parts["scale"].shape[-1]
    view = x.view(*lead, groups, head_dim // groups)
    view.mul_(parts["scale"].float().unsqueeze(-1)).add_(parts["min"].float().unsqueeze(-1))
    return x


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 values below ``2**bits`` (last dimension a multiple of 8): 8 values into ``bits`` bytes."""
    if bits == 8:
        return q
    if bits == 4:  # the default: nibbles, without widening
        return q[..., 0::2] | (q[..., 1::2] << 4)
    *lead, d = q.shape
    shifts = torch.arange(8, dtype=torch.int64, device=q.device) * bits
    words = (q.reshape(*lead, d // 8, 8).to(torch.int64) << shifts).sum(dim=-1)
    out = torch.stack([(words >> (8 * i)) & 0xFF for i in range(bits)], dim=-1)
    return out.to(torch.uint8).reshape(*lead, d // 8 * bits)


def unpack_codes(packed: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """The uint8 values :func:`pack_codes` packed, on the tensor's device."""
    if bits == 8:
        return packed
    if bits == 4:
        return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], head_dim)
    *lead, n = packed.shape
    dev = packed.device
    parts = packed.reshape(*lead, n // bits, bits).to(torch.int64)
    words = (parts << (torch.arange(bits, dtype=torch.int64, device=dev) * 8)).sum(dim=-1)
    q = (words.unsqueeze(-1) >> (torch.arange(8, dtype=torch.int64, device=dev) * bits)) & ((1 << bits) - 1)
    return q.to(torch.uint8).reshape(*lead, head_dim)


def assemble(prefix: tuple[torch.Tensor, torch.Tensor], pack: PackedKV | None, inv_freq: torch.Tensor,
             dtype: torch.dtype, device: Any) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """A prompt's stored prefix: ``prefix`` (keys and values of its first tokens, in ``dtype`` on
    ``device``), then every item of ``pack`` at its offset.

    The pack moves to ``device`` compressed; de-quantization and the rotation of
    every key to its offset are one batched step over all its tokens there.
    Returns new keys and values (layers, kv_heads, tokens, head_dim), the next
    free position, and the position of every stored token.
    """
    pre_k, pre_v = prefix
    start = int(pre_k.shape[2])
    pre_pos = torch.arange(start, device=device)
    if pack is None or not pack.item_ids:
        return pre_k.clone(), pre_v.clone(), start, pre_pos
    pack = pack.to(device)
    keys, values = pack.dequantize()
    spans = torch.tensor(pack.spans, dtype=torch.long)
    offsets = start + torch.cumsum(spans, 0) - spans  # where each item begins
    per_token = offsets.repeat_interleave(torch.tensor(pack.counts, dtype=torch.long)).to(device)
    # Written straight into the prefix's tensors, after its first tokens.
    shape = (*pre_k.shape[:2], start + pack.tokens, pre_k.shape[3])
    out_k = torch.empty(shape, dtype=dtype, device=device)
    out_v = torch.empty(shape, dtype=dtype, device=device)
    out_k[:, :, :start] = pre_k
    out_v[:, :, :start] = pre_v
    if dtype == torch.float32:
        rotate(keys, per_token, inv_freq, out=out_k[:, :, start:])
    else:  # rotated in float32, rounded once
        out_k[:, :, start:] = rotate(keys, per_token, inv_freq)
    out_v[:, :, start:] = values
    positions = torch.cat([pre_pos, per_token + pack.token_positions()])
    return out_k, out_v, start + int(spans.sum()), positions
