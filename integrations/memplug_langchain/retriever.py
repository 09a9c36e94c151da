"""``MemplugRetriever``: a LangChain retriever over :meth:`memplug.Memory.read`."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableConfig, ensure_config
from pydantic import ConfigDict, Field

from memplug import Budget, InvalidInput, Memory, Recall

from ._scope import resolve


def recall_documents(recall: Recall) -> list[Document]:
    """The items of a recall as Documents, best first: text hits, then KV-served, then adapter-held
    items (a generic model reads them all as text). Metadata gains ``memplug_item_id``,
    ``memplug_tier`` and ``memplug_score``."""
    return [Document(page_content=item.text, id=item.key or str(item.id),
                     metadata={**item.metadata, "memplug_item_id": item.id, "memplug_tier": tier,
                               "memplug_score": score})
            for item, tier, score in recall.served()]


class MemplugRetriever(BaseRetriever):
    """Retrieve from a user's memplug memory (every tier), for any LangChain chain or agent.

    ``MemplugRetriever(memory=mem, scope="alice", k=4)``; the scope can also come per call
    (``retriever.invoke(q, scope="bob")``) or from ``config["configurable"]["user_id"]``.
    Every returned item counts as read, so usage drives promotion as with ``Memory.read``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    memory: Memory
    scope: Any = None
    k: int = Field(default=4, gt=0)
    budget: Budget | None = None
    filters: dict[str, Any] | None = None

    def invoke(self, input: str, config: RunnableConfig | None = None, **kwargs: Any) -> list[Document]:
        config = ensure_config(config)
        kwargs["scope"] = resolve(kwargs.get("scope"), config, self.scope, "MemplugRetriever")
        return super().invoke(input, config, **kwargs)

    async def ainvoke(self, input: str, config: RunnableConfig | None = None, **kwargs: Any) -> list[Document]:
        config = ensure_config(config)
        kwargs["scope"] = resolve(kwargs.get("scope"), config, self.scope, "MemplugRetriever")
        return await super().ainvoke(input, config, **kwargs)

    def _budget(self, k: int | None) -> Budget:
        k = self.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise InvalidInput(f"k must be a positive integer, got {k!r}")
        base = self.budget or Budget()
        return Budget(tokens=base.tokens, k=k, kv_tokens=base.kv_tokens)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                scope: Any = None, k: int | None = None,
                                filters: dict[str, Any] | None = None) -> list[Document]:
        recall = self.memory.read(resolve(scope, None, self.scope, "MemplugRetriever"), query,
                                  self._budget(k), filters if filters is not None else self.filters)
        return recall_documents(recall)

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       scope: Any = None, k: int | None = None,
                                       filters: dict[str, Any] | None = None) -> list[Document]:
        recall = await self.memory.aread(resolve(scope, None, self.scope, "MemplugRetriever"), query,
                                         self._budget(k), filters if filters is not None else self.filters)
        return recall_documents(recall)
