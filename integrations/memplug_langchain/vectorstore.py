"""``MemplugVectorStore``: a LangChain vector store over one memplug scope.

Documents are memplug items stored under their ids (:meth:`memplug.Memory.put`), so
adding a document with an existing id replaces it, and deleting forgets it in every
tier. Search goes through :meth:`memplug.Memory.read` (the pgvector tier's hybrid
vector + keyword search, fused with the other tiers), so searches count as reads and
feed the promotion policies. Embeddings are memplug's own (``Settings.embedder``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore

from memplug import Budget, InvalidInput, Memory, Scope

from ._scope import scope_from

# A search returns k documents whatever their length: the token budget does not cut it.
_NO_TOKEN_LIMIT = 1 << 30


class MemplugVectorStore(VectorStore):
    """``MemplugVectorStore(memory, scope="alice")``: the scope's items as a LangChain vector store."""

    def __init__(self, memory: Memory, scope: Scope | str) -> None:
        if not isinstance(memory, Memory):
            raise InvalidInput(f"memory must be a memplug.Memory, got {type(memory).__name__}")
        resolved = scope_from(scope)
        if resolved is None:
            raise InvalidInput("MemplugVectorStore needs a scope, e.g. scope='alice'")
        self.memory = memory
        self.scope = resolved

    @property
    def embeddings(self) -> Embeddings | None:
        return None  # memplug embeds with its own model (Settings.embedder)

    def add_texts(self, texts: Iterable[str], metadatas: list[dict] | None = None, *,
                  ids: list[str | None] | None = None, **kwargs: Any) -> list[str]:
        texts = list(texts)
        if not texts:
            return []
        if ids is not None and len(ids) != len(texts):
            raise InvalidInput(f"got {len(ids)} ids for {len(texts)} texts")
        keys = [str(i) if i is not None else uuid.uuid4().hex for i in (ids or [None] * len(texts))]
        items = self.memory.put(self.scope, keys, texts, metadatas)
        return [it.key for it in items]

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Forget the documents with these ids (ids not found are ignored); with no ids, nothing."""
        if ids is None:
            raise InvalidInput("delete needs the ids to forget; to forget a whole scope use Memory.forget")
        self.memory.forget_keys(self.scope, [str(i) for i in ids])
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        return [_document(it) for it in self.memory.get_keys(self.scope, [str(i) for i in ids])]

    def similarity_search(self, query: str, k: int = 4, filter: dict[str, Any] | None = None,
                          **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score(query, k, filter=filter, **kwargs)]

    def similarity_search_with_score(self, query: str, k: int = 4, filter: dict[str, Any] | None = None,
                                     **kwargs: Any) -> list[tuple[Document, float]]:
        """The k best documents with their fused rank score (higher is better; not a distance).

        At most ``k``. A plugin's pinned hits (a profile put before every read, beyond the
        read's ``k`` ranked hits) were not ranked by the search: their documents come after
        the ranked ones, with score 0, where ``k`` leaves room."""
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise InvalidInput(f"k must be a positive integer, got {k!r}")
        recall = self.memory.read(self.scope, query, Budget(tokens=_NO_TOKEN_LIMIT, k=k), filter)
        pinned = {h.item.id for h in recall.pinned}
        out: dict[int, tuple[Document, float]] = {}
        for item, _, score in recall.served():
            if item.id not in pinned and item.id not in out:
                out[item.id] = (_document(item), 0.0 if score is None else score)
        for h in recall.pinned:
            if h.item.id not in out:
                out[h.item.id] = (_document(h.item), 0.0)
        return list(out.values())[:k]

    @classmethod
    def from_texts(cls, texts: list[str], embedding: Embeddings | None = None,
                   metadatas: list[dict] | None = None, *, memory: Memory | None = None,
                   scope: Scope | str | None = None, ids: list[str] | None = None,
                   **kwargs: Any) -> MemplugVectorStore:
        """``MemplugVectorStore.from_texts(texts, memory=mem, scope="alice")``."""
        if embedding is not None:
            raise InvalidInput("memplug embeds with its own model (Settings.embedder); pass embedding=None")
        if memory is None or scope is None:
            raise InvalidInput("from_texts needs memory=... and scope=...")
        store = cls(memory, scope)
        store.add_texts(texts, metadatas, ids=ids)
        return store


def _document(item) -> Document:
    return Document(page_content=item.text, metadata=dict(item.metadata), id=item.key or str(item.id))
