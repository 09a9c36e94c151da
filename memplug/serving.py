"""Answering with the local model and a scope's memory: read, then generate.

Text hits go into the prompt; explicit memory (``Recall.kv``) is injected as
attention key/values and the scope's adapter (``Recall.adapter``) applied, by
:class:`memplug.runtime.LocalModel`. :class:`~memplug.Memory`'s ``generate``,
``stream``, ``answer`` and ``respond`` call these.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, InvalidInput
from .types import Answer, Budget, Recall, Scope

if TYPE_CHECKING:
    from .memory import Memory

MEASURED_PROMPT_TOKENS = 16  # shorter prompts measure mostly overhead


def stream(memory: Memory, scope: Scope | str, messages: Any, budget: Budget | None,
           filters: Mapping[str, Any] | None, options: dict[str, Any]) -> Iterator[str]:
    """Read with the last user message as the query, then stream the model's reply."""
    msgs, recall = _read_for(memory, scope, messages, budget, filters)
    return _generate(memory, msgs, recall, options)


def answer(memory: Memory, scope: Scope | str, messages: Any, budget: Budget | None,
           filters: Mapping[str, Any] | None, stop: str | None, options: dict[str, Any]) -> Answer:
    """The reply with what it took: the recall, the prompt tokens, time to first piece and in all."""
    if stop is not None and (not isinstance(stop, str) or not stop):
        raise InvalidInput(f"stop must be a non-empty string, got {stop!r}")
    started = time.perf_counter()
    msgs, recall = _read_for(memory, scope, messages, budget, filters)
    prompt = {"tokens": 0}
    first = None
    text = ""
    caller = options.pop("on_prefill", None)

    def prefill(tokens: int, seconds: float) -> None:
        prompt["tokens"] = tokens
        if caller is not None:
            caller(tokens, seconds)

    for piece in _generate(memory, msgs, recall, {**options, "on_prefill": prefill}):
        first = first if first is not None else time.perf_counter() - started
        text += piece
        if stop is not None and stop in text:
            text = text[:text.index(stop)]
            break
    seconds = time.perf_counter() - started
    return Answer(text, recall, prompt["tokens"], seconds if first is None else first, seconds)


def respond(memory: Memory, messages: Any, recall: Recall | None, options: dict[str, Any]) -> Iterator[str]:
    """Stream the local model's reply to ``messages`` with ``recall`` (or none); measures the prefill."""
    from .runtime.prompt import chat_messages

    if recall is not None and not isinstance(recall, Recall):
        raise InvalidInput(f"recall must be a memplug.Recall, got {type(recall).__name__}")
    return _generate(memory, chat_messages(messages), recall, options)


def _generate(memory: Memory, msgs: list[dict[str, str]], recall: Recall | None,
              options: dict[str, Any]) -> Iterator[str]:
    caller = options.pop("on_prefill", None)

    def prefill(tokens: int, seconds: float) -> None:
        if tokens >= MEASURED_PROMPT_TOKENS:
            memory.measure("model", "prefill_ms_per_token", 1000 * seconds / tokens)
        if caller is not None:
            caller(tokens, seconds)

    def inject(tokens: int, seconds: float) -> None:
        memory.measure(recall.kv.tier, "inject_ms_per_token", 1000 * seconds / tokens)

    if recall is not None and recall.kv is not None and memory.backend != "vllm":
        options.setdefault("on_inject", inject)
    return memory.model.stream(msgs, recall, on_prefill=prefill, **options)


def _read_for(memory: Memory, scope: Scope | str, messages: Any, budget: Budget | None,
              filters: Mapping[str, Any] | None) -> tuple[list[dict[str, str]], Recall]:
    from .runtime.prompt import chat_messages

    msgs = chat_messages(messages)
    query = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), None)
    if query is None:
        raise InvalidInput("messages have no user message to answer")
    return msgs, memory.read(scope, query, budget, filters)


# -- the vllm backend --------------------------------------------------------------------------------

_servers: dict[tuple[str, str | None], Any] = {}  # one server manager per home and model, per process
_servers_lock = threading.Lock()


def check_backend(memory: Memory) -> None:
    """Configuration the vllm backend cannot serve, refused when the Memory is made."""
    if memory.option("backend") != "vllm":
        return
    from .runtime.vllm import check_adapter_shape

    check_adapter_shape(rank=1, targets=(), max_rank=memory.option("vllm_max_lora_rank"))
    if memory.option("vllm_url") and not memory.artifacts.local and not memory.option("vllm_artifacts_path"):
        raise ConfigError(f"the vLLM server at {memory.option('vllm_url')} cannot read adapters from "
                          f"{memory.artifacts.url}: set vllm_artifacts_path to where that server mounts the store")


def vllm_model(memory: Memory, start: bool = True) -> Any:
    """This Memory's client of the vllm backend. With ``start=False``: None when no server is known
    (no ``vllm_url`` and none running for this home), and nothing is started."""
    from .runtime import vllm

    client = memory._vllm
    if client is not None:
        if start or client._url is not None or client.server.found() is not None:
            return client
        return None
    url = memory.option("vllm_url") or None
    server = None
    if url is None:
        key = (str(Path(memory.settings.home).resolve()), memory.settings.model)
        with _servers_lock:
            server = _servers.get(key)
            if server is None:
                server = _servers[key] = vllm.LocalServer(
                    memory.settings.home, memory.settings.model, python=memory.option("vllm_python"),
                    max_loras=memory.option("vllm_max_loras"), max_lora_rank=memory.option("vllm_max_lora_rank"),
                    args=memory.option("vllm_args"), timeout_s=memory.option("vllm_start_timeout_s"))
        if not start and server.found() is None:
            return None
    places = _AdapterPlaces(memory)
    client = vllm.VLLMModel(
        url, fingerprint=memory.model_fingerprint, name=memory.settings.model or "SmolLM2-135M-Instruct",
        locate=places.locate, base_adapter=places.base if memory.option("vllm_base_adapter") else None,
        server=server, staging=places.staging, measure=memory.measure)
    memory._vllm = client
    return client


class _AdapterPlaces:
    """Where the vLLM server reads adapter folders: the artifact store's folder, its mount on the
    server (``vllm_artifacts_path``), or, for a remote store and a server on this machine, a copy
    under ``$MEMPLUG_HOME/vllm/adapters`` (removed when the adapter is unloaded)."""

    def __init__(self, memory: Memory):
        self.memory = memory
        self.store = memory.artifacts
        self.mount = memory.option("vllm_artifacts_path")
        self.staging = None if self.mount or self.store.local else Path(memory.settings.home) / "vllm" / "adapters"

    def _path(self, key: str, files: tuple[str, ...]) -> str:
        if self.mount:
            return f"{self.mount.rstrip('/')}/{key}"
        if self.store.local:
            return str(self.store.root / key)
        assert self.staging is not None
        folder = self.staging / key
        if not all((folder / f).is_file() for f in files):
            from .artifacts import write_atomic

            for f in files:
                write_atomic(folder / f, self.store.get(f"{key}/{f}"))
        return str(folder)

    def locate(self, ref: Any) -> str:
        from .runtime.vllm import CONFIG_FILE, WEIGHTS_FILE

        root = self.store.url.rstrip("/") + "/"
        if not ref.uri.startswith(root):
            raise InvalidInput(f"adapter {ref.name} is at {ref.uri}, outside the artifact store {self.store.url}")
        return self._path(ref.uri[len(root):], (WEIGHTS_FILE, CONFIG_FILE))

    def base(self) -> str:
        """The all-zero adapter requests without an adapter are sent to, written once per model."""
        import tempfile

        from .runtime.model_files import cache_dir
        from .runtime.vllm import CONFIG_FILE, WEIGHTS_FILE, zero_adapter

        memory = self.memory
        key = f"vllm/base/{memory.model_fingerprint[:16]}"
        if not self.store.exists(f"{key}/{WEIGHTS_FILE}"):
            model = memory.settings.model
            config_folder = Path(model).expanduser() if model and Path(model).expanduser().is_dir() \
                else cache_dir(memory.settings.home, model)
            with tempfile.TemporaryDirectory() as tmp:
                folder = zero_adapter(Path(tmp) / "base", config_folder)
                for f in (CONFIG_FILE, WEIGHTS_FILE):
                    self.store.put(f"{key}/{f}", (folder / f).read_bytes())
        return self._path(key, (WEIGHTS_FILE, CONFIG_FILE))
