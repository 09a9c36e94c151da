"""``MemplugMiddleware``: memory for agents built with LangChain's ``create_agent``.

Before each model call it reads the user's memory for the last human message and
injects it: as text in the system message for any chat model, and for
:class:`ChatMemplug` as the recall itself (text, KV memory and adapter). After the
agent finishes it writes the turn (the human message and the final reply).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from memplug import Budget, Memory, Recall, Scope

from ._scope import resolve
from .chat_model import ChatMemplug
from .messages import last_user_text, text_of


def _config() -> dict[str, Any]:
    try:
        from langgraph.config import get_config

        return get_config()
    except RuntimeError:  # outside a graph run
        return {}


class MemplugMiddleware(AgentMiddleware):
    """``create_agent(model, tools, middleware=[MemplugMiddleware(mem)])``.

    The scope comes from ``scope=`` here, else from the run's context
    (``agent.invoke(..., context={"user_id": "alice"})`` or any object with ``user_id``),
    else from ``config["configurable"]``. Turns are written to the scope's session, or to
    the run's ``thread_id``, or to session ``"default"``.
    """

    def __init__(self, memory: Memory, scope: Scope | str | None = None, budget: Budget | None = None,
                 filters: dict[str, Any] | None = None, write: bool = True,
                 header: str = "What you remember about this user:") -> None:
        super().__init__()
        self.memory = memory
        self.scope = scope
        self.budget = budget
        self.filters = filters
        self.write = write
        self.header = header

    def _scope(self, runtime: Any) -> Scope:
        """The run's scope, in a session: its own, else the run's thread, else "default".
        Reads see the user's knowledge and this session's recent turns; turns go to the session."""
        config = _config()
        scope = resolve(getattr(runtime, "context", None), config, self.scope, "MemplugMiddleware")
        if scope.session_id is None:
            thread = (config.get("configurable") or {}).get("thread_id")
            scope = Scope(scope.user_id, scope.agent_id, str(thread) if thread is not None else "default")
        return scope

    def _inject(self, request: ModelRequest, recall: Recall | None) -> ModelRequest:
        if recall is None or not recall.items:
            return request
        if isinstance(request.model, ChatMemplug):
            return request.override(model_settings={**request.model_settings, "memplug_recall": recall})
        memories = recall.as_text()
        if not memories:
            return request
        base = text_of(request.system_message.content) if request.system_message else ""
        system = f"{base}\n\n{self.header}\n{memories}" if base else f"{self.header}\n{memories}"
        return request.override(system_message=SystemMessage(content=system))

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> Any:
        query = last_user_text(request.messages)
        recall = None
        if query is not None:
            recall = self.memory.read(self._scope(request.runtime), query, self.budget, self.filters)
        return handler(self._inject(request, recall))

    async def awrap_model_call(self, request: ModelRequest,
                               handler: Callable[[ModelRequest], Awaitable[ModelResponse]]) -> Any:
        query = last_user_text(request.messages)
        recall = None
        if query is not None:
            recall = await self.memory.aread(self._scope(request.runtime), query, self.budget, self.filters)
        return await handler(self._inject(request, recall))

    def _turn(self, state: Any, runtime: Any) -> tuple[Scope, list[dict[str, str]]] | None:
        if not self.write:
            return None
        messages = state["messages"] if isinstance(state, dict) else state.messages
        asked = next((n for n in range(len(messages) - 1, -1, -1) if isinstance(messages[n], HumanMessage)), None)
        if asked is None:
            return None
        question = text_of(messages[asked].content)
        reply = next((text_of(m.content) for m in reversed(messages[asked + 1:])
                      if isinstance(m, AIMessage) and text_of(m.content).strip()), None)
        turns = [{"role": "user", "content": question}]
        if reply:
            turns.append({"role": "assistant", "content": reply})
        turns = [t for t in turns if t["content"].strip()]
        if not turns:
            return None
        return self._scope(runtime), turns

    def after_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        turn = self._turn(state, runtime)
        if turn is not None:
            self.memory.write_messages(*turn)
        return None

    async def aafter_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        turn = self._turn(state, runtime)
        if turn is not None:
            await self.memory.awrite_messages(*turn)
        return None
