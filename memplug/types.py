"""The values that flow through memplug. All frozen: hooks may share them freely."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from types import MappingProxyType
from typing import Any

from .errors import InvalidInput, InvalidScope

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+\-]*")
MAX_ID_LEN = 128
ROLES = ("system", "user", "assistant", "tool")
MAX_K = 1000  # items one read returns at most
MAX_BUDGET_TOKENS = 2**31 - 1


def _check_id(field_name: str, value: object, required: bool) -> str | None:
    if value is None:
        if required:
            raise InvalidScope(f"Scope.{field_name} is required")
        return None
    if not isinstance(value, str):
        raise InvalidScope(f"Scope.{field_name} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidScope(f"Scope.{field_name} must not be empty (use None to leave it out)")
    if len(value) > MAX_ID_LEN:
        raise InvalidScope(f"Scope.{field_name} is {len(value)} characters; the limit is {MAX_ID_LEN}")
    # Ids end up in SQL parameters and artifact paths: a closed alphabet and no '..'
    # keep them from ever meaning a path or a pattern.
    if not _ID.fullmatch(value) or ".." in value:
        raise InvalidScope(
            f"Scope.{field_name}={value!r} may use only letters, digits and _ . @ + -, "
            "must start with a letter or digit, and may not contain '..'"
        )
    return value


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose memory: a user, optionally narrowed to one agent and one session.

    A read in a scope sees the items written in that scope and in its ancestors
    (``alice/support/s1`` sees ``alice/support/s1``, ``alice/support`` and ``alice``).
    ``forget`` of a whole scope removes that scope and everything under it.
    """

    user_id: str
    agent_id: str | None = None
    session_id: str | None = None

    def __post_init__(self) -> None:
        _check_id("user_id", self.user_id, required=True)
        _check_id("agent_id", self.agent_id, required=False)
        _check_id("session_id", self.session_id, required=False)

    @classmethod
    def parse(cls, spec: str) -> Scope:
        """Parse ``user[/agent[/session]]``; an empty part means "none" (``alice//s1``)."""
        if not isinstance(spec, str) or not spec:
            raise InvalidScope("a scope is written user[/agent[/session]], e.g. 'alice' or 'alice/helper/s1'")
        parts = spec.split("/")
        if len(parts) > 3:
            raise InvalidScope(f"scope {spec!r} has {len(parts)} parts; at most user/agent/session")
        parts += [""] * (3 - len(parts))
        return cls(parts[0], parts[1] or None, parts[2] or None)

    @classmethod
    def of(cls, value: Scope | str | Mapping[str, Any]) -> Scope:
        """Accept a Scope, a ``user/agent/session`` string or a mapping of the three fields."""
        if isinstance(value, Scope):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, Mapping):
            unknown = set(value) - {"user_id", "agent_id", "session_id"}
            if unknown:
                raise InvalidScope(f"unknown scope field(s): {', '.join(sorted(map(str, unknown)))}")
            return cls(**value)
        raise InvalidScope(f"expected a Scope, got {type(value).__name__}")

    def __str__(self) -> str:
        s = self.user_id + "/" + (self.agent_id or "") + "/" + (self.session_id or "")
        return s.rstrip("/")

    @property
    def key(self) -> tuple[str, str, str]:
        """The scope as stored: absent parts are empty strings."""
        return (self.user_id, self.agent_id or "", self.session_id or "")

    def without_session(self) -> Scope:
        return replace(self, session_id=None)


# When something happened, as callers give it: a datetime (naive means UTC), a date or an ISO 8601 string.
Moment = datetime | date | str


@dataclass(frozen=True, slots=True)
class Window:
    """A read's time range: items whose :attr:`Item.when` is at or after ``since`` and before ``until``.

    Either end may be None (open). Both are timezone-aware (the host makes them so).
    """

    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, datetime) or v.tzinfo is None):
                raise InvalidInput(f"Window.{name} must be a timezone-aware datetime, got {v!r}")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise InvalidInput(f"the time range is empty: since {self.since.isoformat()} is not before "
                               f"until {self.until.isoformat()}")

    def holds(self, item: Item) -> bool:
        """Whether ``item`` happened within the range (an item with no time is outside any range)."""
        when = item.when
        if when is None:
            return False
        return (self.since is None or when >= self.since) and (self.until is None or when < self.until)


def when_text(moment: datetime) -> str:
    """A moment as :meth:`Recall.as_text` shows it: the date, and the time (UTC) unless it is midnight."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d" if moment.time() == datetime.min.time() else "%Y-%m-%d %H:%M")


def _freeze(metadata: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(metadata or {}))


@dataclass(frozen=True, slots=True)
class Item:
    """One unit of knowledge. Its text, in Postgres, is the source of truth."""

    id: int
    scope: Scope
    text: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    tokens: int = 0
    role: str | None = None  # set on conversation turns, None on plain knowledge
    key: str | None = None  # the caller's key, for items stored with Memory.put
    occurred_at: datetime | None = None  # when what it says happened (a turn's time), apart from created_at

    def __post_init__(self) -> None:
        object.__setattr__(self, "metadata", _freeze(self.metadata))

    @property
    def when(self) -> datetime | None:
        """When what the item says happened: ``occurred_at`` if given, else when it was written."""
        return self.occurred_at or self.created_at


@dataclass(frozen=True, slots=True)
class Hit:
    """A text contribution to a read: an item, which tier found it, and that tier's score.

    ``text`` is what goes into the prompt (the item's text unless the tier gives a
    shorter form). A ``pinned`` hit is served before every ranked hit, in the order
    its tier returned it, whatever the fusion says (a profile, standing instructions);
    it lands in :attr:`Recall.pinned`, not among the ranked ``hits``. ``relevance``
    is how close the item is to the query on an absolute scale (the pgvector tier:
    cosine similarity), or None; a read's relevance floor applies to it.
    """

    item: Item
    tier: str
    score: float
    text: str = ""
    pinned: bool = False
    relevance: float | None = None

    def __post_init__(self) -> None:
        if not self.text:
            object.__setattr__(self, "text", self.item.text)


@dataclass(frozen=True, slots=True)
class Budget:
    """What one read may spend: at most ``k`` items, ``tokens`` prompt tokens of text, and
    ``kv_tokens`` positions of injected KV memory.

    The ``k`` items are the best ranked, whichever tier serves them: an item carried
    by the KV prefix or held by the adapter takes its place without prompt tokens.
    """

    tokens: int = 1024
    k: int = 10
    kv_tokens: int = 2048

    def __post_init__(self) -> None:
        for name in ("tokens", "k", "kv_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidInput(f"Budget.{name} must be a positive integer, got {v!r}")
            top = MAX_K if name == "k" else MAX_BUDGET_TOKENS
            if v > top:
                raise InvalidInput(f"Budget.{name}={v} is over the limit of {top}")


@dataclass(frozen=True, slots=True)
class KVPrefix:
    """Explicit memory ready to inject: items whose attention key/values were precomputed.

    Built by a KV tier on read; consumed by :mod:`memplug.runtime`. ``tokens`` is
    the positions the items occupy; ``fingerprint`` names the model that encoded
    them; ``left_out`` names items the tier chose not to serve for this query.
    Immutable: ``packed()`` and ``chunks()`` build fresh tensors on every call, so
    nothing a caller does to them reaches the stored packs.
    """

    tier: str
    items: tuple[Item, ...]
    tokens: int
    fingerprint: str
    codec: str
    loader: Callable[[tuple[int, ...]], list[Any]] = field(repr=False, compare=False)
    stored_bytes: int = 0
    spans: tuple[int, ...] = ()  # positions per item, when known
    sizes: tuple[int, ...] = ()  # stored bytes per item, when known
    # Items the tier found for the query but judged misleading next to the ones it injects (far
    # less similar to the query): the host serves them neither as KV nor as text, nor fills their places.
    left_out: tuple[int, ...] = ()
    # Tokens at the start of each item the runtime reads again with attention to the items before
    # it, when it injects them (0: none); see memplug.runtime.LocalModel.build_batch_cache.
    recompute: int = 0

    def packed(self) -> Any:
        """The items' key/values as one :class:`memplug.runtime.PackedKV`, in order, still compressed
        (loads torch). ``loader`` is called with the ids of the items to load; it returns a
        ``PackedKV`` or a list of :class:`memplug.runtime.KVChunk` values."""
        from .runtime.kv import PackedKV

        loaded = self.loader(tuple(it.id for it in self.items))
        return loaded if isinstance(loaded, PackedKV) else PackedKV.from_chunks(list(loaded))

    def chunks(self) -> list[Any]:
        """The items' :class:`memplug.runtime.KVChunk` values, in order, as float32 on the CPU
        (loads torch); fresh tensors on every call."""
        from .runtime.kv import PackedKV

        loaded = self.loader(tuple(it.id for it in self.items))
        return loaded.chunks() if isinstance(loaded, PackedKV) else list(loaded)

    def ordered(self, item_ids: Sequence[int]) -> KVPrefix:
        """This prefix with its items in the order of ``item_ids`` (the same ids, in any order)."""
        where = {it.id: k for k, it in enumerate(self.items)}
        if sorted(where) != sorted(item_ids):
            raise InvalidInput(f"ordered() needs exactly this prefix's item ids {sorted(where)}, got {list(item_ids)}")
        keep = [where[i] for i in item_ids]

        def pick(values: tuple) -> tuple:
            return tuple(values[k] for k in keep) if len(values) == len(self.items) else values
        return replace(self, items=pick(self.items), spans=pick(self.spans), sizes=pick(self.sizes))

    def without(self, item_ids: Collection[int]) -> KVPrefix | None:
        """This prefix less ``item_ids`` (None if nothing is left)."""
        keep = [k for k, it in enumerate(self.items) if it.id not in item_ids]
        if len(keep) == len(self.items):
            return self
        if not keep:
            return None
        pick = lambda values, total: (tuple(values[k] for k in keep), sum(values[k] for k in keep)) \
            if len(values) == len(self.items) else (values, total)  # noqa: E731
        spans, tokens = pick(self.spans, self.tokens)
        sizes, stored = pick(self.sizes, self.stored_bytes)
        return replace(self, items=tuple(self.items[k] for k in keep), tokens=tokens, stored_bytes=stored,
                       spans=spans, sizes=sizes)


def adapter_name(tier: str, version: int, fingerprint: str) -> str:
    """The name an adapter version is loaded under (a valid PEFT adapter name)."""
    return f"memplug_{re.sub(r'[^A-Za-z0-9_]', '_', tier)}_{int(version)}_{fingerprint[:12]}"


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """A scope's trained LoRA adapter, ready for :mod:`memplug.runtime` to apply.

    Built by a weights tier on read. ``items`` are the items the adapter holds
    (their held-out recall passed the tier's threshold): the host does not
    repeat them as text when the adapter is applied. ``fingerprint`` names the
    base model it was trained on; ``name`` is unique per trained version.
    ``load()`` returns the checked PEFT state dict and config.
    """

    tier: str
    scope: Scope
    version: int
    fingerprint: str
    items: tuple[Item, ...]
    uri: str
    stored_bytes: int
    loader: Callable[[], tuple[dict[str, Any], dict[str, Any]]] = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        """The adapter's name in the model: unique per tier, version and base model."""
        return adapter_name(self.tier, self.version, self.fingerprint)

    def load(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.loader()


@dataclass(frozen=True, slots=True)
class Recall:
    """What a read returns. ``as_text()`` renders it as a memory block for any LLM prompt.

    ``hits`` holds at most ``Budget.k`` ranked text hits, best first. ``pinned`` holds
    the hits a tier pins before every ranked one (a profile, standing instructions):
    they spend prompt tokens but take no ranked place. ``kv`` holds the items served
    as explicit memory and ``covered`` those the ``adapter`` holds; neither is
    repeated in ``hits``.
    """

    scope: Scope
    query: str
    hits: tuple[Hit, ...] = ()
    tokens: int = 0
    kv: KVPrefix | None = None
    adapter: AdapterRef | None = None
    covered: tuple[Hit, ...] = ()  # hits left out of ``hits`` because ``adapter`` holds them
    pinned: tuple[Hit, ...] = ()

    @property
    def items(self) -> tuple[Item, ...]:
        """Every item the read returned: pinned, text hits, explicit (KV) memory, then hits the adapter holds."""
        return (tuple(h.item for h in self.pinned) + tuple(h.item for h in self.hits)
                + (self.kv.items if self.kv else ()) + tuple(h.item for h in self.covered))

    def served(self) -> list[tuple[Item, str, float | None]]:
        """``(item, tier that serves it, score)`` for every item, in :attr:`items` order; KV items
        have no score, adapter-held items are served by the adapter's tier."""
        rows: list[tuple[Item, str, float | None]] = [(h.item, h.tier, h.score) for h in self.pinned]
        rows += [(h.item, h.tier, h.score) for h in self.hits]
        rows += [(it, self.kv.tier, None) for it in (self.kv.items if self.kv else ())]
        rows += [(h.item, self.adapter.tier if self.adapter else h.tier, h.score) for h in self.covered]
        return rows

    def as_text(self, kv_as_text: bool = True, adapter_as_text: bool = True) -> str:
        """Pinned facts first, then knowledge by rank; then the recent conversation in the order it happened.

        An item with an ``occurred_at`` is dated (``[2024-03-15] ...``), so a model can
        answer when something happened. Items held as KV memory or by the adapter are
        written out too (for a model that cannot take them), unless ``kv_as_text`` /
        ``adapter_as_text`` is False because they are being injected or applied.
        """
        kv_hits = [Hit(it, self.kv.tier, 0.0) for it in self.kv.items] if self.kv and kv_as_text else []
        weight_hits = list(self.covered) if adapter_as_text else []
        facts = list(self.pinned) + weight_hits + kv_hits + [h for h in self.hits if h.item.role is None]
        turns = sorted((h for h in self.hits if h.item.role is not None), key=lambda h: h.item.id)
        parts: list[str] = []
        if facts:
            parts.append(memories_text([_dated(h) for h in facts]))
        if turns:
            parts.append("Recent conversation:\n" + "\n".join(f"{h.item.role}: {_dated(h)}" for h in turns))
        return "\n\n".join(parts)


def _dated(hit: Hit) -> str:
    at = hit.item.occurred_at
    return f"[{when_text(at)}] {hit.text}" if at is not None else hit.text


def memories_text(texts: Iterable[str]) -> str:
    """Remembered facts as :meth:`Recall.as_text` writes them for a prompt."""
    return "Relevant memories:\n" + "\n".join(f"- {t}" for t in texts)


def _item_ids(owner: str, values: object) -> tuple[int, ...]:
    """Item ids as a tuple of ints: ints and numpy ints pass; floats, bools and strings do not."""
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise InvalidInput(f"{owner}.item_ids must be a tuple of item ids, got {type(values).__name__}")
    ids = []
    for value in values:
        try:
            i = None if isinstance(value, bool) else operator.index(value)
        except TypeError:
            i = None
        if i is None or not 0 < i < 2**63:
            raise InvalidInput(f"{owner}.item_ids must hold positive int ids, got {value!r}")
        ids.append(i)
    return tuple(ids)


@dataclass(frozen=True, slots=True)
class Move:
    """A policy's decision: move these items from one level to another, and why."""

    item_ids: tuple[int, ...]
    src_level: int
    dst_level: int
    reason: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "item_ids", _item_ids("Move", self.item_ids))
        for name in ("src_level", "dst_level"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidInput(f"Move.{name} must be a level (an int >= 0), got {v!r}")
        if self.src_level == self.dst_level:
            raise InvalidInput(f"a Move must change level, got {self.src_level} -> {self.dst_level}")


@dataclass(frozen=True, slots=True)
class TierCost:
    """What one tier costs on this deployment, as it measured it (``memplug_costs``).

    All times in milliseconds. A read of an item of ``n`` tokens costs
    ``read_ms + n * read_ms_per_token`` plus ``n * prompt_tokens_per_token``
    prompt tokens; putting it in the tier costs ``write_ms + n * write_ms_per_token
    + write_ms_per_item`` (for weights: a retrain of every item the scope holds).
    """

    tier: str
    level: int
    read_ms: float = 0.0
    read_ms_per_token: float = 0.0
    prompt_tokens_per_token: float = 0.0
    write_ms: float = 0.0
    write_ms_per_token: float = 0.0
    write_ms_per_item: float = 0.0
    bytes_per_token: float = 0.0
    writes_24h: int = 0  # writes of this scope in the last day (retrains, for the weights tier)
    samples: int = 0  # measurements behind these figures (0: priors)


@dataclass(frozen=True, slots=True)
class Placement:
    """A tier's report of what it holds: returned from the write and consolidate hooks.

    ``held=False`` reports that the tier gave the items up (a demotion, an eviction).
    """

    tier: str
    level: int
    item_ids: tuple[int, ...]
    reason: str = "write"
    held: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "item_ids", _item_ids("Placement", self.item_ids))


@dataclass(frozen=True, slots=True)
class Answer:
    """The local model's answer with memory (:meth:`memplug.Memory.answer`), and what it took.

    ``prompt_tokens`` is what the model read for this answer: text memories, the
    template and the conversation, not the fixed preamble or injected KV memory.
    """

    text: str
    recall: Recall
    prompt_tokens: int
    first_token_s: float
    seconds: float

    def served_by(self, item_id: int) -> str | None:
        """How the answer had item ``item_id``: ``"adapter"``, ``"kv"``, ``"text"``, or None."""
        if any(h.item.id == item_id for h in self.recall.covered):
            return "adapter"
        if self.recall.kv is not None and any(it.id == item_id for it in self.recall.kv.items):
            return "kv"
        if any(h.item.id == item_id for h in self.recall.hits + self.recall.pinned):
            return "text"
        return None

