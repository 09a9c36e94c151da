"""Speed of the kv and lora tiers on any device, with the local model's architecture and random weights.

The quality benchmarks (``memplug bench kv`` and ``memplug bench lora``) need
the real model's weights. This one times the same work where they cannot be
taken (a GPU machine with no access to the model's package), since speed does
not depend on what the weights hold. It runs in two steps:

1. ``prepare`` (where the real model is): writes the model's config and
   tokenizer, the training sets the lora benchmark synthesizes for 20, 50 and
   100 facts (same generator, same seed, so the same examples), and the replay
   set, to a folder of a few megabytes.
2. ``run`` (on the device): builds the architecture from that config with
   random weights, loads it through memplug's own loader, and times
   - per size: synthesis (the model writing questions and paraphrases; random
     weights never end a line early, so this is an upper bound) and training
     on the prepared set, as the tier trains;
   - the adapter's cold load and resident switch on the serving model;
   - kv: encoding facts to key/values, and time to first token with int4 KV
     memory injected against the same memory recomputed as prompt text.

Training on the prepared set takes the same number of steps as in the lora
benchmark for 50 and 100 facts (three epochs, measured once at the end). With
20 facts the tier measures held-out recall after each epoch from the third and
stops when every item is recalled; random weights recall nothing, so the
schedule runs to its end (96 steps, as the lora benchmark's run did).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..artifacts import write_atomic
from ..errors import InvalidInput
from .facts import generate

BUNDLE = "bundle.json"
BUNDLE_KEYS = ("model", "seed", "sets", "replay", "date")
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")


def prepare(out_dir: str | Path, sizes=(20, 50, 100), seed: int = 7, home: Path | None = None,
            console: Any = None) -> Path:
    """Write the input of :func:`run` to ``out_dir``: model config and tokenizer, training sets, replay set."""
    from memplug.runtime import lora
    from memplug.runtime.model import cache_dir, fresh_model
    from memplug.settings import Settings

    say = console.print if console is not None else print
    settings = Settings()
    home = Path(home or settings.home)
    lm = fresh_model(home, settings.model)
    source = cache_dir(home, settings.model) if settings.model is None else Path(settings.model)
    out = Path(out_dir)
    (out / "model").mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / "model" / name)
    if not (out / "model" / "config.json").is_file():
        raise InvalidInput(f"bench speed: no config.json in {source}: the model must be a local folder")
    cfg = lora.TrainConfig(seed=seed)
    sets = {}
    for n in sizes:
        facts = generate(n, seed)
        t = time.perf_counter()
        data = lora.make_data(lm, [f.statement for f in facts], list(range(n)), cfg)
        sets[str(n)] = [asdict(d) for d in data]
        say(f"{n} facts: {sum(len(d.train) for d in data)} training pairs ({time.perf_counter() - t:.0f} s)")
    replay = lora.replay_pairs(lm, cache_dir(home, settings.model))
    bundle = {"model": lm.name, "fingerprint": lm.fingerprint, "seed": seed, "sets": sets, "replay": replay,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    write_atomic(out / BUNDLE, json.dumps(bundle).encode())
    say(f"wrote {out / BUNDLE} and the model's config and tokenizer")
    return out


def run(input_dir: str | Path, out_dir: str | Path = "benchmarks/results", sizes=None, device: str | None = None,
        ttft_tokens=(256, 1024, 4096), kv_facts: int = 200, name: str = "speed", console: Any = None) -> dict[str, Any]:
    """Time the lora and kv tiers on ``device`` (default: the GPU if there is one) with random weights."""
    import torch

    from memplug.runtime import lora
    from memplug.runtime.model import cache_dir, fresh_model, load_model
    from memplug.runtime.synth import ItemData

    from .kv import _machine, _ttft, codec_for
    from .lora import _switch_times

    say = console.print if console is not None else print
    source = Path(input_dir)
    try:
        bundle = json.loads((source / BUNDLE).read_text())
        lacking = [k for k in BUNDLE_KEYS if k not in bundle]
    except (OSError, ValueError, TypeError) as e:
        raise InvalidInput(f"bench speed: {source / BUNDLE} is missing or unreadable ({e}); "
                           f"write it with `memplug bench speed --prepare {source}` where the model is") from e
    if lacking:
        raise InvalidInput(f"bench speed: {source / BUNDLE} lacks {', '.join(lacking)}; "
                           f"write it again with `memplug bench speed --prepare {source}` where the model is")
    if not (source / "model" / "config.json").is_file():
        raise InvalidInput(f"bench speed: no model config in {source / 'model'}; "
                           f"write it with `memplug bench speed --prepare {source}` where the model is")
    chosen = [str(n) for n in (sizes or bundle["sets"])]
    missing = [n for n in chosen if n not in bundle["sets"]]
    if missing:
        raise InvalidInput(f"bench speed: no training set for {', '.join(missing)} facts in {source / BUNDLE} "
                           f"(it has {', '.join(bundle['sets'])})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    seed = bundle["seed"]
    replay = [tuple(p) for p in bundle["replay"]]
    result: dict[str, Any] = {"machine": _machine(), "device": device, "model": bundle["model"],
                              "weights": "random (the model's architecture from its config)",
                              "input_date": bundle["date"], "seed": seed, "date": time.strftime("%Y-%m-%d %H:%M"),
                              "lora": {}, "kv": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _random_model(source / "model", Path(tmp) / "model")
        home = Path(tmp) / "home"
        cache = cache_dir(home, str(model_dir))
        cache.mkdir(parents=True, exist_ok=True)
        # The first training in a process pays for kernel set-up and for the base model's replay
        # targets (kept in the cache after): timed apart, as a run of the tier after its first.
        lm = fresh_model(home, str(model_dir), device)
        first = [ItemData(**d) for d in bundle["sets"][chosen[0]]][:2]
        t = time.perf_counter()
        lora.train(lm, first, replay, lora.TrainConfig(seed=seed, min_steps=4, epochs=1, eval_from=1), cache=cache)
        result["lora"]["first_training_s"] = time.perf_counter() - t
        say(f"first training (set-up and replay targets): {result['lora']['first_training_s']:.1f} s on {device}")
        del lm
        cfg = lora.TrainConfig(seed=seed)
        trained = None
        for n in chosen:
            data = [ItemData(**d) for d in bundle["sets"][n]]
            lm = fresh_model(home, str(model_dir), device)
            t = time.perf_counter()
            lora.make_data(lm, [d.statement for d in data], [d.item_id for d in data], cfg)
            synth_s = time.perf_counter() - t
            _sync(device)
            t = time.perf_counter()
            trained = lora.train(lm, data, replay, cfg, cache=cache)
            _sync(device)
            train_s = time.perf_counter() - t
            m = trained.metrics
            result["lora"][n] = {"facts": int(n), "synthesis_s": synth_s, "train_s": train_s,
                                 "total_s": synth_s + train_s, "examples": m["examples"], "steps": m["steps"],
                                 "evaluations": len(m["history"]), "stopped": m["stopped"],
                                 "precision": m["precision"], "history": m["history"]}
            say(f"{n} facts: synthesis {synth_s:.1f} s, training {train_s:.1f} s ({m['steps']} steps, "
                f"{len(m['history'])} evaluations, {m['precision']})")
            _save(result, out_dir, name)
            del lm
        base = load_model(home, str(model_dir), device)
        assert trained is not None
        weights, peft_config = lora.pack(trained, base.fingerprint, {"bench": True})
        result["lora"]["switch"] = _switch_times(base, weights, peft_config, trained)
        result["lora"]["adapter_bytes"] = len(weights) + len(peft_config)
        sw = result["lora"]["switch"]
        say(f"adapter: switch {1000 * sw['switch_s']:.2f} ms, cold load {1000 * sw['cold_load_s']:.1f} ms "
            f"(the model's first: {1000 * (sw['first_load_s'] or 0):.0f} ms)")

        facts = generate(kv_facts, seed)
        warm = facts[:16]
        base.encode([f.statement for f in warm], list(range(len(warm))), scores=True, batch_size=16)  # warm-up
        _sync(device)
        t = time.perf_counter()
        base.encode([f.statement for f in facts], list(range(kv_facts)), scores=True, batch_size=16)
        _sync(device)
        result["kv"]["encode_items_per_s"] = kv_facts / (time.perf_counter() - t)
        result["kv"]["ttft"] = {}
        for n_tokens in ttft_tokens:
            r = _ttft(base, n_tokens, seed, codec_for("int4"))
            result["kv"]["ttft"][str(n_tokens)] = r
            say(f"TTFT {n_tokens:>5} memory tokens: recompute {1000 * r['recompute_s']:.1f} ms, "
                f"KV {1000 * r['kv_s']:.1f} ms")
        _save(result, out_dir, name)
    return result


def _random_model(config_dir: Path, out: Path) -> Path:
    """The architecture of ``config_dir``'s model with random weights (a fixed seed), saved with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(str(config_dir))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(out))
    for name in MODEL_FILES:
        if name != "config.json" and (config_dir / name).is_file():
            shutil.copyfile(config_dir / name, out / name)
    return out


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _save(result: dict[str, Any], out_dir: str | Path, name: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{name}.json", json.dumps(result, indent=2, default=str).encode())
