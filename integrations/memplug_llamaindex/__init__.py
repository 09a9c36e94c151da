"""memplug for LlamaIndex: a memory block for ``llama_index.core.memory.Memory``, a
retriever, and the local model as an LLM with the user's memory injected.

    from llama_index.core.memory import Memory as ChatMemory
    from memplug_llamaindex import MemplugMemoryBlock
    chat_memory = ChatMemory.from_defaults(memory_blocks=[MemplugMemoryBlock(memory=mem, scope="alice")])
"""

from __future__ import annotations

from .llm import MemplugLLM
from .memory_block import MemplugMemoryBlock
from .retriever import MemplugRetriever

__all__ = ["MemplugLLM", "MemplugMemoryBlock", "MemplugRetriever"]
