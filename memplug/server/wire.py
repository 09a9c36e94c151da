"""memplug's values as JSON, both ways: what the HTTP API sends and :class:`memplug.client.Client` reads.

Times are ISO 8601 strings with their offset. A :class:`~memplug.Recall` travels
with its text hits, pinned hits, the items its KV memory and adapter carry, and
``text`` (its :meth:`~memplug.Recall.as_text`); the KV tensors and the adapter's
weights stay on the server, so a recall read over HTTP is for the text path.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ..errors import ModelUnavailable
from ..types import AdapterRef, Hit, Item, KVPrefix, Placement, Recall, Scope


def when(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def item_json(item: Item) -> dict[str, Any]:
    return {"id": item.id, "scope": str(item.scope), "text": item.text, "metadata": dict(item.metadata),
            "role": item.role, "key": item.key, "tokens": item.tokens, "created_at": when(item.created_at),
            "occurred_at": when(item.occurred_at)}


def item_from_json(d: Mapping[str, Any]) -> Item:
    return Item(int(d["id"]), Scope.parse(d["scope"]), d["text"], d.get("metadata") or {}, _time(d.get("created_at")),
                int(d.get("tokens") or 0), d.get("role"), d.get("key"), _time(d.get("occurred_at")))


def hit_json(hit: Hit) -> dict[str, Any]:
    out = {"item": item_json(hit.item), "tier": hit.tier, "score": hit.score, "relevance": hit.relevance}
    if hit.text != hit.item.text:  # a tier's shorter form of the item
        out["text"] = hit.text
    if hit.pinned:
        out["pinned"] = True
    return out


def hit_from_json(d: Mapping[str, Any]) -> Hit:
    item = item_from_json(d["item"])
    return Hit(item, d["tier"], float(d["score"]), d.get("text") or item.text, bool(d.get("pinned")), d.get("relevance"))


def recall_json(recall: Recall) -> dict[str, Any]:
    kv, adapter = recall.kv, recall.adapter
    return {
        "scope": str(recall.scope), "query": recall.query, "tokens": recall.tokens,
        "hits": [hit_json(h) for h in recall.hits],
        "pinned": [hit_json(h) for h in recall.pinned],
        "covered": [hit_json(h) for h in recall.covered],
        "kv": None if kv is None else {"tier": kv.tier, "tokens": kv.tokens, "fingerprint": kv.fingerprint,
                                       "codec": kv.codec, "stored_bytes": kv.stored_bytes,
                                       "items": [item_json(it) for it in kv.items]},
        "adapter": None if adapter is None else {
            "tier": adapter.tier, "scope": str(adapter.scope), "version": adapter.version,
            "fingerprint": adapter.fingerprint, "uri": adapter.uri, "stored_bytes": adapter.stored_bytes,
            "items": [item_json(it) for it in adapter.items]},
        "text": recall.as_text(),
    }


def _remote(what: str):
    def load(*_: Any) -> Any:
        raise ModelUnavailable(f"{what} stays on the memplug server; a recall read over HTTP serves it as text "
                               "(Recall.as_text())")
    return load


def recall_from_json(d: Mapping[str, Any]) -> Recall:
    kv = d.get("kv")
    adapter = d.get("adapter")
    return Recall(
        scope=Scope.parse(d["scope"]), query=d["query"], tokens=int(d["tokens"]),
        hits=tuple(hit_from_json(h) for h in d.get("hits", ())),
        pinned=tuple(hit_from_json(h) for h in d.get("pinned", ())),
        covered=tuple(hit_from_json(h) for h in d.get("covered", ())),
        kv=None if kv is None else KVPrefix(kv["tier"], tuple(item_from_json(i) for i in kv["items"]), int(kv["tokens"]),
                                            kv["fingerprint"], kv["codec"], _remote("KV memory"),
                                            int(kv.get("stored_bytes") or 0)),
        adapter=None if adapter is None else AdapterRef(
            adapter["tier"], Scope.parse(adapter["scope"]), int(adapter["version"]), adapter["fingerprint"],
            tuple(item_from_json(i) for i in adapter["items"]), adapter["uri"], int(adapter.get("stored_bytes") or 0),
            _remote("the adapter")),
    )


def placement_json(p: Placement) -> dict[str, Any]:
    return {"tier": p.tier, "level": p.level, "item_ids": list(p.item_ids), "reason": p.reason, "held": p.held}


def placement_from_json(d: Mapping[str, Any]) -> Placement:
    return Placement(d["tier"], int(d["level"]), tuple(d["item_ids"]), d.get("reason", ""), bool(d.get("held", True)))


def plain(value: Any) -> Any:
    """``value`` with datetimes as ISO strings and tuples as lists (for inspect and stats rows)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
