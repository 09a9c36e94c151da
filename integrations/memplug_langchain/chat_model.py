"""``ChatMemplug``: memplug's local model as a LangChain chat model, with the scope's memory
injected the way each tier serves it (text in the prompt, KV into attention, the adapter
applied to the weights)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables.config import ensure_config
from pydantic import ConfigDict, Field

from memplug import Budget, InvalidInput, Memory, Recall
from memplug.aio import iterate_in_thread
from memplug.runtime.model_files import DEFAULT_NAME

from ._scope import resolve, scope_from
from .messages import last_user_text, to_chat


class ChatMemplug(BaseChatModel):
    """The local model of a :class:`memplug.Memory`, reading the user's memory on every call.

    ``ChatMemplug(memory=mem, scope="alice")`` reads memory for the last human message and
    answers with it. The scope can also be given per call (``model.invoke(msgs, scope="bob")``)
    or in ``config["configurable"]`` (``user_id``...). Without any scope it is the plain local
    model. ``memplug_recall=`` passes a :class:`memplug.Recall` read elsewhere (the agent
    middleware does), so memory is not read twice.

    ``stop`` ends the reply before the first stop string. ``timeout`` bounds one call's
    generation in seconds (the reply ends there, ``finish_reason`` "timeout").
    ``max_retries`` and ``api_key`` are accepted for drop-in use and unused: nothing remote
    is called.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    memory: Memory = Field(exclude=True)
    scope: Any = None
    budget: Budget | None = None
    filters: dict[str, Any] | None = None
    model_name: str | None = Field(default=None, alias="model")
    temperature: float = 0.0
    max_tokens: int = Field(default=256, gt=0)
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    timeout: float | None = None
    max_retries: int | None = None
    api_key: Any = Field(default=None, exclude=True)
    streaming: bool = False

    @property
    def _llm_type(self) -> str:
        return "memplug"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self._name(), "temperature": self.temperature, "max_tokens": self.max_tokens,
                "top_p": self.top_p}

    def _name(self) -> str:
        return self.model_name or self.memory.settings.model or DEFAULT_NAME

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="memplug", ls_model_name=kwargs.get("model") or self._name(),
                                 ls_model_type="chat", ls_temperature=kwargs.get("temperature", self.temperature),
                                 ls_max_tokens=kwargs.get("max_tokens", self.max_tokens))
        stops = stop or self.stop
        if stops:
            params["ls_stop"] = stops
        return params

    # -- the scope of a call: config["configurable"] reaches _generate as a keyword ---------

    def _with_scope(self, config: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if kwargs.get("scope") is None and kwargs.get("memplug_recall") is None:
            named = scope_from(ensure_config(config).get("configurable") or {})
            if named is not None:
                kwargs["scope"] = named
        return kwargs

    def invoke(self, input: Any, config: Any = None, *, stop: list[str] | None = None, **kwargs: Any) -> Any:
        return super().invoke(input, config, stop=stop, **self._with_scope(config, kwargs))

    async def ainvoke(self, input: Any, config: Any = None, *, stop: list[str] | None = None, **kwargs: Any) -> Any:
        return await super().ainvoke(input, config, stop=stop, **self._with_scope(config, kwargs))

    def stream(self, input: Any, config: Any = None, *, stop: list[str] | None = None,
               **kwargs: Any) -> Iterator[Any]:
        return super().stream(input, config, stop=stop, **self._with_scope(config, kwargs))

    def astream(self, input: Any, config: Any = None, *, stop: list[str] | None = None,
                **kwargs: Any) -> AsyncIterator[Any]:
        return super().astream(input, config, stop=stop, **self._with_scope(config, kwargs))

    # -- generation ------------------------------------------------------------------

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        text, final = "", None
        for chunk in self._stream(messages, stop, run_manager, **kwargs):
            text += chunk.message.content
            final = chunk.message
        message = AIMessage(content=text, usage_metadata=final.usage_metadata,
                            response_metadata=final.response_metadata)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        recall = self._recall(messages, kwargs)
        chats = to_chat(messages)
        if not any(m["role"] == "user" for m in chats):
            raise InvalidInput("ChatMemplug needs at least one human message")
        stops = [s for s in (stop if stop is not None else self.stop) or [] if s]
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        timeout = kwargs.get("timeout", self.timeout)
        prompt = {"tokens": 0}

        def prefill(tokens: int, seconds: float) -> None:
            prompt["tokens"] = tokens

        pieces = self.memory.respond(
            chats, recall, max_new_tokens=max_tokens, temperature=kwargs.get("temperature", self.temperature),
            top_p=kwargs.get("top_p", self.top_p), seed=kwargs.get("seed", self.seed), on_prefill=prefill)
        started = time.perf_counter()
        reason, produced, text = "stop", 0, ""
        try:
            for piece, cut in _until_stop(pieces, stops):
                produced += 1
                if piece:
                    text += piece
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                    if run_manager:
                        run_manager.on_llm_new_token(piece, chunk=chunk)
                    yield chunk
                if cut:
                    break
                if timeout is not None and time.perf_counter() - started > timeout:
                    reason = "timeout"
                    break
            else:
                if produced >= max_tokens:
                    reason = "length"
        finally:
            pieces.close()
        output = self.memory.token_counter.count_many([text])[0] if text else 0
        metadata = {"model_name": self._name(), "model_provider": "memplug", "finish_reason": reason}
        if recall is not None:
            metadata["memplug"] = {"scope": str(recall.scope), "items": [it.id for it in recall.items],
                                   "kv_items": [it.id for it in recall.kv.items] if recall.kv else [],
                                   "adapter": recall.adapter.version if recall.adapter else None}
        yield ChatGenerationChunk(message=AIMessageChunk(
            content="", chunk_position="last", response_metadata=metadata,
            usage_metadata={"input_tokens": prompt["tokens"], "output_tokens": output,
                            "total_tokens": prompt["tokens"] + output}))

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        # The whole generation runs in one worker thread (the model's lock is held by the
        # thread that generates); chunks reach the event loop as they come.
        chunks = iterate_in_thread(lambda: self._stream(messages, stop, None, **kwargs))
        async for chunk in chunks:
            if run_manager and chunk.message.content:
                await run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
            yield chunk

    def _recall(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> Recall | None:
        given = kwargs.get("memplug_recall")
        if given is not None:
            if not isinstance(given, Recall):
                raise InvalidInput(f"memplug_recall must be a memplug.Recall, got {type(given).__name__}")
            return given
        explicit = kwargs.get("scope")
        if scope_from(explicit) is None and scope_from(self.scope) is None:
            return None  # the plain local model
        scope = resolve(explicit, None, self.scope, "ChatMemplug")
        query = last_user_text(messages)
        if query is None:
            return None
        return self.memory.read(scope, query, self.budget, self.filters)


def _until_stop(pieces: Iterator[str], stops: list[str]) -> Iterator[tuple[str, bool]]:
    """Pass pieces through until a stop string appears; (text, True) is the last, cut before it.
    Text that may be the start of a stop string is held back until it is known not to be."""
    if not stops:
        for piece in pieces:
            yield piece, False
        return
    hold = max(map(len, stops)) - 1
    buffer = ""
    for piece in pieces:
        buffer += piece
        at = min((i for i in (buffer.find(s) for s in stops) if i >= 0), default=-1)
        if at >= 0:
            yield buffer[:at], True
            return
        safe = len(buffer) - hold
        if safe > 0:
            yield buffer[:safe], False
            buffer = buffer[safe:]
        else:
            yield "", False
    yield buffer, False
