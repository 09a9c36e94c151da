"""``memplug mcp``: memory as tools of an MCP server (the official ``mcp`` SDK).

Two ways to know whose memory a call touches, and neither lets a call choose it:

- **stdio** (a desktop client starts ``memplug mcp --user alice``): every call acts
  in the scope the command line gave.
- **streamable HTTP** (``memplug serve`` at ``/mcp``, or ``memplug mcp --http``):
  the client sends an API key as a bearer token. A key bound to one user acts for
  that user; a key bound to a prefix names the user in the ``X-Memplug-Scope``
  header (``user[/agent]``), which the key must cover.

No tool has a user argument, and a call that passes one (or any argument the tool
does not take) is refused with an error naming it. Failures reach the model as
tool errors (``isError``) whose text names the error and the argument.
"""

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from ..errors import AccessDenied, InvalidInput, MemplugError
from ..memory import Memory
from ..types import Budget, Item, Recall, Scope
from . import wire
from .keys import ApiKey, verify_key
from .limits import RateLimiter

# The X-Memplug-Scope header of the HTTP request being served (set by the HTTP front, read by tools
# and resources; static resources get no Context, so a context variable carries it).
SCOPE_HEADER = "x-memplug-scope"
request_scope: contextvars.ContextVar[str | None] = contextvars.ContextVar("memplug_mcp_scope", default=None)

INSTRUCTIONS = (
    "Long-term memory of the user you are talking with. Call `recall` before answering anything that may "
    "depend on what the user told you in earlier conversations. Call `remember` when the user tells you "
    "something worth keeping (a fact about them, a preference, a plan, a decision), one self-contained "
    "statement per call. Call `forget` only when the user asks you to forget something."
)


class KeyVerifier:
    """The MCP SDK's token verifier: a bearer token is a memplug API key."""

    def __init__(self, memory: Memory):
        self.memory = memory

    async def verify_token(self, token: str) -> AccessToken | None:
        import anyio

        try:
            key = await anyio.to_thread.run_sync(verify_key, self.memory.store, token)
        except MemplugError:
            return None
        return AccessToken(token=key.id, client_id=key.id, scopes=[],
                           claims={"user_id": key.user_id, "user_prefix": key.user_prefix,
                                   "rate_limit": key.rate_limit})


class Tenancy:
    """Whose memory a call may touch: a fixed scope (stdio) or the caller's API key (HTTP)."""

    def __init__(self, scope: Scope | None, limiter: RateLimiter | None = None):
        self.fixed = scope
        self.limiter = limiter

    def scope(self) -> Scope:
        if self.fixed is not None:
            return self.fixed
        token = get_access_token()
        if token is None:  # the HTTP front refuses such requests; this guards a misconfigured mount
            raise AccessDenied("this MCP server needs an API key (Authorization: Bearer mpk_...)")
        claims = token.claims or {}
        key = ApiKey(token.client_id, claims.get("user_id"), claims.get("user_prefix"),
                     rate_limit=claims.get("rate_limit"))
        if self.limiter is not None:
            self.limiter.take(key.id, key.rate_limit)
        named = request_scope.get()
        if named is None:
            if key.user_id is None:
                raise AccessDenied(f"API key {key.id} covers users {key.covers}: name one in the X-Memplug-Scope "
                                   "header (user or user/agent)")
            return Scope(key.user_id)
        scope = key.check(Scope.parse(named))
        if scope.session_id is not None:
            raise InvalidInput("X-Memplug-Scope names a user or user/agent; sessions are arguments of end_session")
        return scope


@functools.cache
def _arguments(fn: Callable[..., Any]) -> frozenset[str]:
    return frozenset(p for p in inspect.signature(fn).parameters if p != "ctx")


# Python names of the tools that are not their tool names.
TOOL_NAMES = {"list_memories": "list", "inspect_memories": "inspect"}


def _refuse_unknown(ctx: Context, fn: Callable[..., Any]) -> None:
    given = (ctx.request_context.params or {}).get("arguments") or {}
    allowed = _arguments(fn)
    unknown = sorted(set(given) - allowed)
    if unknown:
        takes = ", ".join(sorted(allowed)) or "none"
        whose = (" (whose memory it is comes from the server's configuration or the API key)"
                 if any("user" in u or "scope" in u for u in unknown) else "")
        name = TOOL_NAMES.get(fn.__name__, fn.__name__)
        raise InvalidInput(f"{name} takes no argument(s) {', '.join(unknown)}; it takes {takes}{whose}")


@contextlib.contextmanager
def _tool_errors() -> Iterator[None]:
    """memplug's errors as tool errors, named, for the model to read and correct."""
    try:
        yield
    except MemplugError as e:
        raise ToolError(f"{type(e).__name__}: {e}") from None


def _hits(recall: Recall) -> list[dict[str, Any]]:
    """Every memory a read returned, as :meth:`Recall.served` orders them, with the query's relevance."""
    relevance = {h.item.id: h.relevance for h in recall.pinned + recall.hits + recall.covered}
    return [_hit(item, tier, score, relevance.get(item.id)) for item, tier, score in recall.served()]


def _hit(item: Item, tier: str, score: float | None, relevance: float | None) -> dict[str, Any]:
    out = {"id": item.id, "text": item.text, "tier": tier,
           "score": None if score is None else round(score, 4),
           "relevance": None if relevance is None else round(relevance, 4),
           "created_at": wire.when(item.created_at)}
    if item.occurred_at is not None:
        out["occurred_at"] = wire.when(item.occurred_at)
    if item.role is not None:
        out["role"] = item.role
    if item.metadata:
        out["metadata"] = dict(item.metadata)
    return out


def _item(item: Item) -> dict[str, Any]:
    out = {"id": item.id, "text": item.text, "created_at": wire.when(item.created_at)}
    if item.occurred_at is not None:
        out["occurred_at"] = wire.when(item.occurred_at)
    if item.metadata:
        out["metadata"] = dict(item.metadata)
    if str(item.scope) != item.scope.user_id:
        out["scope"] = str(item.scope)
    return out


def build_server(memory: Memory, scope: Scope | None = None, *, operator: bool = False,
                 limiter: RateLimiter | None = None, verifier: KeyVerifier | None = None,
                 base_url: str = "http://127.0.0.1") -> MCPServer:
    """An MCP server over ``memory``: for one fixed ``scope`` (stdio), or, with ``scope`` None, for the
    callers' API keys (HTTP; ``verifier`` checks them). ``operator`` adds ``end_session`` and ``consolidate``."""
    if scope is None and verifier is None:
        raise ValueError("an MCP server without a fixed scope needs a key verifier")
    auth: dict[str, Any] = {}
    if verifier is not None:
        from mcp.server.auth.settings import AuthSettings

        # The SDK asks for an issuer; memplug issues its own keys (memplug keys create), so it names itself.
        auth = {"auth": AuthSettings(issuer_url=base_url, resource_server_url=None), "token_verifier": verifier}
    from .. import __version__

    server = MCPServer("memplug", instructions=INSTRUCTIONS, version=__version__, log_level="WARNING", **auth)
    tenancy = Tenancy(scope, limiter)

    def begin(ctx: Context, fn: Callable[..., Any]) -> Scope:
        _refuse_unknown(ctx, fn)
        return tenancy.scope()

    def remember(ctx: Context,
                 text: Annotated[str, Field(description="One self-contained statement in plain words, e.g. "
                                                        "'Alice is allergic to shellfish'.")],
                 occurred_at: Annotated[str | None, Field(description="When what the statement says happened, as "
                                                                      "an ISO 8601 date or time (2024-03-15), if "
                                                                      "known.")] = None,
                 metadata: Annotated[dict[str, Any] | None, Field(description="Optional labels for the memory, "
                                                                              "e.g. {'topic': 'health'}.")] = None,
                 ) -> dict[str, Any]:
        """Store one fact, preference, plan or event about the user in long-term memory, so that later
        conversations can recall it. Write one self-contained statement per call, in the third person
        and plain words ("Alice's daughter is called Mia"), not a transcript. Storing the same statement
        again returns the memory already stored. Returns the memory's id."""
        with _tool_errors():
            item = memory.write(begin(ctx, remember), text, metadata, occurred_at=occurred_at)
            return {"stored": _item(item)}

    def recall(ctx: Context,
               query: Annotated[str, Field(description="What to look for: a question or a topic, e.g. "
                                                       "'food allergies' or 'where does Alice work?'.")],
               k: Annotated[int, Field(ge=1, le=50, description="How many memories to return at most.")] = 5,
               since: Annotated[str | None, Field(description="Only memories of things that happened at or "
                                                              "after this ISO 8601 time.")] = None,
               until: Annotated[str | None, Field(description="Only memories of things that happened before "
                                                              "this ISO 8601 time.")] = None,
               ) -> dict[str, Any]:
        """Search long-term memory for what is relevant to a question or topic. Call it before answering
        anything that may depend on what the user said in earlier conversations: names, preferences,
        plans, past events. Returns memories best first, each with its id, text, rank score, relevance to
        the query (cosine similarity, where the tier measures it), the tier that served it, and when it
        was stored (created_at) or happened (occurred_at)."""
        with _tool_errors():
            found = memory.read(begin(ctx, recall), query, Budget(k=k), since=since, until=until)
            return {"memories": _hits(found)}

    def forget(ctx: Context,
               item_ids: Annotated[list[int] | None, Field(description="Ids of the memories to delete, from "
                                                                       "recall or list.")] = None,
               everything: Annotated[bool, Field(description="Delete every memory of this user. Only when the "
                                                             "user explicitly asks to erase all of it.")] = False,
               ) -> dict[str, Any]:
        """Delete memories for good, from every tier. Pass the ids of the memories the user asked you to
        forget; pass everything=true only when the user explicitly asks you to erase all of their memory.
        Returns how many memories were deleted."""
        with _tool_errors():
            scope = begin(ctx, forget)
            if (item_ids is None) == (not everything):
                raise InvalidInput("forget needs item_ids (a list of memory ids) or everything=true, not both")
            return {"forgotten": memory.forget(scope, None if everything else item_ids)}

    def list_memories(ctx: Context,
                      limit: Annotated[int, Field(ge=1, le=200, description="How many memories to list.")] = 20,
                      offset: Annotated[int, Field(ge=0, description="How many to skip, for the next page.")] = 0,
                      ) -> dict[str, Any]:
        """List stored memories, oldest first, with their ids and dates: to review what is kept, or to
        find the ids that forget needs. Use recall to answer questions."""
        with _tool_errors():
            items = memory.items(begin(ctx, list_memories), limit=limit, offset=offset)
            return {"memories": [_item(it) for it in items], "offset": offset}

    def inspect_memories(ctx: Context,
                         limit: Annotated[int, Field(ge=1, le=200, description="How many of the newest memories "
                                                                               "to show.")] = 20,
                         ) -> dict[str, Any]:
        """Show where each of the newest memories is kept: its level (0 context, 1 text index, 2 KV
        memory, 3 adapter weights), how often it was read and used, and the history of its moves with
        their reasons. For troubleshooting memory; use recall to answer questions."""
        with _tool_errors():
            return {"memories": wire.plain(memory.inspect(begin(ctx, inspect_memories), limit=limit))}

    def end_session(ctx: Context,
                    session_id: Annotated[str, Field(description="The session whose turns to move into "
                                                                 "long-term memory.")],
                    ) -> dict[str, Any]:
        """Operator tool: move a finished session's conversation turns into long-term memory now,
        instead of when they age out. Returns the placements made."""
        with _tool_errors():
            scope = begin(ctx, end_session)
            placed = memory.end_session(Scope(scope.user_id, scope.agent_id, session_id))
            return {"placements": [wire.placement_json(p) for p in placed]}

    def consolidate(ctx: Context,
                    queue: Annotated[bool, Field(description="Queue a job for `memplug worker` instead of "
                                                             "running it in this server.")] = False,
                    ) -> dict[str, Any]:
        """Operator tool: run the promotion policies on this user's memory now (move hot memories to
        KV memory or adapter weights, idle ones down). Returns the placements made, or the queued
        job's id."""
        with _tool_errors():
            scope = begin(ctx, consolidate)
            if queue:
                return {"job_id": memory.enqueue_consolidation(scope)}
            return {"placements": [wire.placement_json(p) for p in memory.consolidate(scope)]}

    read_only = ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False)
    writes = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
    server.add_tool(remember, name="remember", annotations=writes)
    server.add_tool(recall, name="recall", annotations=read_only)
    server.add_tool(forget, name="forget", annotations=ToolAnnotations(
        read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False))
    server.add_tool(list_memories, name="list", annotations=read_only)
    server.add_tool(inspect_memories, name="inspect", annotations=read_only)
    if operator:
        server.add_tool(end_session, name="end_session", annotations=writes)
        server.add_tool(consolidate, name="consolidate", annotations=writes)

    def resource(fn: Callable[[Scope], Any]) -> Callable[[], Any]:
        def read() -> Any:
            try:
                return fn(tenancy.scope())
            except MemplugError as e:
                from mcp.server.mcpserver.exceptions import ResourceError

                raise ResourceError(f"{type(e).__name__}: {e}") from None
        return read

    def recent(scope: Scope) -> dict[str, Any]:
        total = memory.stats(scope)["items"]
        items = memory.items(scope, limit=20, offset=max(0, total - 20))
        return {"scope": str(scope), "items": total, "newest": [_item(it) for it in reversed(items)]}

    def profile(scope: Scope) -> dict[str, Any]:
        stats = memory.stats(scope)
        hot = sorted(memory.usage(scope), key=lambda u: (-u.heat, -u.reads, u.item_id))[:10]
        texts = {it.id: it for it in memory.get(scope, [u.item_id for u in hot])} if hot else {}
        return {"scope": str(scope), "items": stats["items"], "turns": stats["turns"],
                "items_per_tier": stats["items_per_tier"], "reads": stats["reads"],
                "most_read": [{**_item(texts[u.item_id]), "reads": u.reads, "level": u.level}
                              for u in hot if u.item_id in texts and u.reads]}

    server.resource("memplug://memories/recent", name="recent", mime_type="application/json",
                    description="The user's 20 newest memories, newest first.")(resource(recent))
    server.resource("memplug://memories/profile", name="profile", mime_type="application/json",
                    description="What memory holds for this user: counts per tier, and the memories read most.",
                    )(resource(profile))
    return server
