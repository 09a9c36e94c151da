"""KV packs: several memory items' keys and values, compressed, in one safetensors file.

Codecs:

- ``fp32``: stored as computed (no compression; what exactness checks use);
- ``fp16`` / ``bf16``: a plain cast (half the bytes of fp32);
- ``int8``, ``int4``, ``int3``, ``int2``: asymmetric integer quantization, one
  fp16 scale and minimum per ``group`` consecutive channels of one token of one
  head; every 8 values are packed into ``bits`` bytes;
- any of them after token selection (``keep`` < 1): only the highest-scoring
  fraction of the item's tokens is stored, each with its own rotation.

A pack holds every item's tokens one after another along the token axis, with
each token's id and position in its item; the header's ``items`` index says
which tokens are whose. It records the format, the model fingerprint, the
codec, the cache layout and one BLAKE2b digest of every tensor: a pack that
does not match the model, or was truncated or altered, is refused with
:class:`ArtifactCorrupt` or :class:`ModelMismatch`. Reading a pack is one file
read and one checksum, however many items it holds. safetensors stores raw
tensors only: nothing is unpickled. Blobs of one item in the earlier format
(``memplug-kv/1``) are read as packs of one item.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from memplug.plugin import ArtifactCorrupt, ConfigError, ModelMismatch

FORMAT = "memplug-kv/2"
FORMATS = ("memplug-kv/1", FORMAT)
CODECS = ("fp32", "fp16", "bf16", "int8", "int4", "int3", "int2")
BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4, "int3": 3, "int2": 2}


@dataclass(frozen=True)
class Codec:
    """How KV is compressed: ``name`` (one of CODECS), ``group`` channels per scale, ``keep`` fraction of tokens."""

    name: str = "int4"
    group: int = 32
    keep: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ConfigError(f"kv_codec={self.name!r}; expected one of {', '.join(CODECS)}")
        if not isinstance(self.group, int) or self.group < 2 or self.group & (self.group - 1):
            raise ConfigError(f"kv_group={self.group!r}; expected a power of two >= 2")
        if not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"kv_keep={self.keep!r}; expected a fraction in (0, 1]")

    @property
    def label(self) -> str:
        base = self.name if self.name in ("fp32", "fp16", "bf16") else f"{self.name}-g{self.group}"
        return base if self.keep >= 1.0 else f"{base}-keep{round(self.keep * 100)}"

    @property
    def bits(self) -> int:
        return BITS[self.name]


def compress(chunks: Sequence, codec: Codec):
    """A :class:`memplug.runtime.PackedKV` of :class:`memplug.runtime.KVChunk` values (already
    thinned to ``codec.keep``, if asked), compressed with ``codec``, on the CPU."""
    from memplug.runtime import PackedKV

    raw = PackedKV.from_chunks([_on_cpu(c) for c in chunks])
    group = 0 if codec.name in ("fp32", "fp16", "bf16") else min(codec.group, raw.head_dim)
    return PackedKV(codec.name, group, raw.head_dim, _compress(raw.keys["data"], codec),
                    _compress(raw.values["data"], codec), raw.item_ids, raw.starts, raw.counts, raw.spans,
                    raw.positions, raw.ids)


def serialize(pack, fingerprint: str, layout: dict[str, int], keep: float = 1.0) -> bytes:
    """The bytes of a pack file."""
    from safetensors.torch import save

    tensors = {f"keys.{k}": v.contiguous().cpu() for k, v in pack.keys.items()}
    tensors.update({f"values.{k}": v.contiguous().cpu() for k, v in pack.values.items()})
    tensors["tokens.positions"] = pack.token_positions().to("cpu").int().contiguous()
    if pack.ids is not None:
        tensors["tokens.ids"] = pack.ids.to("cpu").int().contiguous()
    index = [{"item_id": i, "start": s, "tokens": c, "span": p}
             for i, s, c, p in zip(pack.item_ids, pack.starts, pack.counts, pack.spans, strict=True)]
    meta = {"format": FORMAT, "fingerprint": fingerprint, "codec": pack.codec, "group": str(pack.group),
            "keep": repr(keep), "items": json.dumps(index), "digest": _digest(tensors),
            **{k: str(v) for k, v in layout.items()}}
    return save(tensors, metadata=meta)


def parse(data: bytes, *, fingerprint: str | None, layout: dict[str, int] | None, where: str):
    """The :class:`memplug.runtime.PackedKV` in a pack file, compressed as stored, on the CPU.

    ``fingerprint`` and ``layout`` are what the pack must have been made for (None: not checked,
    for rewriting a pack without the model). ``where`` names the file in errors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    from memplug.runtime import PackedKV

    try:
        meta = header(data)
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise ArtifactCorrupt(f"KV pack {where} is corrupt or truncated ({e}); "
                              f"the next consolidation re-encodes it") from None
    if meta.get("format") not in FORMATS:
        raise ArtifactCorrupt(f"KV pack {where} is not a memplug KV pack (format {meta.get('format')!r})")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise ModelMismatch(f"KV pack {where} was encoded by model {meta.get('fingerprint')!r}, "
                            f"not the loaded {fingerprint!r}; it is not injected")
    for key, want in (layout or {}).items():
        if meta.get(key) != str(want):
            raise ModelMismatch(f"KV pack {where} has {key}={meta.get(key)}, the model has {want}")
    if _digest(tensors) != meta.get("digest"):
        raise ArtifactCorrupt(f"KV pack {where} fails its checksum; the next consolidation re-encodes it")
    try:
        codec = meta["codec"]
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}")
        keys = {k[5:]: v for k, v in tensors.items() if k.startswith("keys.")}
        values = {k[7:]: v for k, v in tensors.items() if k.startswith("values.")}
        first = keys["data" if "data" in keys else "q"]
        stored = int(first.shape[2])
        if meta["format"] == FORMAT:
            index = [(int(e["item_id"]), int(e["start"]), int(e["tokens"]), int(e["span"]))
                     for e in json.loads(meta["items"])]
        else:
            index = [(int(meta["item_id"]), 0, stored, int(meta["span"]))]
        head_dim = int(meta.get("head_dim") or (first.shape[-1] * 8 // BITS[codec] if "q" in keys
                                                else first.shape[-1]))
        group = int(meta["group"]) if codec not in ("fp32", "fp16", "bf16") else 0
        if codec not in ("fp32", "fp16", "bf16"):
            group = min(group, head_dim)
        positions = tensors.get("tokens.positions")
        ids = tensors.get("tokens.ids")
        pack = PackedKV(codec, group, head_dim, keys, values, tuple(i for i, _, _, _ in index),
                        tuple(s for _, s, _, _ in index), tuple(c for _, _, c, _ in index),
                        tuple(p for _, _, _, p in index), positions, ids)
        _check(pack, stored, values)
    except (KeyError, ValueError, TypeError, RuntimeError, ConfigError) as e:
        raise ArtifactCorrupt(f"KV pack {where} is malformed ({e})") from None
    return pack


def _check(pack, stored: int, values: dict) -> None:
    """Refuse an index that does not tile the stored tokens, or tensors of mismatched shapes."""
    at = 0
    for start, count, span in zip(pack.starts, pack.counts, pack.spans, strict=True):
        if start != at or count < 1 or span < count:
            raise ValueError(f"the item index does not tile the {stored} stored tokens")
        at += count
    if at != stored or set(values) != set(pack.keys):
        raise ValueError(f"the item index covers {at} of {stored} stored tokens")
    for name, t in pack.keys.items():
        if tuple(values[name].shape) != tuple(t.shape) or t.shape[2] != stored:
            raise ValueError(f"keys.{name} {tuple(t.shape)} and values.{name} {tuple(values[name].shape)}")
    for extra in (pack.positions, pack.ids):
        if extra is not None and tuple(extra.shape) != (stored,):
            raise ValueError(f"a token tensor of shape {tuple(extra.shape)} for {stored} tokens")
    if pack.codec not in ("fp32", "fp16", "bf16"):
        d = pack.head_dim
        q, scale = pack.keys["q"], pack.keys["scale"]
        if q.shape[-1] * 8 != d * BITS[pack.codec] or pack.group < 2 or d % pack.group or \
                scale.shape[-1] != d // pack.group or tuple(pack.keys["min"].shape) != tuple(scale.shape):
            raise ValueError(f"codes {tuple(q.shape)} and scales {tuple(scale.shape)} for head_dim {d}")


def encode(chunk, codec: Codec, fingerprint: str, layout: dict[str, int]) -> bytes:
    """The pack file of one :class:`memplug.runtime.KVChunk`."""
    return serialize(compress([chunk], codec), fingerprint, layout, codec.keep)


def decode(data: bytes, *, fingerprint: str, layout: dict[str, int], where: str):
    """The :class:`memplug.runtime.KVChunk` in the pack file of one item, as float32 tensors."""
    pack = parse(data, fingerprint=fingerprint, layout=layout, where=where)
    if len(pack.item_ids) != 1:
        raise ArtifactCorrupt(f"KV pack {where} holds {len(pack.item_ids)} items, not one")
    return pack.chunks()[0]


def _on_cpu(chunk):
    return chunk if chunk.keys.device.type == "cpu" else type(chunk)(
        chunk.item_id, chunk.span, chunk.keys.cpu(), chunk.values.cpu(), None,
        None if chunk.ids is None else chunk.ids.cpu(), None if chunk.positions is None else chunk.positions.cpu())


def header(data: bytes) -> dict[str, str]:
    """The metadata of a pack file (raises ValueError if it has no readable header)."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("header runs past the end of the file")
    return json.loads(data[8:8 + n]).get("__metadata__", {})


def _digest(tensors) -> str:
    import torch

    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _compress(x, codec: Codec) -> dict:
    import torch

    from memplug.runtime import pack_codes

    if codec.name == "fp32":
        return {"data": x.float().contiguous()}
    if codec.name == "fp16":
        return {"data": x.to(torch.float16).contiguous()}
    if codec.name == "bf16":
        return {"data": x.to(torch.bfloat16).contiguous()}
    *lead, d = x.shape
    g = min(codec.group, d)
    if d % g:
        raise ConfigError(f"kv_group={codec.group} does not divide head_dim {d}")
    levels = (1 << codec.bits) - 1
    groups = x.float().reshape(*lead, d // g, g)
    lo = groups.amin(dim=-1, keepdim=True)
    scale = (groups.amax(dim=-1, keepdim=True) - lo) / levels
    # Store scale and minimum in fp16 and quantize against those rounded values.
    lo, scale = lo.to(torch.float16), scale.to(torch.float16)
    safe = torch.where(scale.float() > 0, scale.float(), torch.ones_like(scale.float()))
    q = ((groups - lo.float()) / safe).round().clamp(0, levels).to(torch.uint8).reshape(*lead, d)
    return {"q": pack_codes(q, codec.bits).contiguous(), "scale": scale.squeeze(-1).contiguous(),
            "min": lo.squeeze(-1).contiguous()}
