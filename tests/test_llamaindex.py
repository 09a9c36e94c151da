"""The LlamaIndex integration: the memory block inside LlamaIndex's Memory through a real
flush, the retriever, and the local model as an LLM, per user, sync and async."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import ChatMessage, MessageRole  # noqa: E402
from llama_index.core.memory import Memory as ChatMemory  # noqa: E402

from memplug import Scope  # noqa: E402
from memplug_llamaindex import MemplugLLM, MemplugMemoryBlock, MemplugRetriever  # noqa: E402


def words(text: str) -> list[str]:
    return text.split()  # LlamaIndex's default tokenizer would fetch tiktoken files over the network


def user_says(text: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, content=text)


def assistant_says(text: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.ASSISTANT, content=text)


async def test_flushed_turns_reach_memplug_and_come_back_for_the_input(memory, user):
    block = MemplugMemoryBlock(memory=memory, scope=user)
    chat_memory = ChatMemory.from_defaults(session_id="s1", token_limit=60, chat_history_token_ratio=0.5,
                                           token_flush_size=20, memory_blocks=[block], tokenizer_fn=words)
    await chat_memory.aput_messages([
        user_says("The user's cat is named Pepper and she is nine years old."),
        assistant_says("Pepper sounds lovely, a nine year old cat."),
        user_says("The user works as a nurse at the city hospital on night shifts."),
        assistant_says("Night shifts at a hospital must be tiring for a nurse."),
        user_says("The user is learning Portuguese before moving to Lisbon next spring."),
        assistant_says("Good luck with Portuguese and the move to Lisbon."),
    ])
    # The flush wrote the oldest user turns to memplug (assistant replies are not facts).
    stored = [it.text for it in memory.items(Scope(user))]
    assert any("Pepper" in t for t in stored)
    assert not any(t.startswith("Pepper sounds") for t in stored)
    got = await chat_memory.aget(input=user_says("What is the name of the user's cat?"))
    system = next(m for m in got if m.role == MessageRole.SYSTEM)
    assert "Pepper" in system.content and "memplug" in system.content


def test_two_users_through_one_llm_get_their_own_memory(memory, users):
    alice, bob = users(2)
    memory.write(Scope(alice), "The user's cat is named Pepper.")
    memory.write(Scope(bob), "The user's cat is named Socks.")
    llm = MemplugLLM(memory=memory, max_tokens=16)
    question = [user_says("What is the name of the user's cat?")]
    a = llm.chat(question, scope=alice)
    b = llm.chat(question, scope=bob)
    assert "Pepper" in a.message.content and "Socks" not in a.message.content
    assert "Socks" in b.message.content and "Pepper" not in b.message.content
    assert a.raw["scope"] == alice and a.raw["prompt_tokens"] > 0
    assert "Pepper" in llm.complete("What is the name of the user's cat?", scope=alice).text


async def test_llm_async_stream_and_retriever(memory, user):
    memory.write(Scope(user), ["The user's cat is named Pepper.", "The user's car is a red Fiat."])
    llm = MemplugLLM(memory=memory, scope=user, max_tokens=16)
    text = ""
    async for response in await llm.astream_chat([user_says("What is the name of the user's cat?")]):
        text += response.delta or ""
    assert "Pepper" in text
    assert "Pepper" in (await llm.achat([user_says("What is the name of the user's cat?")])).message.content
    nodes = await MemplugRetriever(memory, user, k=1).aretrieve("what car does the user drive?")
    assert len(nodes) == 1 and "Fiat" in nodes[0].node.get_content()
    assert nodes[0].node.metadata["memplug_tier"] == "pgvector"


def test_chat_engine_with_the_block_personalises(memory, users):
    from llama_index.core.chat_engine import SimpleChatEngine

    alice, bob = users(2)
    memory.write(Scope(alice), "The user's cat is named Pepper.")
    memory.write(Scope(bob), "The user's cat is named Socks.")
    llm = MemplugLLM(memory=memory, max_tokens=16)
    for user, name in ((alice, "Pepper"), (bob, "Socks")):
        chat_memory = ChatMemory.from_defaults(session_id=user, tokenizer_fn=words,
                                               memory_blocks=[MemplugMemoryBlock(memory=memory, scope=user)])
        engine = SimpleChatEngine.from_defaults(llm=llm, memory=chat_memory)
        assert name in engine.chat("What is the name of the user's cat?").response
