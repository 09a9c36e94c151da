"""The LangChain integration: LangChain's own standard suites, the chat history, the agent
middleware, per-user scopes and the async paths, on the real Postgres, embedder and SmolLM2."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.language_models import BaseChatModel  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage  # noqa: E402
from langchain_core.outputs import ChatGeneration, ChatResult  # noqa: E402
from langchain_tests.integration_tests import (  # noqa: E402
    ChatModelIntegrationTests,
    RetrieversIntegrationTests,
    VectorStoreIntegrationTests,
)
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from memplug import InvalidInput, InvalidScope, Memory, Scope  # noqa: E402
from memplug_langchain import (  # noqa: E402
    ChatMemplug,
    MemplugChatMessageHistory,
    MemplugRetriever,
    MemplugVectorStore,
)

_SHARED: dict[str, Any] = {}


def shared_memory() -> Memory:
    """One Memory for the standard suites, whose fixtures are built from class properties."""
    if "memory" not in _SHARED:
        _SHARED["memory"] = Memory()
    return _SHARED["memory"]


@pytest.fixture(scope="module", autouse=True)
def _close_shared(dsn):
    yield
    mem = _SHARED.pop("memory", None)
    if mem is not None:
        mem.close()


FACTS = ["Alice's locker code is 4417.", "Alice's dog is called Biscuit.", "Alice works at the harbour office.",
         "Alice's sister lives in Porto.", "Alice takes the 7:40 train on weekdays."]


class TestMemplugRetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[MemplugRetriever]:
        return MemplugRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        mem = shared_memory()
        if "retriever_scope" not in _SHARED:
            _SHARED["retriever_scope"] = scope = Scope("u" + uuid.uuid4().hex[:12])
            mem.write(scope, FACTS)
        return {"memory": mem, "scope": _SHARED["retriever_scope"]}

    @property
    def retriever_query_example(self) -> str:
        return "what is alice's locker code?"


class TestMemplugVectorStoreStandard(VectorStoreIntegrationTests):
    @pytest.fixture
    def vectorstore(self):
        mem = shared_memory()
        scope = Scope("u" + uuid.uuid4().hex[:12])
        store = MemplugVectorStore(mem, scope)
        try:
            yield store
        finally:
            mem.forget(scope)


class _ChatParams:
    @property
    def chat_model_class(self) -> type[ChatMemplug]:
        return ChatMemplug

    @property
    def chat_model_params(self) -> dict:
        return {"memory": shared_memory()}

    @property
    def standard_chat_model_params(self) -> dict:
        return {**super().standard_chat_model_params, "max_tokens": 12}  # short replies keep the suite fast

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        return False  # one local model per Memory

    @property
    def returns_usage_metadata(self) -> bool:
        return True


class TestChatMemplugUnit(_ChatParams, ChatModelUnitTests):
    pass


class TestChatMemplugIntegration(_ChatParams, ChatModelIntegrationTests):
    pass


# -- beyond the standard suites ------------------------------------------------------


def test_retriever_keeps_users_apart_and_takes_the_scope_from_config(memory, users):
    alice, bob = users(2)
    memory.write(Scope(alice), "My favourite colour is green.")
    memory.write(Scope(bob), "My favourite colour is purple.")
    retriever = MemplugRetriever(memory=memory, k=2)
    for user, word, other in ((alice, "green", "purple"), (bob, "purple", "green")):
        docs = retriever.invoke("favourite colour", config={"configurable": {"user_id": user}})
        text = " ".join(d.page_content for d in docs)
        assert word in text and other not in text
        docs = retriever.invoke("favourite colour", scope=user)
        assert all(d.metadata["memplug_item_id"] for d in docs) and word in docs[0].page_content
    with pytest.raises(InvalidScope, match="user_id"):
        retriever.invoke("favourite colour")


async def test_retriever_async_per_user(memory, users):
    alice, bob = users(2)
    memory.write(Scope(alice), "Alice's flight leaves from gate B12.")
    memory.write(Scope(bob), "Bob's flight leaves from gate C3.")
    retriever = MemplugRetriever(memory=memory, k=1)
    a = await retriever.ainvoke("which gate?", config={"configurable": {"user_id": alice}})
    b = await retriever.ainvoke("which gate?", config={"configurable": {"user_id": bob}})
    assert "B12" in a[0].page_content and "C3" in b[0].page_content


def test_vector_store_replaces_by_id_and_forgets_everywhere(memory, user):
    store = MemplugVectorStore(memory, user)
    ids = store.add_documents([Document(page_content="The boiler was serviced in March.", id="doc-1",
                                        metadata={"room": "basement"})])
    assert ids == ["doc-1"]
    [item] = memory.get_keys(user, ["doc-1"])
    # Same text, new metadata: the item (and its usage) is kept.
    store.add_documents([Document(page_content="The boiler was serviced in March.", id="doc-1",
                                  metadata={"room": "cellar"})])
    [same] = memory.get_keys(user, ["doc-1"])
    assert same.id == item.id and same.metadata == {"room": "cellar"}
    # New text: the old item is forgotten in every tier.
    store.add_documents([Document(page_content="The boiler was replaced in May.", id="doc-1")])
    assert [d.page_content for d in store.similarity_search("boiler", k=5)] == ["The boiler was replaced in May."]
    assert item.id not in [it.id for it in memory.items(user)]
    with pytest.raises(InvalidInput, match="ids"):
        store.add_texts(["a", "b"], ids=["x"])
    with pytest.raises(InvalidInput, match="key twice"):
        memory.put(user, ["k", "k"], ["one", "two"])
    assert [d.id for d in store.get_by_ids(["doc-1"])] == ["doc-1"]
    with pytest.raises(InvalidInput, match="keys must be a list of strings"):
        memory.get_keys(user, "doc-1")
    with pytest.raises(InvalidInput, match=r"keys\[0\] must be a str, got int"):
        memory.forget_keys(user, [1])


def test_vector_store_returns_at_most_k_documents_and_no_pinned_context(make_memory, user):
    from memplug import Budget, Hit, hookimpl
    from memplug.plugin import ITEM_COLUMNS, item_from_row, visible_sql

    class Pin:  # puts the scope's oldest item before every read, as a profile plugin does
        name = "pin"

        @hookimpl
        def memplug_read(self, scope, db):
            where, params = visible_sql(scope, "i")
            row = db.execute(f"SELECT {ITEM_COLUMNS} FROM items i WHERE {where} ORDER BY i.id LIMIT 1",
                             params).fetchone()
            if row is None:
                return None
            item = item_from_row(row)
            return [Hit(item, self.name, 1.0, text="profile: " + item.text, pinned=True)]

    mem = make_memory(plugins=[Pin()])
    store = MemplugVectorStore(mem, user)
    store.add_texts(["My dog is called Pickles.", "The boiler was serviced in March.", "The boiler is in the cellar."])
    read = mem.read(user, "boiler", Budget(k=1))
    assert len(read.hits) == 1 and read.pinned[0].text.startswith("profile: ")  # the read keeps the pinned hit
    for k in (1, 2, 3, 4):
        found = store.similarity_search_with_score("when was the boiler serviced", k=k)
        texts = [d.page_content for d, _ in found]
        assert len(found) == min(k, 3) and texts[0] == "The boiler was serviced in March."
        assert texts[2:] == ["My dog is called Pickles."][:k - 2]  # the pinned item last, unranked
        assert all(score == 0.0 for d, score in found if d.page_content.startswith("My dog"))


def test_chat_history_is_the_sessions_context_buffer(memory, user):
    scope = Scope(user, session_id="s1")
    history = MemplugChatMessageHistory(memory, scope)
    history.add_messages([HumanMessage("I'm allergic to peanuts."), AIMessage("Noted, no peanuts.")])
    assert [(type(m), m.content) for m in history.messages] == [
        (HumanMessage, "I'm allergic to peanuts."), (AIMessage, "Noted, no peanuts.")]
    # Another session of the same user has its own history.
    assert MemplugChatMessageHistory(memory, Scope(user, session_id="s2")).messages == []
    memory.end_session(scope)  # flushed turns become the user's long-term knowledge
    assert history.messages == []
    assert "peanuts" in memory.read(Scope(user), "what am I allergic to?").as_text()
    history.add_messages([HumanMessage("hello")])
    history.clear()
    assert history.messages == []
    with pytest.raises(InvalidInput, match="session_id"):
        MemplugChatMessageHistory(memory, Scope(user))


def test_chat_model_answers_from_each_users_memory(memory, users):
    """Two users through one ChatMemplug: each answer comes from that user's own memory."""
    alice, bob = users(2)
    memory.write(Scope(alice), "The user's cat is named Pepper.")
    memory.write(Scope(bob), "The user's cat is named Socks.")
    chat = ChatMemplug(memory=memory, max_tokens=16)
    question = [SystemMessage("Answer in one short sentence."), HumanMessage("What is the name of the user's cat?")]
    a = chat.invoke(question, config={"configurable": {"user_id": alice}})
    b = chat.invoke(question, scope=bob)
    assert "Pepper" in a.content and "Socks" not in a.content
    assert "Socks" in b.content and "Pepper" not in b.content
    assert a.response_metadata["memplug"]["scope"] == alice
    assert a.usage_metadata["input_tokens"] > 0 and a.usage_metadata["output_tokens"] > 0


async def test_chat_model_async_stream_with_memory(memory, user):
    memory.write(Scope(user), "The user's cat is named Pepper.")
    chat = ChatMemplug(memory=memory, scope=user, max_tokens=16)
    text = ""
    async for chunk in chat.astream([HumanMessage("What is the name of the user's cat?")]):
        text += chunk.content
    assert "Pepper" in text


def test_chat_model_stop_cuts_before_the_stop_string(memory):
    chat = ChatMemplug(memory=memory, max_tokens=24)
    question = "Name three colours."
    full = chat.invoke(question).content
    assert " " in full.strip(), full
    stop = full.strip().split()[1]  # the reply's second word
    cut = chat.invoke(question, stop=[stop]).content
    assert cut == full[:full.index(stop)] and cut
    assert chat.invoke("Say hi.", stop=[","]).response_metadata["finish_reason"] in ("stop", "length")


class _EchoSystem(BaseChatModel):
    """Another provider's chat model, as far as the middleware can tell: it replies with the
    system message it was given, so a test can see what memory reached the prompt."""

    @property
    def _llm_type(self) -> str:
        return "echo-system"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        system = next((m.content for m in messages if isinstance(m, SystemMessage)), "")
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=f"[system] {system}"))])


@dataclass
class UserContext:
    user_id: str


def test_agent_middleware_reads_into_any_model_and_writes_the_turn(memory, users):
    from langchain.agents import create_agent

    from memplug_langchain import MemplugMiddleware

    alice, bob = users(2)
    memory.write(Scope(alice), "The user's cat is named Pepper.")
    memory.write(Scope(bob), "The user's cat is named Socks.")
    agent = create_agent(_EchoSystem(), tools=[], system_prompt="You are helpful.",
                         middleware=[MemplugMiddleware(memory)], context_schema=UserContext)
    out = agent.invoke({"messages": [HumanMessage("What is the name of the user's cat?")]},
                       context=UserContext(alice))
    reply = out["messages"][-1].content
    assert reply.startswith("[system] You are helpful.") and "Pepper" in reply and "Socks" not in reply
    # The turn went to the user's memory (session "default": no thread id, no session in the scope).
    turns = memory.turns(Scope(alice, session_id="default"))
    assert [t.role for t in turns] == ["user", "assistant"] and turns[0].text.startswith("What is the name")
    assert memory.turns(Scope(bob, session_id="default")) == []


async def test_agent_middleware_with_chat_memplug_async(memory, user):
    from langchain.agents import create_agent

    from memplug_langchain import MemplugMiddleware

    memory.write(Scope(user), "The user's cat is named Pepper.")
    agent = create_agent(ChatMemplug(memory=memory, max_tokens=16), tools=[],
                         middleware=[MemplugMiddleware(memory)])
    out = await agent.ainvoke({"messages": [HumanMessage("What is the name of the user's cat?")]},
                              config={"configurable": {"user_id": user, "thread_id": "t1"}})
    reply = out["messages"][-1]
    assert "Pepper" in reply.content
    assert reply.response_metadata["memplug"]["scope"] == f"{user}//t1"  # ChatMemplug got the recall itself
    assert [t.role for t in memory.turns(Scope(user, session_id="t1"))] == ["user", "assistant"]


def test_chat_memplug_injects_kv_memory(make_memory, tmp_path, user):
    """An item promoted to the kv tier reaches ChatMemplug as attention key/values, not as prompt text."""
    from memplug import Move, Settings

    mem = make_memory(settings=Settings(plugins="context,pgvector,kv"),
                      options={"artifacts": str(tmp_path / "artifacts")})
    [item] = mem.write(Scope(user), ["The user's cat is named Pepper."])
    mem.consolidate(Scope(user), [Move((item.id,), 1, 2, "test")])
    chat = ChatMemplug(memory=mem, scope=user, max_tokens=16)
    reply = chat.invoke("What is the name of the user's cat?")
    assert reply.response_metadata["memplug"]["kv_items"] == [item.id]
    assert "Pepper" in reply.content
    as_text = ChatMemplug(memory=mem, max_tokens=16).invoke(
        [SystemMessage("The user's cat is named Pepper."), HumanMessage("What is the name of the user's cat?")])
    assert reply.usage_metadata["input_tokens"] < as_text.usage_metadata["input_tokens"]
