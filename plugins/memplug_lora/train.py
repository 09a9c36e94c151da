"""Training the lora tier's adapters: from synthetic data, with recall measured on held-out questions.

Training runs on a private copy of the local model (see
:func:`memplug.runtime.fresh_model`), so the model that serves reads is
never touched until a finished adapter is loaded into it.

What keeps an adapter from breaking the model (measured in
``benchmarks/results/lora.json``):

- the loss is taken on answer tokens only;
- **replay**: the base model's own answers to neutral prompts are mixed into
  training, with a KL term to the base model's next-token distribution at their
  answer positions, so the adapter is trained to leave general behaviour as it
  was (the base distribution is computed once per example and kept as its top k);
- a small rank on the MLP projections only, a short schedule with warm-up and
  linear decay, and **early stopping** on held-out recall;
- bfloat16 autocast where the hardware has it (``precision``): LoRA weights and
  optimizer state stay fp32.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from memplug.plugin import InvalidInput, ModelUnavailable, memories_text, write_atomic
from memplug.runtime import answer_key, contains_word, fresh_model, model_cache_dir

from .synth import ItemData, beside, contrasts, synthesize

log = logging.getLogger(__name__)
# PEFT calls a transformers method deprecated in v5 while training; nothing for a user to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
# Part of the key of the cached replay answers and the base model's replay targets: raised
# whenever the code that computes them changes, since the same model and examples then give
# other numbers, and a stale cache would train differently from a fresh one.
CACHE_VERSION = 2
Progress = Callable[[str, int, int, dict[str, Any]], None]


@dataclass(frozen=True)
class TrainConfig:
    """How an adapter is trained. The defaults are the benchmark's best trade-off."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    first_layer: int = 0  # adapt layers from this one up (the lower layers stay the base model's)
    lr: float = 3e-3
    weight_decay: float = 0.0  # AdamW's decoupled decay of the LoRA weights
    epochs: int = 3
    batch_size: int = 8
    replay: float = 0.25  # replay examples per item example, in every epoch
    replay_tokens: int = 16  # the first tokens of each replay answer trained on (0: all of it)
    kl: float = 1.0  # replay loss: KL to the base model's distribution (0: cross-entropy on its answers)
    contrast: int = 1  # contrast prompts per item per epoch: its questions about another subject, kept at base
    contrast_tokens: int = 16  # ... over the first tokens of the base model's answer to them (0: its first token)
    served: float = 0.5  # share of item examples asked as the tier serves them: other memories in the prompt
    min_recall: float = 0.5  # an item counts as held by the adapter at this held-out recall
    eval_from: int = 3  # held-out recall is first measured after this epoch (and always after the last) ...
    eval_steps: int = 24  # ... then after the first epoch that ends at least this many steps after the last
    max_seconds: float = 600.0
    min_steps: int = 96  # few items still get this many optimizer steps (more epochs)
    samples: int = 3  # model-written questions per item
    paraphrases: int = 2
    precision: str = "auto"  # "bf16": bfloat16 autocast; "fp32"; "auto": bf16 where the hardware has it
    kl_top: int = 32  # the base distribution kept per replay position: its top k tokens and the rest's mass
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {"rank": self.rank >= 1, "alpha": self.alpha > 0, "lr": 0 < self.lr < 1, "weight_decay": self.weight_decay >= 0, "kl": self.kl >= 0,
                  "epochs": self.epochs >= 1, "min_steps": self.min_steps >= 0, "batch_size": self.batch_size >= 1, "replay": self.replay >= 0,
                  "replay_tokens": self.replay_tokens >= 0, "eval_from": self.eval_from >= 1,
                  "eval_steps": self.eval_steps >= 1,
                  "contrast": self.contrast >= 0, "contrast_tokens": self.contrast_tokens >= 0, "served": 0 <= self.served <= 1,
                  "min_recall": 0 <= self.min_recall <= 1, "max_seconds": self.max_seconds > 0,
                  "targets": bool(self.targets), "first_layer": self.first_layer >= 0, "samples": self.samples >= 0, "paraphrases": self.paraphrases >= 0,
                  "precision": self.precision in ("auto", "bf16", "fp32"), "kl_top": self.kl_top >= 1}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise InvalidInput("invalid LoRA training setting(s): " + ", ".join(
                f"{k}={getattr(self, k)!r}" for k in bad))


@dataclass
class TrainResult:
    """A trained adapter: its PEFT state and config, per-item recall, and how training went."""

    state: dict[str, Any]
    peft_config: dict[str, Any]
    recall: dict[int, float]
    metrics: dict[str, Any] = field(default_factory=dict)

    def passed(self, threshold: float) -> list[int]:
        return sorted(i for i, r in self.recall.items() if r >= threshold)


# -- synthetic data -------------------------------------------------------------


def make_data(lm: Any, statements: Sequence[str], item_ids: Sequence[int], cfg: TrainConfig) -> list[ItemData]:
    """Questions, paraphrases and held-out questions for each statement, written with ``lm``'s help
    (under the training's precision: bf16 autocast makes it about 1.3 times faster on CPUs that have it)."""
    autocast = _autocast(lm.device, cfg.precision)

    def complete(prefix: str, tails: list[str], temperature: float, seed: int) -> list[str]:
        with autocast():
            return complete_lines(lm, prefix, tails, temperature, seed)

    with _bf16_weights(lm.model, lm.device, cfg.precision):
        return synthesize(statements, item_ids, complete, seed=cfg.seed, samples=cfg.samples,
                          paraphrases=cfg.paraphrases)


def complete_lines(lm: Any, prefix: str, tails: Sequence[str], temperature: float = 0.0, seed: int = 0,
                   max_new_tokens: int = 28, batch_size: int = 64) -> list[str]:
    """The first line ``lm`` writes after ``prefix + tail``, for each tail (raw text, no chat template).

    The prefix's key/values are computed once and shared by every row.
    """
    replies = lm.replies([lm.ids(t) for t in tails], max_new_tokens, batch_size=batch_size,
                         stop=lambda i, text: "\n" in text.lstrip("\n"), temperature=temperature, seed=seed,
                         with_preamble=False, shared_prefix=lm.ids(prefix))
    return [text.strip().split("\n")[0].strip() for text, _ in replies]


def replay_prompts() -> list[str]:
    return json.loads(resources.files("memplug_lora").joinpath("replay_prompts.json").read_text())


def replay_pairs(lm: Any, cache: Path | None = None, max_new_tokens: int = 48) -> list[tuple[str, str, bool]]:
    """The base model's own greedy answers to neutral prompts: ``(prompt, answer, finished)``.

    Computed once per model and kept in ``cache`` (a folder) under the model's fingerprint.
    """
    prompts = replay_prompts()
    tag = hashlib.blake2b(json.dumps([prompts, max_new_tokens, CACHE_VERSION]).encode(), digest_size=4).hexdigest()
    path = cache / f"replay-{lm.fingerprint[:16]}-{tag}.json" if cache is not None else None
    if path is not None and path.is_file():
        try:
            return [tuple(x) for x in json.loads(path.read_text())]
        except (ValueError, TypeError):
            log.warning("lora: replay cache %s is unreadable; recomputing it", path)
    rows = [lm.ids(ask(lm, p)) for p in prompts]
    answers = lm.replies(rows, max_new_tokens, batch_size=36, with_preamble=False)
    pairs = [(p, a, done) for p, (a, done) in zip(prompts, answers, strict=True) if a.strip()]
    if path is not None:
        write_atomic(path, json.dumps(pairs).encode())
    return pairs


# -- training ---------------------------------------------------------------------


def train_items(home: str | Path, model: str | None, statements: Sequence[str], item_ids: Sequence[int],
                cfg: TrainConfig, progress: Progress | None = None) -> tuple[TrainResult, str]:
    """Synthesize the items' training set, train an adapter on it and measure recall, on a fresh
    copy of the local model (``home`` and ``model`` as in :func:`memplug.runtime.fresh_model`).

    Returns the result and the base model's fingerprint. The tier runs this in a child process
    (see :func:`memplug.runtime.run_in_child`), so its arguments and result are plain, picklable data.
    """
    lm = fresh_model(Path(home), model)
    if progress is not None:
        progress("synthesize", 0, len(statements), {})
    data = make_data(lm, statements, item_ids, cfg)
    cache = model_cache_dir(Path(home), model)
    result = train(lm, data, replay_pairs(lm, cache), cfg, progress=progress, cache=cache)
    result.state = {k: v.cpu() for k, v in result.state.items()}  # a parent need not touch the GPU to read it
    return result, lm.fingerprint


def train(lm: Any, data: Sequence[ItemData], replay: Sequence[tuple[str, str, bool]], cfg: TrainConfig,
          progress: Progress | None = None, cache: Path | None = None) -> TrainResult:
    """Train a LoRA on ``lm`` (a private copy: its model is changed in place) and measure recall.

    Stops early when every item's held-out recall reaches ``cfg.min_recall`` or
    recall stops improving; keeps the adapter state of the best evaluation.
    ``cache`` (a folder) keeps the base model's distribution on the replay examples
    between trainings: it depends only on the model and the replay set.
    """
    import torch

    try:
        from peft import (
            LoraConfig,
            get_peft_model,
            get_peft_model_state_dict,
            set_peft_model_state_dict,
        )
        from peft.helpers import disable_input_dtype_casting
    except ImportError as e:
        raise ModelUnavailable("the lora tier needs peft: pip install 'memplug[lora]'") from e
    if not data:
        raise InvalidInput("nothing to train on: no items")
    t0 = time.perf_counter()
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    end = [lm.tokenizer.eos_token_id] if lm.tokenizer.eos_token_id is not None else []
    facts = []
    for d in data:
        for q, a in d.train:
            memories = beside(d, data, rng, rng.choice((1, 2))) if rng.random() < cfg.served else None
            facts.append(_example(lm, ask(lm, q, memories), a, end, "fact"))
    replays = [_replay_example(lm, p, a, end if done else [], cfg.replay_tokens) for p, a, done in replay]
    n_replay = min(len(replays), math.ceil(cfg.replay * len(facts)))
    pool = _contrast_pool(lm, data, cfg, rng, end)
    n_layers = lm.layers
    if cfg.first_layer >= n_layers:
        raise InvalidInput(f"first_layer={cfg.first_layer} but {lm.name} has {n_layers} layers")
    layers = list(range(cfg.first_layer, n_layers)) if cfg.first_layer else None
    peft_config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, bias="none",
                             target_modules=list(cfg.targets), layers_to_transform=layers, task_type="CAUSAL_LM")
    model = get_peft_model(lm.model, peft_config)
    # With the lower layers left as the base model's, their output for an example never changes:
    # it is computed once, and each step runs (and back-propagates through) the adapted layers only.
    lower = _Lower.build(model.get_base_model(), cfg.first_layer, facts[0], lm.pad_id, lm.device) \
        if cfg.first_layer else None
    # Frozen weights are held in bf16 while training runs under bf16 autocast (the same arithmetic).
    # PEFT would cast each LoRA's input to its fp32 weights' dtype, and autocast cast it straight
    # back: two copies of every bf16 activation (down_proj's input) per call, for the same bits.
    with _bf16_weights(model, lm.device, cfg.precision, frozen_only=True), disable_input_dtype_casting(model):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        per_epoch = len(facts) + n_replay + sum(min(cfg.contrast, len(d.train)) for d in data)
        steps_per_epoch = math.ceil(per_epoch / cfg.batch_size)
        epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
        total = steps_per_epoch * epochs
        warmup = max(1, total // 10)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / total))

        autocast = _autocast(lm.device, cfg.precision)
        targets: dict[tuple[int, ...], tuple[Any, Any]] = {}  # the base model's top-k per replay example
        if cache is not None and cfg.kl > 0 and replays:
            targets = _replay_targets(lm, model, replays, cfg, cache, autocast)
        history: list[dict[str, Any]] = []
        best: tuple[float, int, dict[str, Any], dict[int, float]] | None = None
        step = 0
        measured = -cfg.eval_steps  # the step of the last measurement
        stopped = "epochs"
        for epoch in range(epochs):
            model.train()
            examples = facts + rng.sample(replays, n_replay)
            if pool is not None:
                examples += [e for held in pool.values() for e in rng.sample(held, min(cfg.contrast, len(held)))]
            else:
                examples += [_example(lm, ask(lm, q), "", [], "replay") for q in contrasts(data, cfg.contrast, rng)]
            losses = []
            restore_attention = _training_attention(model.get_base_model(), lm.device, cfg.precision)
            try:
                for batch in _batches(examples, cfg.batch_size, rng):
                    with autocast():
                        if lower is not None:
                            lower.fill(batch)
                        if batch[0][2] == "replay" and cfg.kl > 0:
                            _base_targets(model, batch, targets, lm.pad_id, lm.device, cfg.kl_top, lower)
                        loss = _loss(model, batch, lm.pad_id, lm.device, cfg.kl, targets, lower)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(float(loss.detach()))
                    step += 1
                    if progress is not None:
                        progress("train", step, total, {"loss": losses[-1], "epoch": epoch + 1})
                    if time.perf_counter() - t0 > cfg.max_seconds:
                        stopped = "time"
                        break
            finally:
                restore_attention()
            mean_loss = sum(losses) / max(1, len(losses))
            due = epoch + 1 >= cfg.eval_from and step - measured >= cfg.eval_steps
            if not due and epoch + 1 < epochs and stopped != "time":
                # Too early to be worth measuring, or too soon after the last measurement: with few
                # items an epoch is a handful of steps, and a measurement costs as much as a few.
                log.info("lora: epoch %d, loss %.3f", epoch + 1, mean_loss)
                continue
            measured = step
            model.eval()
            with autocast():
                recall = evaluate(lm, data)
            mean = sum(recall.values()) / len(recall)
            history.append({"epoch": epoch + 1, "step": step, "loss": mean_loss,
                            "held_out_recall": mean, "seconds": time.perf_counter() - t0})
            log.info("lora: epoch %d, loss %.3f, held-out recall %.2f", epoch + 1, history[-1]["loss"], mean)
            if progress is not None:
                progress("evaluate", epoch + 1, epochs, history[-1])
            if best is None or mean > best[0]:
                state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
                best = (mean, epoch + 1, state, recall)
            if stopped == "time":
                break
            if all(r >= cfg.min_recall for r in recall.values()) and epoch >= 1:
                stopped = "recall"
                break
            if step >= cfg.min_steps and len(history) >= 3 and \
                    mean <= history[-2]["held_out_recall"] <= history[-3]["held_out_recall"]:
                stopped = "plateau"
                break
        assert best is not None
        mean, epoch, state, recall = best
        if epoch != history[-1]["epoch"]:  # leave the model as the adapter that is returned
            set_peft_model_state_dict(model, state)
        config = peft_config.to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        metrics = {"seconds": time.perf_counter() - t0, "steps": step, "epochs_run": history[-1]["epoch"],
                   "best_epoch": epoch, "stopped": stopped, "examples": len(facts), "replay_per_epoch": n_replay,
                   "held_out_recall": mean, "history": history, "config": asdict(cfg),
                   "precision": "bf16" if _bf16(lm.device, cfg.precision) else "fp32",
                   "cached_lower_layers": lower.layers if lower is not None else 0}
        return TrainResult(state, config, recall, metrics)


def _batches(examples: list[Any], size: int, rng: random.Random) -> list[list[Any]]:
    """Shuffled batches of similar length: examples are sorted by length within windows of
    eight batches, so little of each batch is padding, then the batches are shuffled."""
    rng.shuffle(examples)
    window = 8 * size
    batches = []
    for kind in ("fact", "replay"):  # a batch holds one kind: replay batches take another loss
        same = [e for e in examples if e[2] == kind]
        for start in range(0, len(same), window):
            part = sorted(same[start:start + window], key=lambda e: len(e[0]) + len(e[1]))
            batches += [part[k:k + size] for k in range(0, len(part), size)]
    rng.shuffle(batches)
    return batches


def ask(lm: Any, question: str, memories: Sequence[str] | None = None) -> str:
    """``question`` as the model reads it: alone under the plain system prompt, or (``memories``
    given) under the memory prompt with those memories written out, as the tier's reads have it."""
    if memories is None:
        return lm.layout(question, "", chunks=False)[1]
    head, closing = lm.layout(question, memories_text(memories))
    return head + closing


def _example(lm: Any, prompt: str, answer: str, end: list[int], kind: str) -> tuple[list[int], list[int], str]:
    """Token ids of a laid-out prompt (see :func:`ask`) and of its answer."""
    return lm.ids(prompt), lm.ids(answer) + end, kind


def _contrast_pool(lm: Any, data: Sequence[ItemData], cfg: TrainConfig, rng: random.Random,
                   end: list[int]) -> dict[int, list[tuple[list[int], list[int], str]]] | None:
    """Per item, ``3 * cfg.contrast`` contrast prompts with the first ``cfg.contrast_tokens`` of
    the base model's answer to each (None with ``contrast_tokens=0``: the prompts are then drawn
    afresh every epoch and held to the base model at the answer's first token only).

    The answer's first token is mostly "The" or the subject's name; where the question's
    value goes ("The capital of Norway is ...") is a few tokens on, and there an adapter puts
    the user's own values ("Bergen") unless it is held to the base model there too."""
    if not cfg.contrast or not cfg.contrast_tokens:
        return None
    t0 = time.perf_counter()
    prompts = {d.item_id: contrasts([d], 3 * cfg.contrast, rng) for d in data}
    flat = [q for qs in prompts.values() for q in qs]
    # Under the training's precision, as synthesis runs: these answers' distribution is then held
    # under that autocast too. (The cached replay answers are generated once per model, in fp32.)
    with _bf16_weights(lm.model, lm.device, cfg.precision), _autocast(lm.device, cfg.precision)():
        answers = iter(lm.replies([lm.ids(ask(lm, q)) for q in flat], cfg.contrast_tokens, batch_size=36,
                                  with_preamble=False))
    log.info("lora: the base model's answers to %d contrast prompts in %.1f s", len(flat), time.perf_counter() - t0)
    out = {}
    for item_id, qs in prompts.items():
        out[item_id] = []
        for q in qs:
            a, done = next(answers)
            out[item_id].append(_replay_example(lm, q, a, end if done else [], cfg.contrast_tokens))
    return out


def _replay_example(lm: Any, prompt: str, answer: str, end: list[int],
                    keep: int) -> tuple[list[int], list[int], str]:
    """A replay example whose answer is cut to its first ``keep`` tokens (0: kept whole).

    The replay loss holds the adapted model to the base model's distribution at the
    answer positions; the first few, where an answer's course is set, do most of that work.
    """
    prompt_ids, answer_ids, kind = _example(lm, ask(lm, prompt), answer, end, "replay")
    if keep and len(answer_ids) > keep:
        answer_ids = answer_ids[:keep]
    return prompt_ids, answer_ids, kind


def _bf16(device: str, precision: str) -> bool:
    import torch

    if precision != "auto":
        return precision == "bf16"
    if str(device).startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return str(device) == "cpu" and torch.cpu._is_avx512_bf16_supported()


def _autocast(device: str, precision: str) -> Callable[[], Any]:
    """A context factory: bfloat16 autocast (LoRA weights and optimizer state stay fp32), or nothing.

    On CPUs with AVX-512 BF16 it makes a training step about 1.6 times faster
    (``benchmarks/results/lora.json`` records which precision each run used).
    """
    import contextlib

    import torch

    if not _bf16(device, precision):
        return contextlib.nullcontext
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    return lambda: torch.autocast(kind, dtype=torch.bfloat16)


def _training_attention(causal_lm: Any, device: str, precision: str) -> Callable[[], None]:
    """Switch ``causal_lm`` to the eager attention for training steps where that is faster;
    returns the function that switches it back.

    On CPU in bfloat16, back-propagating PyTorch's fused attention took a fifth of a training
    step at these lengths (about 50 tokens); the eager attention does the same arithmetic
    (softmax in fp32), with gradients as close to fp32's, in 85% of the step time.
    """
    previous = getattr(causal_lm.config, "_attn_implementation", None)
    if str(device) != "cpu" or not _bf16(device, precision) or previous in (None, "eager") \
            or not hasattr(causal_lm, "set_attn_implementation"):
        return lambda: None
    causal_lm.set_attn_implementation("eager")
    return lambda: causal_lm.set_attn_implementation(previous)


@contextlib.contextmanager
def _bf16_weights(model: Any, device: str, precision: str, frozen_only: bool = False) -> Iterator[None]:
    """Give ``model``'s linear layers bfloat16 copies of their weights while it runs under bf16
    autocast (with ``frozen_only``, only layers whose weights take no gradients: a LoRA's stay fp32).

    Autocast would cast those weights to bfloat16 at every call anyway (it keeps casts only of
    weights that take gradients): that, mostly the vocabulary projection, was a fifth of a
    decoding step. The arithmetic is the same, bit for bit. A projection tied to the embeddings
    gets a copy of its own (the embeddings stay fp32), and every layer gets its fp32 weight back
    on the way out.
    """
    import torch

    if not _bf16(device, precision):
        yield
        return
    kept = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and weight.dtype == torch.float32 \
                and not (frozen_only and weight.requires_grad):
            kept.append((module, weight))
            module.weight = torch.nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
    try:
        yield
    finally:
        for module, weight in kept:
            module.weight = weight


def _tensors(batch: Sequence[tuple[list[int], list[int], str]], pad_id: int, device: str) -> tuple[Any, Any]:
    import torch

    n = max(len(p) + len(a) for p, a, _ in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), n, dtype=torch.long)
    for i, (p, a, _) in enumerate(batch):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask[i, :len(p) + len(a)] = 1
    return ids.to(device), mask.to(device)


class _Lower:
    """The output of a model's first ``layers`` decoder layers for each training example, kept.

    Those layers carry no adapter, so their output for a token sequence is fixed: it is
    computed once (without autograd) and each training step runs only the layers above.
    Used only where a check shows that running the two parts in turn gives the full
    model's output; otherwise training runs the whole model at every step.
    """

    def __init__(self, causal_lm: Any, layers: int, pad_id: int, device: str) -> None:
        self.inner = causal_lm.model
        self.layers = layers
        self.pad_id = pad_id
        self.device = device
        self.states: dict[tuple[int, ...], Any] = {}

    @classmethod
    def build(cls, causal_lm: Any, layers: int, probe: tuple[list[int], list[int], str], pad_id: int,
              device: str) -> _Lower | None:
        import torch

        inner = getattr(causal_lm, "model", None)
        if not isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
            return None
        lower = cls(causal_lm, layers, pad_id, device)
        ids, mask = _tensors([probe], pad_id, device)
        with torch.no_grad():
            want = inner(input_ids=ids, attention_mask=mask).last_hidden_state
            lower.fill([probe])
            got = lower.hidden([probe], mask)
        lower.states.clear()
        scale = float(want.abs().max()) or 1.0
        if not torch.isfinite(got).all() or float((got - want).abs().max()) > 1e-3 * scale:
            log.info("lora: %s does not split at layer %d exactly; training runs the whole model",
                     type(causal_lm).__name__, layers)
            return None
        return lower

    def _swap(self, part: slice, norm: bool) -> Callable[[], None]:
        import torch

        layers, final = self.inner.layers, self.inner.norm
        self.inner.layers = torch.nn.ModuleList(list(layers)[part])
        if not norm:
            self.inner.norm = torch.nn.Identity()

        def restore() -> None:
            self.inner.layers, self.inner.norm = layers, final
        return restore

    def fill(self, batch: Sequence[tuple[list[int], list[int], str]]) -> None:
        """Compute and keep the lower layers' output for the examples not seen yet."""
        import torch

        todo = [e for e in batch if tuple(e[0] + e[1]) not in self.states]
        if not todo:
            return
        ids, mask = _tensors(todo, self.pad_id, self.device)
        restore = self._swap(slice(0, self.layers), norm=False)
        try:
            with torch.no_grad():
                out = self.inner(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            restore()
        for i, (p, a, _) in enumerate(todo):  # right-padded: an example's states ignore its batch
            self.states[tuple(p + a)] = out[i, :len(p) + len(a)].float().clone()

    def hidden(self, batch: Sequence[tuple[list[int], list[int], str]], mask: Any) -> Any:
        """The model's last hidden state for ``batch``, running only the layers above the kept ones."""
        import torch

        rows = [self.states[tuple(p + a)] for p, a, _ in batch]
        embeds = torch.zeros(len(rows), mask.shape[1], rows[0].shape[-1], dtype=rows[0].dtype, device=rows[0].device)
        for i, r in enumerate(rows):
            embeds[i, :len(r)] = r
        restore = self._swap(slice(self.layers, None), norm=True)
        try:
            return self.inner(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        finally:
            restore()


def _kl_positions(batch: Sequence[tuple[list[int], list[int], str]]) -> tuple[list[int], list[int]]:
    """(row, position) of every replay position that predicts an answer token; an empty answer
    (a contrast prompt) still has the one position that predicts its first token."""
    rows, cols = [], []
    for i, (p, a, _) in enumerate(batch):
        span = range(len(p) - 1, len(p) - 1 + max(1, len(a)))
        rows += [i] * len(span)
        cols += list(span)
    return rows, cols


def _base_targets(model: Any, batch: Sequence[tuple[list[int], list[int], str]],
                  targets: dict[tuple[int, ...], tuple[Any, Any]], pad_id: int, device: str, top: int,
                  lower: _Lower | None = None) -> None:
    """The base model's next-token distribution at each replay example's answer positions, as
    (top-k token ids, their log-probabilities): computed once per example and kept in ``targets``."""
    import torch

    todo = [e for e in batch if tuple(e[0] + e[1]) not in targets]
    if not todo:
        return
    ids, mask = _tensors(todo, pad_id, device)
    rows, cols = _kl_positions(todo)
    causal_lm = model.get_base_model()
    with torch.no_grad(), model.disable_adapter():
        hidden = _hidden(causal_lm, todo, ids, mask, lower)
        logp = torch.log_softmax(causal_lm.lm_head(hidden[rows, cols]).float(), dim=-1)
        values, index = logp.topk(top, dim=-1)
    start = 0
    for e in todo:
        n = max(1, len(e[1]))
        targets[tuple(e[0] + e[1])] = (index[start:start + n], values[start:start + n])
        start += n


def _replay_targets(lm: Any, model: Any, replays: list[tuple[list[int], list[int], str]], cfg: TrainConfig,
                    cache: Path, autocast: Callable[[], Any]) -> dict[tuple[int, ...], tuple[Any, Any]]:
    """The base model's targets (see :func:`_base_targets`) for every replay example, read from
    ``cache`` or computed and written there; keyed by the model, the examples and ``kl_top``."""
    from safetensors import SafetensorError
    from safetensors.torch import load, save

    unique = {tuple(p + a): (p, a, kind) for p, a, kind in replays}  # a repeated example is kept once
    keys = list(unique)
    precision = "bf16" if _bf16(lm.device, cfg.precision) else "fp32"
    tag = hashlib.blake2b(json.dumps([lm.fingerprint, precision, cfg.kl_top, keys, CACHE_VERSION]).encode(),
                          digest_size=6).hexdigest()
    path = cache / f"replay-targets-{lm.fingerprint[:16]}-{tag}.safetensors"
    if path.is_file():
        try:
            stored = load(path.read_bytes())
            return {k: (stored[f"index.{n}"].to(lm.device), stored[f"logp.{n}"].to(lm.device))
                    for n, k in enumerate(keys)}
        except (SafetensorError, KeyError, OSError, ValueError) as e:  # recomputed, never trusted
            log.warning("lora: replay targets %s are unreadable (%s); recomputing them", path, e)
    targets: dict[tuple[int, ...], tuple[Any, Any]] = {}
    order = sorted(unique.values(), key=lambda e: len(e[0]) + len(e[1]))  # little padding per batch
    with autocast():
        for start in range(0, len(order), 16):
            batch = order[start:start + 16]
            _base_targets(model, batch, targets, lm.pad_id, lm.device, cfg.kl_top)
    tensors = {}
    for n, k in enumerate(keys):
        tensors[f"index.{n}"] = targets[k][0].cpu().contiguous()
        tensors[f"logp.{n}"] = targets[k][1].float().cpu().contiguous()
    write_atomic(path, save(tensors))
    return targets


def _loss(model: Any, batch: Sequence[tuple[list[int], list[int], str]], pad_id: int, device: str,
          kl: float, targets: dict[tuple[int, ...], tuple[Any, Any]] | None = None,
          lower: _Lower | None = None) -> Any:
    """Cross-entropy on the answers of item examples. On replay examples, the KL divergence from
    the base model's next-token distribution at every answer position (``targets``, from
    :func:`_base_targets`), counted once more where the answer starts, since the first answer
    token is where a question's meaning is decided; with ``kl=0``, cross-entropy on the base
    model's answer instead.

    The base distribution is kept as its top k tokens plus one bucket for the rest, and the KL
    is taken between the two distributions coarsened that way: exact for what the top k hold,
    a lower bound on the full KL, and a few dozen numbers to keep per position.
    """
    import torch

    ids, mask = _tensors(batch, pad_id, device)
    causal_lm = model.get_base_model()
    hidden = _hidden(causal_lm, batch, ids, mask, lower)
    if batch[0][2] == "replay" and kl > 0:
        assert targets is not None
        rows, cols = _kl_positions(batch)
        logq = torch.log_softmax(causal_lm.lm_head(hidden[rows, cols]).float(), dim=-1)
        index = torch.cat([targets[tuple(p + a)][0] for p, a, _ in batch])
        logp = torch.cat([targets[tuple(p + a)][1] for p, a, _ in batch])
        logq_top = logq.gather(-1, index)
        p_top = logp.exp()
        p_rest = (1 - p_top.sum(-1)).clamp_min(1e-6)
        q_rest = (1 - logq_top.exp().sum(-1)).clamp_min(1e-6)
        per_position = (p_top * (logp - logq_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
        lengths = torch.tensor([max(1, len(a)) for _, a, _ in batch])
        starts = torch.cumsum(lengths, 0) - lengths  # each example's first position in ``rows`` order
        return kl * (per_position.mean() + per_position[starts.to(per_position.device)].mean())
    # The vocabulary projection is a fifth of the model's work: run it on answer positions only.
    labels = torch.full_like(ids, -100)
    for i, (p, a, _) in enumerate(batch):
        labels[i, len(p):len(p) + len(a)] = torch.tensor(a, device=ids.device)
    targets_next = labels[:, 1:]
    picked = targets_next != -100
    logits = causal_lm.lm_head(hidden[:, :-1][picked]).float()
    return torch.nn.functional.cross_entropy(logits, targets_next[picked])


def _hidden(causal_lm: Any, batch: Sequence[tuple[list[int], list[int], str]], ids: Any, mask: Any,
            lower: _Lower | None) -> Any:
    if lower is not None:
        return lower.hidden(batch, mask)
    return causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state


def evaluate(lm: Any, data: Sequence[ItemData], max_new_tokens: int = 32) -> dict[int, float]:
    """Each item's recall: the share of its held-out questions answered with its key word.

    Every question is asked twice: alone, and as the tier serves it, with other memories
    in the prompt (the same ones at every evaluation), where an adapter that only holds the
    item in one layout would lose it.
    """
    rows, owners, keys = [], [], []
    for d in data:
        # Seeded by the item's text, not its id: the same items are checked the same way
        # in any database, and whatever order they come in.
        others = beside(d, data, random.Random(d.statement), 2)
        for q in d.held_out:
            key = answer_key(d.statement, q)
            if key is None:
                continue
            for memories in (None, others):
                rows.append(lm.ids(ask(lm, q, memories)))
                owners.append(d.item_id)
                keys.append(key)
    answers = lm.replies(rows, max_new_tokens, with_preamble=False,
                         stop=lambda i, text: contains_word(text, keys[i]) or "\n" in text.strip())
    got: dict[int, list[bool]] = {d.item_id: [] for d in data}
    for owner, key, (text, _) in zip(owners, keys, answers, strict=True):
        got[owner].append(contains_word(text, key))
    return {i: (sum(v) / len(v) if v else 0.0) for i, v in got.items()}
