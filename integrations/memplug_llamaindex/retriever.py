"""``MemplugRetriever`` for LlamaIndex: nodes from :meth:`memplug.Memory.read`."""

from __future__ import annotations

from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from memplug import Budget, InvalidInput, Memory, Recall, Scope


def recall_nodes(recall: Recall) -> list[NodeWithScore]:
    """The recall's items as nodes, best first (text hits, then KV-served, then adapter-held)."""
    return [NodeWithScore(node=TextNode(text=item.text, id_=item.key or str(item.id),
                                        metadata={**item.metadata, "memplug_item_id": item.id, "memplug_tier": tier}),
                          score=score)
            for item, tier, score in recall.served()]


class MemplugRetriever(BaseRetriever):
    """``MemplugRetriever(mem, scope="alice", k=4)``: the user's memory for any query engine."""

    def __init__(self, memory: Memory, scope: Scope | str, k: int = 4, budget: Budget | None = None,
                 filters: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise InvalidInput(f"k must be a positive integer, got {k!r}")
        super().__init__(**kwargs)
        base = budget or Budget()
        self.memory = memory
        self.scope = Scope.of(scope)
        self.budget = Budget(tokens=base.tokens, k=k, kv_tokens=base.kv_tokens)
        self.filters = filters

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return recall_nodes(self.memory.read(self.scope, query_bundle.query_str, self.budget, self.filters))

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        recall = await self.memory.aread(self.scope, query_bundle.query_str, self.budget, self.filters)
        return recall_nodes(recall)
