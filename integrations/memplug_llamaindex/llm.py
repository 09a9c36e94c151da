"""``MemplugLLM``: memplug's local model as a LlamaIndex LLM, reading the user's memory on
every call and serving it the way each tier holds it (text, injected KV, the adapter)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from pydantic import ConfigDict, Field

from memplug import Budget, InvalidInput, Memory, Recall, Scope
from memplug.aio import iterate_in_thread

from .messages import last_user_text, to_chat

CONTEXT_WINDOW = 8192  # SmolLM2's; the runtime's own limits still apply


class MemplugLLM(CustomLLM):
    """``MemplugLLM(memory=mem, scope="alice")``. Without a scope it is the plain local model.

    ``chat(messages, scope=...)`` overrides the scope for one call. Each response's ``raw``
    says which items memory contributed, and how (``kv_items``, ``adapter``).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    memory: Memory = Field(exclude=True)
    scope: Any = None
    budget: Budget | None = None
    filters: dict[str, Any] | None = None
    max_tokens: int = Field(default=256, gt=0)
    temperature: float = 0.0
    model_name: str | None = None

    @classmethod
    def class_name(cls) -> str:
        return "memplug_llm"

    @property
    def metadata(self) -> LLMMetadata:
        from memplug.runtime.model_files import DEFAULT_NAME

        return LLMMetadata(context_window=CONTEXT_WINDOW, num_output=self.max_tokens, is_chat_model=True,
                           model_name=self.model_name or self.memory.settings.model or DEFAULT_NAME)

    # -- the one generator everything else is built on ----------------------------------

    def _pieces(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> tuple[Iterator[str], dict]:
        chats = to_chat(messages)
        if not any(m["role"] == "user" for m in chats):
            raise InvalidInput("MemplugLLM needs at least one user message")
        scope = kwargs.get("scope") or self.scope
        recall: Recall | None = None
        query = last_user_text(messages)
        if scope is not None and query is not None:
            recall = self.memory.read(Scope.of(scope), query, self.budget, self.filters)
        raw: dict[str, Any] = {"prompt_tokens": 0}
        if recall is not None:
            raw.update(scope=str(recall.scope), items=[it.id for it in recall.items],
                       kv_items=[it.id for it in recall.kv.items] if recall.kv else [],
                       adapter=recall.adapter.version if recall.adapter else None)

        def prefill(tokens: int, seconds: float) -> None:
            raw["prompt_tokens"] = tokens

        pieces = self.memory.respond(chats, recall, max_new_tokens=kwargs.get("max_tokens", self.max_tokens),
                                     temperature=kwargs.get("temperature", self.temperature), on_prefill=prefill)
        return pieces, raw

    @staticmethod
    def _as_messages(prompt: str) -> list[ChatMessage]:
        return [ChatMessage(role=MessageRole.USER, content=prompt)]

    # -- chat -------------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        pieces, raw = self._pieces(messages, kwargs)
        text = "".join(pieces)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), raw=raw)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        def gen() -> ChatResponseGen:
            pieces, raw = self._pieces(messages, kwargs)
            text = ""
            for piece in pieces:
                text += piece
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece,
                                   raw=raw)
        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        last = None
        async for response in iterate_in_thread(lambda: self.stream_chat(messages, **kwargs)):
            last = response
        if last is None:
            return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=""))
        return ChatResponse(message=last.message, raw=last.raw)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        async def gen() -> ChatResponseAsyncGen:
            async for response in iterate_in_thread(lambda: self.stream_chat(messages, **kwargs)):
                yield response
        return gen()

    # -- completion: the prompt is one user message ---------------------------------------

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        response = self.chat(self._as_messages(prompt), **kwargs)
        return CompletionResponse(text=response.message.content or "", raw=response.raw)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        def gen() -> CompletionResponseGen:
            for response in self.stream_chat(self._as_messages(prompt), **kwargs):
                yield CompletionResponse(text=response.message.content or "", delta=response.delta, raw=response.raw)
        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        response = await self.achat(self._as_messages(prompt), **kwargs)
        return CompletionResponse(text=response.message.content or "", raw=response.raw)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        async def gen() -> CompletionResponseAsyncGen:
            async for response in iterate_in_thread(lambda: self.stream_chat(self._as_messages(prompt), **kwargs)):
                yield CompletionResponse(text=response.message.content or "", delta=response.delta, raw=response.raw)
        return gen()
