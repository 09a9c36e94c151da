"""LocalModel: chat generation that composes text memories, injected KV memory and LoRA adapters.

The prompt is laid out in three parts so that memory chunks can be encoded once
and injected later:

1. the **preamble**: the chat template up to the memory list in the system
   message. It never changes, so its KV is computed once per model;
2. the **memory chunks**, one per item (``"- text\\n"``). Each was encoded after
   the preamble, and is injected at its final offset by re-rotating its keys;
3. the **closing**: text memories, the rest of the template and the
   conversation, run through the model on top of the cache.

With one chunk and no compression this is exactly a full prefill of the same
tokens (the unit tests hold it to 1e-3 in the logits).
"""

from __future__ import annotations

import inspect
import json
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidInput, ModelMismatch, ModelUnavailable
from .kv import KVChunk, PackedKV, assemble, rotate
from .prompt import chat_messages, system_text

_MARK = "\u2063MEMPLUG\u2063"
_LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "layers_to_transform", "bias",
                "fan_in_fan_out", "use_rslora", "task_type")


@dataclass
class _Slot:
    """A PEFT adapter injected into the model, holding one resident adapter's tensors at a time."""

    shape: str  # the LoRA config fields that fix its tensors and scaling
    size: int  # bytes
    params: dict[str, torch.nn.Parameter]  # by the key of the adapter's state dict


class LocalModel:
    """A loaded causal LM with its tokenizer; see :func:`memplug.runtime.load_model`."""

    def __init__(self, model: Any, tokenizer: Any, *, fingerprint: str, name: str, device: str, rotary: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.name = name
        self.device = device
        self.rotary = rotary
        self._cache_kw = _cache_keyword(model)
        cfg = model.config.get_text_config(decoder=True)
        self.layers = cfg.num_hidden_layers
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.dtype = next(model.parameters()).dtype
        rotary_emb = getattr(getattr(model, "model", model), "rotary_emb", None)
        self.inv_freq = rotary_emb.inv_freq.detach().float().cpu() if rotary_emb is not None else None
        scaling = float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)
        # Re-rotation by an offset is exact only for rotations without a magnitude factor.
        self.can_inject = rotary and self.inv_freq is not None and abs(scaling - 1.0) < 1e-9
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {int(e) for e in [*eos, tokenizer.eos_token_id] if e is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids)
        self._lock = threading.RLock()
        # Preamble key/values per adapter (None: the base model), and shared prefixes (few-shot prompts).
        self._preambles: dict[str | None, tuple[list[int], torch.Tensor, torch.Tensor]] = {}
        self._prefixes: OrderedDict[tuple[str | None, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = (
            OrderedDict())
        # LoRA adapters loaded into the model: name -> bytes, least recently used first. Each sits in a
        # slot (a PEFT adapter injected into the model once); a slot freed by an unloaded adapter is
        # zeroed and takes the next adapter of the same shape by copying its tensors in.
        self._resident: OrderedDict[str, int] = OrderedDict()
        self._slot_of: dict[str, str] = {}
        self._slots: dict[str, _Slot] = {}
        self._slot_count = 0
        self._active: str | None = None
        self._tuner_layers: list[Any] = []
        self.max_adapters = 8
        self.max_adapter_bytes = 256 << 20

    # -- prompt layout ---------------------------------------------------------

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chunk_text(self, text: str) -> str:
        return f"- {' '.join(text.split())}\n"

    def chunk_ids(self, text: str) -> list[int]:
        return self.ids(self.chunk_text(text))

    def _render(self, system: str, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, *messages], tokenize=False, add_generation_prompt=True)

    def layout(self, messages: Any, text_memories: str = "", chunks: bool = True) -> tuple[str, str]:
        """(preamble, closing) strings for a conversation: memory chunks go between them."""
        msgs = chat_messages(messages)
        extra = ""
        if msgs[0]["role"] == "system":
            extra, msgs = msgs[0]["content"], msgs[1:]
        if not chunks and not text_memories:
            return "", self._render(system_text(extra), msgs)
        rendered = self._render(system_text(extra, text_memories, memories=True, mark=_MARK), msgs)
        head, _, rest = rendered.partition(_MARK)
        if not rest and not rendered.endswith(_MARK):
            raise InvalidInput("the model's chat template dropped the system message; memories cannot be placed")
        return head, rest

    def preamble(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Token ids, keys and values (layers, kv_heads, n, head_dim) of the fixed preamble.

        Computed once per process; every call returns copies.
        """
        ids, k, v = self._stored_preamble()
        return list(ids), k.clone(), v.clone()

    def _stored_preamble(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """The preamble as the model reads it now (with the active adapter, if any)."""
        with self._lock:
            found = self._preambles.get(self._active)
            if found is None:
                head, _ = self.layout([{"role": "user", "content": "?"}])
                ids = self.ids(head)
                k, v = self._kv_of(ids)
                found = self._preambles[self._active] = (ids, k, v)
            return found

    def _kv_of(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            out = self.model(torch.tensor([list(ids)], device=self.device), use_cache=True)
        k, v = _stack_cache(_returned_cache(out))
        return k[:, 0].float().cpu(), v[:, 0].float().cpu()

    def _prefix_kv(self, ids: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Key/values of a shared prefix, in the model's dtype and device (a few kept)."""
        with self._lock:
            key = (self._active, ids)
            found = self._prefixes.get(key)
            if found is None:
                k, v = self._kv_of(ids)
                found = self._prefixes[key] = (k.to(self.device, self.dtype), v.to(self.device, self.dtype))
                while len(self._prefixes) > 4:
                    self._prefixes.popitem(last=False)
            self._prefixes.move_to_end(key)
            return found

    # -- adapters ----------------------------------------------------------------

    def load_adapter(self, ref: Any) -> str:
        """Make ``ref`` (a :class:`memplug.AdapterRef`) resident; return its adapter name.

        Refused with :class:`~memplug.ModelMismatch` when it was trained on another
        model. Resident adapters are bounded by ``max_adapters`` and
        ``max_adapter_bytes``; the least recently used is unloaded first. An
        adapter goes into a free slot of its shape (rank, targets, scaling) when
        there is one, by copying its tensors in; only a new shape, or the first
        adapters, make PEFT inject modules into the model.
        """
        if ref.fingerprint != self.fingerprint:
            raise ModelMismatch(f"adapter {ref.name} was trained on model {ref.fingerprint}; "
                                f"{self.name} is {self.fingerprint}")
        with self._lock:
            if ref.name in self._resident:
                self._resident.move_to_end(ref.name)
                return ref.name
            state, config = ref.load()
            try:
                from peft import LoraConfig
            except ImportError as e:
                raise ModelUnavailable("applying adapters needs peft: pip install 'memplug[lora]'") from e
            fields = {k: v for k, v in config.items() if k in _LORA_FIELDS}
            shape = json.dumps(fields, sort_keys=True, default=sorted)
            state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
            # Its bytes in the model, where the slot holds it in the model's dtype (the file is fp16).
            size = sum(t.numel() for t in state.values()) * torch.empty((), dtype=self.dtype).element_size()
            # Slots are changed in place later, so never made as inference tensors (a load may come
            # from inside a decode's inference mode).
            with torch.inference_mode(False), torch.no_grad():
                slot = self._free_slot(shape, size)
                if slot is None:
                    peft_config = LoraConfig(**fields)
                    peft_config.inference_mode = True
                    slot = self._new_slot(peft_config, shape, state, ref.name)
                else:
                    self._fill_slot(slot, state, ref.name)
            self._slot_of[ref.name] = slot
            self._resident[ref.name] = size
            return ref.name

    def _free_slot(self, shape: str, size: int) -> str | None:
        """A free slot of ``shape``, unloading least recently used adapters until there is one or room for a new one."""
        while True:
            used = set(self._slot_of.values())
            free = [s for s in self._slots if s not in used]
            fitting = [s for s in free if self._slots[s].shape == shape]
            held = sum(s.size for s in self._slots.values())
            over = len(self._slots) > self.max_adapters or held > self.max_adapter_bytes  # bounds lowered
            if fitting and not over:
                return fitting[0]
            if not fitting and len(self._slots) < self.max_adapters and held + size <= self.max_adapter_bytes:
                return None
            if free:  # free slots give their room back first, those of other shapes before
                self._delete_slot(sorted(free, key=lambda s: s in fitting)[0])
            elif self._resident:
                self.drop_adapter(next(iter(self._resident)))
            else:
                return None

    def _new_slot(self, peft_config: Any, shape: str, state: dict[str, Any], name: str) -> str:
        from peft import inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        slot = f"slot{self._slot_count}"
        self._slot_count += 1
        try:
            with warnings.catch_warnings():  # several adapters in one model is the design
                warnings.filterwarnings("ignore", message=".*multiple adapters.*", category=UserWarning)
                inject_adapter_in_model(peft_config, self.model, adapter_name=slot)
            self._tuner_layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
            # by the names PEFT saves them under: the adapter's name left out (`lora_A.slot0.weight`
            # is `lora_A.weight`, a ParameterDict's `lora_embedding_A.slot0` is `lora_embedding_A`)
            params = {n.replace(f".{slot}.", ".").removesuffix(f".{slot}"): p
                      for n, p in self.model.named_parameters() if f".{slot}." in n or n.endswith(f".{slot}")}
            self._slots[slot] = _Slot(shape, sum(p.numel() * p.element_size() for p in params.values()), params)
            self._fill_slot(slot, state, name)
        except BaseException:
            self._delete_slot(slot)
            raise
        finally:
            # Injection makes the new slot active, and deleting it makes another one active: put back
            # the adapter the model had.
            self._switch(self._active)
        return slot

    def _fill_slot(self, slot: str, state: dict[str, Any], name: str) -> None:
        params = self._slots[slot].params
        if state.keys() != params.keys() or any(state[k].shape != p.shape for k, p in params.items()):
            missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
            raise ModelMismatch(f"adapter {name} does not fit {self.name}: "
                                f"{len(missing)} missing and {len(unexpected)} unexpected tensors")
        try:
            for k, p in params.items():
                p.copy_(state[k])
        except BaseException:
            for p in params.values():  # a free slot holds no part of an adapter
                p.zero_()
            raise

    def _delete_slot(self, slot: str) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        with warnings.catch_warnings():  # PEFT warns when the (disabled) active adapter goes
            warnings.simplefilter("ignore")
            for m in self.model.modules():
                if isinstance(m, BaseTunerLayer) and slot in getattr(m, "lora_A", {}):
                    m.delete_adapter(slot)
        self._slots.pop(slot, None)

    def drop_adapter(self, name: str) -> None:
        """Unload a resident adapter (no effect if it is not loaded). Its slot is zeroed, for the next one."""
        with self._lock:
            if name in self._resident:
                del self._resident[name]
                if self._active == name:
                    self._switch(None)
                slot = self._slot_of.pop(name)
                with torch.inference_mode(False), torch.no_grad():
                    for p in self._slots[slot].params.values():
                        p.zero_()
                self._preambles.pop(name, None)
                for key in [k for k in self._prefixes if k[0] == name]:
                    del self._prefixes[key]

    def _use_adapter(self, ref: Any) -> None:
        """Apply ``ref`` (or the base model, for None) to the following forward passes. Call under the lock."""
        name = self.load_adapter(ref) if ref is not None else None
        if name != self._active:
            self._switch(name)

    def _switch(self, name: str | None) -> None:
        enable = self._active is None and name is not None
        slot = self._slot_of[name] if name is not None else None
        for m in self._tuner_layers:
            if slot is None:
                m.enable_adapters(False)
                continue
            if enable:
                m.enable_adapters(True)
            m.set_adapter(slot, inference_mode=True)
        self._active = name

    # -- reading text after the preamble (what explicit memory is made of) ------

    def after_preamble(self, rows: Sequence[Sequence[int]], attention: bool = False,
                       batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Each row of token ids as the base model reads it right after the memory preamble.

        Returns per row its keys and values, float32 on the CPU, of shape
        (layers, kv_heads, len(row), head_dim), keys rotated back to position 0 (see
        :mod:`memplug.runtime.kv`): what a tier of explicit memory stores, and
        :meth:`build_cache` injects at any offset. With ``attention``, also the
        (len(row), len(row)) attention each token of the row paid to the row's
        tokens, averaged over layers and heads (eager attention: slower). No
        adapter is applied: explicit memory is the base model's.
        """
        self._check_injectable()
        out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        with self._lock, torch.inference_mode():
            self._use_adapter(None)
            pre_ids, pre_k, pre_v = self._stored_preamble()
            previous = self.model.config._attn_implementation
            if attention:
                self.model.set_attn_implementation("eager")
            try:
                for start in range(0, len(rows), batch_size):
                    out += self._after_preamble(rows[start:start + batch_size], pre_k, pre_v, len(pre_ids),
                                                attention)
            finally:
                if attention:
                    self.model.set_attn_implementation(previous)
        return out

    def _after_preamble(self, rows, pre_k, pre_v, p, attention):
        b, n = len(rows), max(len(r) for r in rows)
        # repeat() copies: the forward pass never touches the stored preamble.
        cache = _cache_of(self.model.config, pre_k.unsqueeze(1).repeat(1, b, 1, 1, 1).to(self.device, self.dtype),
                          pre_v.unsqueeze(1).repeat(1, b, 1, 1, 1).to(self.device, self.dtype))
        # Right padding: a pad comes after every real token, so causality keeps it out of their keys.
        input_ids = torch.full((b, n), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = torch.tensor(list(r))
        result = self.model(input_ids.to(self.device), **{self._cache_kw: cache}, use_cache=True,
                            position_ids=torch.arange(p, p + n, device=self.device).unsqueeze(0).expand(b, -1),
                            attention_mask=torch.ones(b, p + n, dtype=torch.long, device=self.device),
                            output_attentions=attention)
        keys, values = _stack_cache(_returned_cache(result))
        keys = rotate(keys[:, :, :, p:].float().cpu(), -p, self.inv_freq)
        values = values[:, :, :, p:].float().cpu()
        # attentions: per layer (b, heads, n, p + n), averaged over layers and heads.
        paid = (torch.stack([a[:, :, :, p:].float().cpu() for a in result.attentions]).mean(dim=(0, 2))
                if attention else None)
        return [(keys[:, i, :, :len(r)].contiguous(), values[:, i, :, :len(r)].contiguous(),
                 paid[i, :len(r), :len(r)].contiguous() if paid is not None else None)
                for i, r in enumerate(rows)]

    def _check_injectable(self) -> None:
        if not self.can_inject:
            raise ModelMismatch(
                f"{self.name} has no plain rotary attention (model type "
                f"{getattr(self.model.config, 'model_type', '?')!r}); the kv tier supports Llama-family models")

    # -- assembling and generating ---------------------------------------------

    def build_cache(self, chunks: Sequence[KVChunk] | PackedKV, batch: int = 1,
                    recompute: int = 0) -> tuple[Any, int, int]:
        """A fresh transformers cache: preamble, then each chunk at its offset.

        Returns (cache, next position, stored tokens). The cache owns new
        tensors; the chunks and the preamble are never modified.
        """
        cache, positions, mask = self.build_batch_cache([chunks] * batch, recompute)
        return cache, int(positions[0]), int(mask.shape[1])

    def build_batch_cache(self, per_row: Sequence[Sequence[KVChunk] | PackedKV],
                          recompute: int = 0) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """One cache for a batch whose rows carry different memory: a list of chunks or a
        :class:`PackedKV` per row.

        Each distinct memory is assembled once on the model's device (see
        :func:`memplug.runtime.kv.assemble`); with ``recompute``, the first that many
        tokens of each item are then read again with attention to everything before
        them (:meth:`_recompute`). Shorter rows are padded at the end of the prefix
        and masked out. Returns (cache, next position per row, attention mask of the prefix).
        """
        pre_ids = self._stored_preamble()[0]
        prefix = self._prefix_kv(tuple(pre_ids))
        built: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        rows = []
        for memory in per_row:
            key = id(memory)
            if key not in built:  # rows sharing one memory share its tensors
                pack = self._as_pack(memory)
                k, v, position, positions = assemble(prefix, pack, self.inv_freq, self.dtype, self.device)
                if recompute > 0 and pack is not None:
                    self._recompute(k, v, positions, pack, len(pre_ids), recompute)
                built[key] = (k, v, position)
            rows.append(built[key])
        longest = max(k.shape[2] for k, _, _ in rows)
        b = len(rows)
        if len(built) == 1:  # one prefix for every row: no padding, no copy
            k, v, position = rows[0]
            keys = k.unsqueeze(1).expand(-1, b, -1, -1, -1)
            values = v.unsqueeze(1).expand(-1, b, -1, -1, -1)
            mask = torch.ones(b, longest, dtype=torch.long)
            return _cache_of(self.model.config, keys, values), torch.full((b,), position), mask
        shape = (self.layers, b, self.kv_heads, longest, self.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        mask = torch.zeros(b, longest, dtype=torch.long)
        positions = torch.zeros(b, dtype=torch.long)
        for i, (k, v, position) in enumerate(rows):
            n = k.shape[2]
            keys[:, i, :, :n] = k
            values[:, i, :, :n] = v
            mask[i, :n] = 1
            positions[i] = position
        return _cache_of(self.model.config, keys, values), positions, mask

    def injection_costs(self, tokens: int = 256, items: int = 8, repeats: int = 3) -> dict[str, float]:
        """Milliseconds per memory token of placing int4 KV memory (moving it to this model's device,
        de-quantizing, re-rotating) and of reading the same number of tokens as prompt text, timed
        here on random codes and random token ids (speed does not depend on their values)."""
        g = torch.Generator().manual_seed(0)
        groups = self.head_dim // min(32, self.head_dim)
        shape = (self.layers, self.kv_heads, tokens)

        def part():
            return {"q": torch.randint(0, 256, (*shape, self.head_dim // 2), dtype=torch.uint8, generator=g),
                    "scale": torch.rand(*shape, groups, generator=g).half() / 8,
                    "min": -torch.rand(*shape, groups, generator=g).half()}
        per = tokens // items
        counts = tuple([per] * (items - 1) + [tokens - per * (items - 1)])
        starts = tuple(per * k for k in range(items))
        pack = PackedKV("int4", min(32, self.head_dim), self.head_dim, part(), part(), tuple(range(items)),
                        starts, counts, counts)
        ids = torch.randint(0, int(self.model.config.vocab_size), (1, tokens), generator=g)

        def place():
            self.build_cache(pack)

        def prefill():
            with torch.inference_mode():
                self.model(ids.to(self.device), use_cache=True, logits_to_keep=1)

        with self._lock:
            return {"inject_ms_per_token": _median_ms(place, repeats, self.device) / tokens,
                    "prefill_ms_per_token": _median_ms(prefill, repeats, self.device) / tokens}

    def _as_pack(self, memory: Sequence[KVChunk] | PackedKV | None) -> PackedKV | None:
        """Memory as one pack, checked against this model's cache layout (None: no memory)."""
        if memory is None or (not isinstance(memory, PackedKV) and len(memory) == 0):
            return None
        pack = memory if isinstance(memory, PackedKV) else PackedKV.from_chunks(list(memory))
        first = next(iter(pack.keys.values()))
        if (first.shape[0], first.shape[1], pack.head_dim) != (self.layers, self.kv_heads, self.head_dim):
            raise ModelMismatch(f"KV of items {list(pack.item_ids)[:5]} has {first.shape[0]} layers, "
                                f"{first.shape[1]} heads of {pack.head_dim}; {self.name} needs "
                                f"({self.layers}, {self.kv_heads}, n, {self.head_dim})")
        return pack

    def _recompute(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, pack: PackedKV,
                   start: int, first: int) -> None:
        """Read the first ``first`` tokens of every item again, in place in ``keys`` and ``values``
        (one prompt's prefix: layers, kv_heads, tokens, head_dim), each attending to every token
        before it: the preamble, the items before its own as stored, and the tokens read again
        before it. Items encoded apart do not see each other; their first tokens, which draw the
        most attention, are where that hurts most, and what this repairs (as in EPIC).

        One forward pass over the chosen tokens, with a mask that hides the stale copies.
        """
        chosen = (pack.token_positions() < first).nonzero().squeeze(1)
        if pack.ids is None or not len(chosen):
            return
        dev = keys.device
        at = (start + chosen).to(dev)
        ids = pack.ids.to(dev).long().index_select(0, chosen.to(dev))
        pos = positions.index_select(0, at)
        earlier = positions[None, :] < pos[:, None]
        earlier[:, at] = False  # the stored copies of the tokens read again
        again = pos[None, :] <= pos[:, None]
        allowed = torch.cat([earlier, again], dim=1)
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=dev)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        n = keys.shape[2]
        with torch.inference_mode():
            cache = _cache_of(self.model.config, keys.unsqueeze(1), values.unsqueeze(1))  # not modified: appended to
            out = self.model(ids[None], **{self._cache_kw: cache}, attention_mask=mask[None, None],
                             position_ids=pos[None], use_cache=True, logits_to_keep=1)
            new_k, new_v = _stack_cache(_returned_cache(out))
        keys[:, :, at] = new_k[:, 0, :, n:]
        values[:, :, at] = new_v[:, 0, :, n:]

    def generate(self, messages: Any, recall: Any = None, **kwargs: Any) -> str:
        """The model's reply to ``messages``, with the memories of ``recall`` (a :class:`memplug.Recall`)."""
        return "".join(self.stream(messages, recall, **kwargs))

    def stream(self, messages: Any, recall: Any = None, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None,
               on_prefill: Callable[[int, float], None] | None = None,
               on_inject: Callable[[int, float], None] | None = None) -> Iterator[str]:
        """Like :meth:`generate`, yielding the reply piece by piece as tokens are produced.

        KV memory is injected when ``recall.kv`` was encoded by this model; if not
        (another model, or a non-rotary architecture) those items are given as text.
        ``on_prefill(prompt_tokens, seconds)`` hears how long the prompt took to read, and
        ``on_inject(memory_tokens, seconds)`` how long injected memory took to place.
        """
        chunks = self.recall_chunks(recall)
        adapter = self.recall_adapter(recall)
        text = (recall.as_text(kv_as_text=chunks is None, adapter_as_text=adapter is None)
                if recall is not None else "")
        head, closing = self.layout(messages, text, chunks=bool(chunks))
        if chunks or head:
            pre_ids = self._stored_preamble()[0]
            if head and self.ids(head) != pre_ids:
                raise ModelMismatch("the chat template's preamble depends on the conversation; "
                                    "this model cannot take injected memory")
        rows = [self.ids(closing)]
        yield from self._stream_rows(chunks or [], rows, max_new_tokens, temperature, top_p, seed,
                                     with_preamble=bool(head), adapter=adapter, on_prefill=on_prefill,
                                     recompute=recall.kv.recompute if chunks else 0, on_inject=on_inject)

    def recall_chunks(self, recall: Any) -> PackedKV | None:
        """The KV memory of ``recall`` as one pack if it can be injected here, else None (served as text)."""
        kv = getattr(recall, "kv", None)
        if kv is None or not kv.items or not self.can_inject or kv.fingerprint != self.fingerprint:
            return None
        return kv.packed()

    def recall_adapter(self, recall: Any) -> Any:
        """The adapter of ``recall`` if it can be applied here (trained on this model), else None."""
        ref = getattr(recall, "adapter", None)
        if ref is None or ref.fingerprint != self.fingerprint:
            return None
        return ref

    def _stream_rows(self, chunks, rows, max_new_tokens, temperature, top_p, seed, with_preamble=True,
                     adapter=None, on_prefill=None, recompute=0, on_inject=None):
        tokens: list[int] = []
        emitted = ""
        started = time.perf_counter()
        for step in self.decode(chunks, rows, max_new_tokens, temperature, top_p, seed, with_preamble,
                                adapter=adapter, recompute=recompute, on_inject=on_inject):
            if on_prefill is not None and not tokens:
                on_prefill(len(rows[0]), time.perf_counter() - started)
                on_prefill = None
            token = int(step[0])
            if token in self.stop_ids:
                break
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue  # half a multi-byte character: wait for the rest
            if len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text

    def decode(self, chunks: Sequence[KVChunk] | PackedKV, rows: Sequence[Sequence[int]],
               max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               with_preamble: bool = True, stop: Callable[[int, list[int]], bool] | None = None,
               per_row_chunks: Sequence[Sequence[KVChunk] | PackedKV] | None = None, adapter: Any = None,
               shared_prefix: Sequence[int] | None = None, recompute: int = 0,
               on_inject: Callable[[int, float], None] | None = None) -> Iterable[torch.Tensor]:
        """Run ``rows`` (closing token ids, one row per conversation) on one shared memory prefix
        (``chunks``: a list of chunks or a :class:`PackedKV`), or on a prefix per row (``per_row_chunks``).
        ``recompute`` tokens at the start of each item are read again in context (see
        :meth:`build_batch_cache`); ``on_inject(memory_tokens, seconds)`` hears how long placing
        the memory took (on a GPU, waiting for it).

        ``adapter`` (a :class:`memplug.AdapterRef`) is applied for the whole run.
        ``shared_prefix`` replaces the memory preamble with any token ids that
        every row continues (a few-shot prompt): computed once, shared by the rows.

        Yields the next token of every row per step, until every row stopped
        (a stop token, or ``stop(row, tokens)`` true) or ``max_new_tokens``.
        """
        b = len(rows)
        if per_row_chunks is not None and len(per_row_chunks) != b:
            raise InvalidInput(f"{len(per_row_chunks)} chunk lists for {b} rows")
        with self._lock:
            self._use_adapter(adapter)
            if shared_prefix:
                k, v = self._prefix_kv(tuple(shared_prefix))
                cache = _cache_of(self.model.config, k.unsqueeze(1).expand(-1, b, -1, -1, -1),
                                  v.unsqueeze(1).expand(-1, b, -1, -1, -1))
                starts = torch.full((b,), len(shared_prefix))
                prefix_mask = torch.ones(b, len(shared_prefix), dtype=torch.long)
            elif with_preamble:
                started = _synced(self.device)
                cache, starts, prefix_mask = self.build_batch_cache(per_row_chunks or [chunks] * b, recompute)
                if on_inject is not None:
                    placed = int(starts.max()) - len(self._stored_preamble()[0])
                    if placed > 0:
                        on_inject(placed, _synced(self.device) - started)
            else:
                cache, starts = None, torch.zeros(b, dtype=torch.long)
                prefix_mask = torch.zeros(b, 0, dtype=torch.long)
        stored = prefix_mask.shape[1]
        n = max(len(r) for r in rows)
        # Left padding inside the closing segment, masked out; positions continue each row's prefix.
        input_ids = torch.full((b, n), self.pad_id, dtype=torch.long)
        mask = torch.zeros(b, stored + n, dtype=torch.long)
        mask[:, :stored] = prefix_mask
        pos = torch.zeros(b, n, dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, n - len(r):] = torch.tensor(list(r))
            mask[i, stored + n - len(r):] = 1
            pos[i, n - len(r):] = torch.arange(int(starts[i]), int(starts[i]) + len(r))
        next_pos = pos[:, -1] + 1
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        done = torch.zeros(b, dtype=torch.bool)
        produced: list[list[int]] = [[] for _ in range(b)]
        running = torch.arange(b)  # the rows still in the batch: finished rows leave it
        with self._lock, torch.inference_mode():
            self._use_adapter(adapter)
            logits, cache = self._forward(input_ids, cache, mask, pos)
            for _ in range(max_new_tokens):
                picked = _pick(logits, temperature, top_p, generator)
                token = torch.full((b,), self.pad_id, dtype=picked.dtype)
                token[running] = picked
                yield token
                for i in running.tolist():
                    t = int(token[i])
                    produced[i].append(t)
                    if t in self.stop_ids or (stop is not None and stop(i, produced[i])):
                        done[i] = True
                if bool(done.all()):
                    return
                keep = ~done[running]
                # Drop finished rows once a quarter of the batch has finished: a step then costs what
                # the rows left cost, and the cache is copied only a few times per batch.
                if int((~keep).sum()) * 4 >= len(running):
                    rows_left = keep.nonzero().squeeze(1)
                    cache.batch_select_indices(rows_left.to(self.device))
                    running, picked = running[rows_left], picked[rows_left]
                    mask, next_pos = mask[rows_left], next_pos[rows_left]
                mask = torch.cat([mask, torch.ones(len(running), 1, dtype=torch.long)], dim=1)
                logits, cache = self._forward(picked.unsqueeze(1), cache, mask, next_pos.unsqueeze(1))
                next_pos = next_pos + 1

    def replies(self, rows: Sequence[Sequence[int]], max_new_tokens: int = 64,
                stop: Callable[[int, str], bool] | None = None, batch_size: int = 48,
                **options: Any) -> list[tuple[str, bool]]:
        """Decode many rows in batches: ``(text, finished)`` per row, ``finished`` when the
        model wrote a stop token. ``stop(row, text)`` ends a row early (``row`` indexes
        ``rows``); ``options`` go to :meth:`decode` (``per_row_chunks`` is split per batch)."""
        out: list[tuple[str, bool]] = []
        chunks = options.pop("chunks", [])
        per_row = options.pop("per_row_chunks", None)
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            produced: list[list[int]] = [[] for _ in part]

            def row_stop(i: int, tokens: list[int], start: int = start) -> bool:
                return stop(start + i, self.tokenizer.decode(tokens, skip_special_tokens=True))

            for step in self.decode(chunks, part, max_new_tokens, stop=row_stop if stop is not None else None,
                                    per_row_chunks=per_row[start:start + batch_size] if per_row else None,
                                    **options):
                for i, t in enumerate(step.tolist()):
                    produced[i].append(t)
            for p in produced:
                end = next((k for k, t in enumerate(p) if t in self.stop_ids), None)
                kept = [t for t in p[:end] if t != self.pad_id]
                out.append((self.tokenizer.decode(kept, skip_special_tokens=True), end is not None))
        return out

    def _forward(self, input_ids, cache, mask, pos):
        dev = self.device
        # Only the last position's logits are wanted: the vocabulary projection of a whole
        # prompt would cost a sixth of a batch's prefill.
        out = self.model(input_ids.to(dev), **{self._cache_kw: cache}, attention_mask=mask.to(dev),
                         position_ids=pos.to(dev), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float().cpu(), _returned_cache(out)


def _median_ms(fn: Callable[[], None], repeats: int, device: Any) -> float:
    fn()  # the first call pays for allocations
    times = []
    for _ in range(repeats):
        started = _synced(device)
        fn()
        times.append(_synced(device) - started)
    return 1000 * sorted(times)[len(times) // 2]


def _synced(device: Any) -> float:
    """The time now, once a GPU has done the work queued on it (what a timing must wait for)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cut = sorted_p.cumsum(dim=-1) - sorted_p > top_p
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    # Inverse-CDF sampling: one uniform number per row. ``torch.multinomial`` draws one random
    # number per vocabulary entry, which took an eighth of a sampled decoding step on CPU.
    cdf = probs.float().cumsum(dim=-1)
    u = torch.rand(len(cdf), 1, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(probs.shape[-1] - 1)


def _cache_of(config: Any, keys: torch.Tensor, values: torch.Tensor) -> Any:
    """A DynamicCache holding (layers, batch, heads, tokens, head_dim) keys and values.

    ``keys`` and ``values`` must be tensors the caller just built (they become the
    cache's own); expanded views are materialised.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for layer in range(keys.shape[0]):
        k, v = keys[layer], values[layer]
        slot = cache.layers[layer] if len(getattr(cache, "layers", ())) > layer else None
        if slot is not None and hasattr(slot, "keys") and type(slot).__name__ == "DynamicLayer":
            # Hand the tensors over instead of concatenating them onto an empty one (a copy).
            cache.update(k[:, :, :0], v[:, :, :0], layer)
            slot.keys, slot.values = k.contiguous(), v.contiguous()
        else:
            cache.update(k, v, layer)
    return cache


def _cache_keyword(model: Any) -> str:
    """The name of the forward pass's cache argument: transformers 5 renamed ``past_key_values``
    to ``cache`` (the old name warns on every call); earlier versions know only the old one."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    # A forward that takes only **kwargs (a wrapper) gets the old name: every version reads it,
    # where a version from before the rename would drop an unknown ``cache`` without a word.
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out: Any) -> Any:
    """The cache a forward pass returned, under either name (see :func:`_cache_keyword`)."""
    # Looked up as keys: the old attribute still answers on transformers 5, with a warning.
    return out["cache"] if "cache" in out else out.get("past_key_values")


def _stack_cache(cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(layers, batch, kv_heads, tokens, head_dim) keys and values of a transformers cache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return torch.stack([layer.keys for layer in layers]), torch.stack([layer.values for layer in layers])
    return torch.stack([k for k, _ in cache]), torch.stack([v for _, v in cache])
