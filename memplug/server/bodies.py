"""The JSON bodies of ``memplug serve``'s endpoints. Unknown fields and values of the wrong type are
refused (422), never coerced: ``"5"`` is not 5. What memplug itself checks (texts, scopes, metadata,
times) is left to it, so that the errors are the library's."""

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


ScopeField = Annotated[str, Field(description="Whose memory: user[/agent[/session]], e.g. alice or alice/helper/s1",
                                  examples=["alice"])]
Metadata = dict[str, Any]


class WriteBody(Body):
    scope: ScopeField
    text: str
    metadata: Metadata | None = None
    occurred_at: str | None = Field(None, description="When it happened, ISO 8601")


class WriteBatchBody(Body):
    scope: ScopeField
    texts: list[str]
    metadata: Metadata | list[Metadata | None] | None = Field(None, description="One for all texts, or one per text")
    occurred_at: str | list[str | None] | None = Field(None, description="One for all texts, or one per text")


class PutBody(Body):
    scope: ScopeField
    keys: list[str]
    texts: list[str]
    metadatas: list[Metadata | None] | None = None
    occurred_at: str | list[str | None] | None = None


class Message_(Body):
    role: str
    content: str
    name: str | None = None


class MessagesBody(Body):
    scope: ScopeField
    messages: list[Message_]


class BudgetBody(Body):
    tokens: int = 1024
    k: int = 10
    kv_tokens: int = 2048


class ReadBody(Body):
    scope: ScopeField
    query: str
    budget: BudgetBody | None = None
    filters: Metadata | None = None
    since: str | None = None
    until: str | None = None
    min_relevance: float | None = None


class FeedbackBody(Body):
    scope: ScopeField
    item_ids: list[int]
    used: bool = True


class ForgetBody(Body):
    scope: ScopeField
    item_ids: list[int] | None = Field(None, description="These items; or give all: true")
    all: bool = Field(False, description="Forget the scope and every scope under it")


class IdsBody(Body):
    scope: ScopeField
    item_ids: list[int]


class KeysBody(Body):
    scope: ScopeField
    keys: list[str]


class ScopeBody(Body):
    scope: ScopeField


class MoveBody(Body):
    item_ids: list[int]
    src_level: int
    dst_level: int
    reason: str


class ConsolidateBody(Body):
    scope: ScopeField
    moves: list[MoveBody] | None = Field(None, description="Explicit moves; without them the policies plan")
    queue: bool = Field(False, description="Queue a job for `memplug worker` and return its id")
