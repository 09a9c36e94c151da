"""The lora tier's adapter files: PEFT's format, with the base model's fingerprint and a digest.

An adapter is two files, ``adapter_model.safetensors`` and ``adapter_config.json``,
as PEFT (and vLLM) read them. The safetensors header also names the base
model and carries a BLAKE2b digest of the tensors and the config, so a
damaged or foreign adapter is refused on load instead of applied.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from memplug.plugin import ArtifactCorrupt, ModelMismatch

FORMAT = "memplug-lora/1"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def pack(result: Any, fingerprint: str, meta: dict[str, Any]) -> tuple[bytes, bytes]:
    """``result`` (a :class:`~memplug_lora.train.TrainResult`) in PEFT's file format: (``adapter_model.safetensors``, ``adapter_config.json``) bytes.

    The safetensors header also carries the base model's fingerprint and a
    BLAKE2b digest of the tensors, so a damaged or foreign file is refused on load.
    """
    import torch
    from safetensors.torch import save

    # fp16 halves the file; LoRA factors are small numbers well inside its range.
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in result.state.items()}
    header = {"format": "pt", "memplug": FORMAT, "fingerprint": fingerprint, "digest": _digest(state),
              "config_digest": _config_digest(result.peft_config),
              "meta": json.dumps(meta, sort_keys=True)}
    return save(state, metadata=header), json.dumps(result.peft_config, indent=1, sort_keys=True).encode()


def unpack(weights: bytes, config: bytes, fingerprint: str, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check and read a packed adapter: (state dict, PEFT config). Raises ArtifactCorrupt or ModelMismatch."""
    from safetensors.torch import load

    try:
        header = _header(weights)
        state = load(weights)
        peft_config = json.loads(config)
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is damaged
        raise ArtifactCorrupt(f"adapter {where} is unreadable ({type(e).__name__}: {e}); "
                              "the next consolidation retrains it") from e
    if header.get("memplug") != FORMAT:
        raise ArtifactCorrupt(f"adapter {where} is not a memplug adapter (format {header.get('memplug')!r})")
    if header.get("fingerprint") != fingerprint:
        raise ModelMismatch(f"adapter {where} was trained on model {header.get('fingerprint')}, "
                            f"the loaded model is {fingerprint}; it is not applied")
    if header.get("digest") != _digest(state) or header.get("config_digest") != _config_digest(peft_config):
        raise ArtifactCorrupt(f"adapter {where} failed its integrity check; the next consolidation retrains it")
    return state, peft_config


def _header(weights: bytes) -> dict[str, str]:
    if len(weights) < 8:
        raise ValueError("file too short")
    n = int.from_bytes(weights[:8], "little")
    if n <= 0 or 8 + n > len(weights):
        raise ValueError("bad header length")
    return json.loads(weights[8:8 + n]).get("__metadata__") or {}


def _digest(state: dict[str, Any]) -> str:
    import torch

    h = hashlib.blake2b(digest_size=16)
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _config_digest(config: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(config, sort_keys=True).encode(), digest_size=16).hexdigest()
