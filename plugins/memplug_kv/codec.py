"""KV blobs: one memory item's keys and values, compressed, in a safetensors file.

Codecs:

- ``fp16`` / ``bf16``: a plain cast (half the bytes of fp32);
- ``int8``, ``int4``, ``int3``, ``int2``: asymmetric integer quantization, one
  fp16 scale and minimum per ``group`` consecutive channels of one token of one
  head; every 8 values are packed into ``bits`` bytes;
- any of them after token selection (``keep`` < 1): only the highest-scoring
  fraction of the item's tokens is stored, each with its own rotation.

The header records the format, the model fingerprint, the codec, the cache
layout and a BLAKE2b digest of every tensor: a blob that does not match the
model, or was truncated or altered, is refused with :class:`ArtifactCorrupt` or
:class:`ModelMismatch`. safetensors stores raw tensors only: nothing is
unpickled.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from memplug.plugin import ArtifactCorrupt, ConfigError, ModelMismatch

FORMAT = "memplug-kv/1"
CODECS = ("fp16", "bf16", "int8", "int4", "int3", "int2")


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
        base = self.name if self.name in ("fp16", "bf16") else f"{self.name}-g{self.group}"
        return base if self.keep >= 1.0 else f"{base}-keep{round(self.keep * 100)}"

    @property
    def bits(self) -> int:
        return {"fp16": 16, "bf16": 16, "int8": 8, "int4": 4, "int3": 3, "int2": 2}[self.name]


def encode(chunk, codec: Codec, fingerprint: str, layout: dict[str, int]) -> bytes:
    """Serialize a :class:`memplug.runtime.KVChunk` (already thinned to ``codec.keep``, if asked)."""
    from safetensors.torch import save

    tensors = {}
    for part, x in (("keys", chunk.keys), ("values", chunk.values)):
        tensors.update({f"{part}.{k}": v for k, v in _compress(x, codec).items()})
    meta = {
        "format": FORMAT, "fingerprint": fingerprint, "codec": codec.name, "group": str(codec.group),
        "keep": repr(codec.keep), "span": str(chunk.span), "item_id": str(chunk.item_id),
        "digest": _digest(tensors), **{k: str(v) for k, v in layout.items()},
    }
    return save(tensors, metadata=meta)


def decode(data: bytes, *, fingerprint: str, layout: dict[str, int], where: str):
    """The :class:`KVChunk` in a blob, as float32 tensors. ``where`` names the blob in errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from memplug.runtime import KVChunk

    try:
        meta = _header(data)
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise ArtifactCorrupt(f"KV blob {where} is corrupt or truncated ({e}); "
                              f"the next consolidation re-encodes it") from None
    if meta.get("format") != FORMAT:
        raise ArtifactCorrupt(f"KV blob {where} is not a memplug KV blob (format {meta.get('format')!r})")
    if meta.get("fingerprint") != fingerprint:
        raise ModelMismatch(f"KV blob {where} was encoded by model {meta.get('fingerprint')!r}, "
                            f"not the loaded {fingerprint!r}; it is not injected")
    for key, want in layout.items():
        if meta.get(key) != str(want):
            raise ModelMismatch(f"KV blob {where} has {key}={meta.get(key)}, the model has {want}")
    if _digest(tensors) != meta.get("digest"):
        raise ArtifactCorrupt(f"KV blob {where} fails its checksum; the next consolidation re-encodes it")
    try:
        codec = Codec(meta["codec"], int(meta["group"]), float(meta["keep"]))
        keys = _decompress({k[5:]: v for k, v in tensors.items() if k.startswith("keys.")}, codec)
        values = _decompress({k[7:]: v for k, v in tensors.items() if k.startswith("values.")}, codec)
        span = int(meta["span"])
        item_id = int(meta["item_id"])
    except (KeyError, ValueError, RuntimeError, ConfigError) as e:
        raise ArtifactCorrupt(f"KV blob {where} is malformed ({e})") from None
    if keys.shape != values.shape or keys.shape[2] > span:
        raise ArtifactCorrupt(f"KV blob {where} has keys {tuple(keys.shape)} and values {tuple(values.shape)}")
    return KVChunk(item_id, span, keys, values)


def _header(data: bytes) -> dict[str, str]:
    import json

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
    q = _pack(q, codec.bits)
    return {"q": q.contiguous(), "scale": scale.squeeze(-1).contiguous(), "min": lo.squeeze(-1).contiguous()}


def _decompress(parts: dict, codec: Codec):

    if codec.name in ("fp16", "bf16"):
        return parts["data"].float()
    q, scale, lo = parts["q"], parts["scale"].float(), parts["min"].float()
    q = _unpack(q, codec.bits)
    *lead, d = q.shape
    groups = scale.shape[-1]
    x = q.float().reshape(*lead, groups, d // groups) * scale.unsqueeze(-1) + lo.unsqueeze(-1)
    return x.reshape(*lead, d)


def _pack(q, bits: int):
    """Pack values below ``2**bits`` (last dimension a multiple of 8): 8 values into ``bits`` bytes."""
    import torch

    if bits == 8:
        return q
    if bits == 4:  # the default: nibbles, without widening to int64
        return q[..., 0::2] | (q[..., 1::2] << 4)
    *lead, d = q.shape
    shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (q.reshape(*lead, d // 8, 8).to(torch.int64) << shifts).sum(dim=-1)
    out = torch.stack([(words >> (8 * i)) & 0xFF for i in range(bits)], dim=-1)
    return out.to(torch.uint8).reshape(*lead, d // 8 * bits)


def _unpack(packed, bits: int):
    import torch

    if bits == 8:
        return packed
    if bits == 4:
        return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    *lead, n = packed.shape
    parts = packed.reshape(*lead, n // bits, bits).to(torch.int64)
    words = (parts << (torch.arange(bits, dtype=torch.int64) * 8)).sum(dim=-1)
    q = (words.unsqueeze(-1) >> (torch.arange(8, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    return q.to(torch.uint8).reshape(*lead, n // bits * 8)
