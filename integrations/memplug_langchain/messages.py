"""LangChain messages to the role/content dicts memplug's runtime reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from memplug import InvalidInput


def text_of(content: Any) -> str:
    """A message's text: a str, or the text parts of a list of content blocks."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content or ():
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "".join(parts)


def to_chat(messages: Sequence[BaseMessage], tools_as_user: bool = True) -> list[dict[str, str]]:
    """System, human and AI messages map to system, user and assistant; a tool result
    becomes a user turn that says so (the local model has no tool role)."""
    out = []
    for m in messages:
        if isinstance(m, SystemMessage):
            role = "system"
        elif isinstance(m, HumanMessage):
            role = "user"
        elif isinstance(m, AIMessage):
            role = "assistant"
        elif isinstance(m, ToolMessage) and tools_as_user:
            out.append({"role": "user", "content": f"Tool result ({m.name or m.tool_call_id}): {text_of(m.content)}"})
            continue
        else:
            raise InvalidInput(f"memplug cannot take a {type(m).__name__} message")
        out.append({"role": role, "content": text_of(m.content)})
    return out


def last_user_text(messages: Sequence[BaseMessage]) -> str | None:
    """The text of the last human message, the query memory is read for."""
    for m in reversed(messages):
        if isinstance(m, HumanMessage):
            text = text_of(m.content)
            if text.strip():
                return text
    return None
