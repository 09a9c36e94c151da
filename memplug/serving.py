"""Answering with the local model and a scope's memory: read, then generate.

Text hits go into the prompt; explicit memory (``Recall.kv``) is injected as
attention key/values and the scope's adapter (``Recall.adapter``) applied, by
:class:`memplug.runtime.LocalModel`. :class:`~memplug.Memory`'s ``generate``,
``stream``, ``answer`` and ``respond`` call these.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .errors import InvalidInput
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
    from .runtime.chat import chat_messages

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

    return memory.model.stream(msgs, recall, on_prefill=prefill, **options)


def _read_for(memory: Memory, scope: Scope | str, messages: Any, budget: Budget | None,
              filters: Mapping[str, Any] | None) -> tuple[list[dict[str, str]], Recall]:
    from .runtime.chat import chat_messages

    msgs = chat_messages(messages)
    query = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), None)
    if query is None:
        raise InvalidInput("messages have no user message to answer")
    return msgs, memory.read(scope, query, budget, filters)
