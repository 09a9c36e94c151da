"""The prompt's text, shared by every generation backend (no torch, no transformers).

A reply is asked for with a system message that lists the memories given as
text, then the conversation. :class:`~memplug.runtime.LocalModel` renders it
with the model's chat template and places injected memory inside it; a
serving engine (:mod:`memplug.runtime.vllm`) is sent the same messages and
renders them with the same template, so both read the same prompt.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidInput

SYSTEM = "You are a helpful assistant. Answer from these memories when they are relevant.\nMemories:\n"
PLAIN_SYSTEM = "You are a helpful assistant."


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """Normalise a str, dicts with role/content, or message objects (``.role``/``.type`` and ``.content``)."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    out = []
    for m in messages:
        if isinstance(m, dict):
            role, content = m.get("role"), m.get("content")
        else:
            role = getattr(m, "role", None) or {"human": "user", "ai": "assistant"}.get(getattr(m, "type", ""))
            content = getattr(m, "content", None)
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise InvalidInput(f"a message needs role system/user/assistant and str content, got {m!r:.80}")
        out.append({"role": role, "content": content})
    if not out:
        raise InvalidInput("messages is empty")
    return out


def system_text(extra: str, text_memories: str = "", memories: bool = False, mark: str = "") -> str:
    """The system message: the memory preamble when there are memories (``mark`` is where injected
    memory goes), the text memories, then the caller's own system message ``extra``."""
    if not memories and not text_memories:
        return "\n\n".join(filter(None, [PLAIN_SYSTEM, extra]))
    return SYSTEM + mark + "\n".join(filter(None, [text_memories.strip(), extra and "\n" + extra]))


def with_memories(messages: Any, text_memories: str = "") -> list[dict[str, str]]:
    """The messages a backend without injected memory is sent: one system message first."""
    msgs = chat_messages(messages)
    extra = ""
    if msgs[0]["role"] == "system":
        extra, msgs = msgs[0]["content"], msgs[1:]
    return [{"role": "system", "content": system_text(extra, text_memories)}, *msgs]
