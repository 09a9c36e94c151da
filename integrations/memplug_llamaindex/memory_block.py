"""``MemplugMemoryBlock``: long-term memory for LlamaIndex's ``Memory``, kept by memplug."""

from __future__ import annotations

from typing import Any

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.memory.memory import BaseMemoryBlock
from pydantic import ConfigDict, Field

from memplug import Budget, Memory, Scope

from .messages import last_user_text, to_chat


class MemplugMemoryBlock(BaseMemoryBlock[str]):
    """Messages flushed from short-term memory are written to the user's memplug scope; on
    each turn the block reads memplug for the current input and returns what it recalls.

    ``roles`` picks which flushed messages become knowledge (the user's by default: what a
    user says about themselves is what personalises; a small model's replies are not facts).
    ``scope`` may also be passed per call as a block keyword (``memory.aget(scope=...)``).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = "memplug"
    description: str | None = "What memplug recalls about this user."
    memory: Memory = Field(exclude=True)
    scope: Any
    budget: Budget | None = None
    filters: dict[str, Any] | None = None
    roles: tuple[str, ...] = ("user",)

    def _scope(self, block_kwargs: dict[str, Any]) -> Scope:
        return Scope.of(block_kwargs.get("scope") or self.scope)

    async def _aget(self, messages: list[ChatMessage] | None = None, **block_kwargs: Any) -> str:
        query = last_user_text(messages)
        if query is None:
            return ""
        recall = await self.memory.aread(self._scope(block_kwargs), query, self.budget, self.filters)
        return recall.as_text()

    async def _aput(self, messages: list[ChatMessage]) -> None:
        texts = [m["content"] for m in to_chat(messages) if m["role"] in self.roles and m["content"].strip()]
        if texts:
            await self.memory.awrite(self._scope({}).without_session(), texts, {"source": "llamaindex"})
