"""memplug for LangChain: a retriever, a vector store, a chat history, a chat model, and
(with the ``langchain`` package) an agent middleware for ``create_agent``.

    from memplug import Memory
    from memplug_langchain import MemplugRetriever
    retriever = MemplugRetriever(memory=Memory(), scope="alice", k=4)
"""

from __future__ import annotations

from typing import Any

from .chat_model import ChatMemplug
from .history import MemplugChatMessageHistory
from .retriever import MemplugRetriever, recall_documents
from .vectorstore import MemplugVectorStore

__all__ = ["ChatMemplug", "MemplugChatMessageHistory", "MemplugMiddleware", "MemplugRetriever",
           "MemplugVectorStore", "recall_documents"]


def __getattr__(name: str) -> Any:
    if name == "MemplugMiddleware":  # needs the langchain package, not only langchain-core
        from .middleware import MemplugMiddleware

        return MemplugMiddleware
    raise AttributeError(name)
