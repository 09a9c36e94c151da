"""``MemplugChatMessageHistory``: a LangChain chat history backed by memplug's context tier."""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from memplug import InvalidInput, Memory, Scope

from .messages import to_chat

_CLASSES = {"user": HumanMessage, "assistant": AIMessage, "system": SystemMessage}


class MemplugChatMessageHistory(BaseChatMessageHistory):
    """The turns of one session: ``MemplugChatMessageHistory(mem, Scope("alice", session_id="s1"))``.

    ``messages`` are the turns the context tier still holds for the session. When the
    session outgrows its token budget (or ends) the oldest turns are flushed into the
    user's long-term memory: they leave this history and are found by reads instead.
    ``clear()`` forgets the session, and what it flushed stays the user's knowledge.
    """

    def __init__(self, memory: Memory, scope: Scope | str) -> None:
        scope = Scope.of(scope)
        if scope.session_id is None:
            raise InvalidInput("a chat history needs a scope with a session_id, e.g. Scope('alice', session_id='s1')")
        self.memory = memory
        self.scope = scope

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        return [_CLASSES[it.role](content=it.text) for it in self.memory.turns(self.scope)]

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        turns = [m for m in to_chat(messages, tools_as_user=True) if m["content"].strip()]
        if turns:
            self.memory.write_messages(self.scope, turns)

    def clear(self) -> None:
        self.memory.forget(self.scope)
