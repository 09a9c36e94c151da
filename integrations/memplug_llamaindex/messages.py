"""LlamaIndex chat messages to the role/content dicts memplug's runtime reads."""

from __future__ import annotations

from collections.abc import Sequence

from llama_index.core.base.llms.types import ChatMessage, MessageRole

from memplug import InvalidInput

_ROLES = {MessageRole.SYSTEM: "system", MessageRole.DEVELOPER: "system", MessageRole.USER: "user",
          MessageRole.ASSISTANT: "assistant", MessageRole.CHATBOT: "assistant", MessageRole.MODEL: "assistant"}


def to_chat(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """System, user and assistant roles map across; a tool or function result becomes a user turn."""
    out = []
    for m in messages:
        text = m.content or ""
        role = _ROLES.get(m.role)
        if role is None:
            if m.role not in (MessageRole.TOOL, MessageRole.FUNCTION):
                raise InvalidInput(f"memplug cannot take a {m.role!s} message")
            role, text = "user", f"Tool result: {text}"
        out.append({"role": role, "content": text})
    return out


def last_user_text(messages: Sequence[ChatMessage] | None) -> str | None:
    for m in reversed(messages or ()):
        if m.role == MessageRole.USER and (m.content or "").strip():
            return m.content
    return None
