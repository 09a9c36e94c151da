"""Speed of the kv and lora tiers on any device, with the local model's architecture and random weights.

The quality benchmarks (``python -m benchmarks.kv`` and ``python -m benchmarks.lora``) need
the real model's weights. This one times the same work where they cannot be
taken (a GPU machine with no access to the model's package), since speed does
not depend on what the weights hold. It runs in two steps:

1. ``prepare`` (where the real model is): writes the model's config and
   tokenizer, the training sets the lora benchmark synthesizes for 20, 50 and
   100 facts (the same facts and generator; the model-written questions can
   differ by a few between runs), and the replay set, to a folder of a few
   megabytes.
2. ``run`` (on the device): builds the architecture from that config with
   random weights, loads it through memplug's own loader, and times
   - kv, on a model that has held no adapter: encoding facts to key/values,
     and time to first token with int4 KV memory injected against the same
     memory recomputed as prompt text;
   - per size: synthesis (the model writing questions and paraphrases; random
     weights never end a line early, so this is an upper bound) and training
     on the prepared set, as the tier trains;
   - the adapter's cold load and resident switch on a serving model.
   On a GPU every timing waits for the device's queued work before it stops.

Training on the prepared set takes about as many steps as the lora benchmark
for 50 and 100 facts (three epochs, measured once at the end). With 20 facts
the tier measures held-out recall after each epoch from the third and stops
when every item is recalled; random weights recall nothing, so the schedule
runs to its end.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from memplug.checks.facts import generate
from memplug.plugin import InvalidInput, write_atomic

from . import console, fail_cleanly

BUNDLE = "bundle.json"
BUNDLE_KEYS = ("model", "seed", "sets", "replay", "date")


def prepare(out_dir: str | Path, sizes=(20, 50, 100), seed: int = 7, home: Path | None = None,
            model: str | None = None, console: Any = None) -> Path:
    """Write the input of :func:`run` to ``out_dir``: model config and tokenizer, training sets, replay set.

    ``model`` is the ``model`` setting (default: this deployment's; None is the packaged SmolLM2).
    Nothing is written unless all of it was made.
    """
    from memplug.runtime import fresh_model
    from memplug.runtime import model_cache_dir as cache_dir
    from memplug.settings import Settings
    from memplug_lora import train as lora

    say = console.print if console is not None else print
    settings = Settings()
    home = Path(home or settings.home)
    model = model if model is not None else settings.model
    lm = fresh_model(home, model)
    cfg = lora.TrainConfig(seed=seed)
    sets = {}
    for n in sizes:
        facts = generate(n, seed)
        t = time.perf_counter()
        data = lora.make_data(lm, [f.statement for f in facts], list(range(n)), cfg)
        sets[str(n)] = [asdict(d) for d in data]
        say(f"{n} facts: {sum(len(d.train) for d in data)} training pairs ({time.perf_counter() - t:.0f} s)")
    replay = lora.replay_pairs(lm, cache_dir(home, model))
    bundle = {"model": lm.name, "fingerprint": lm.fingerprint, "seed": seed, "sets": sets, "replay": replay,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(out_dir)
    folder = out / "model"
    folder.mkdir(parents=True, exist_ok=True)
    # The architecture and tokenizer as loaded (whatever the model's source: a folder, a hub id, a GGUF file),
    # without any quantization of the source: the run builds fp32 random weights from it.
    lm.model.config.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    write_atomic(folder / "config.json", json.dumps(config, indent=2).encode())
    lm.model.generation_config.save_pretrained(str(folder))
    lm.tokenizer.save_pretrained(str(folder))
    write_atomic(out / BUNDLE, json.dumps(bundle).encode())
    say(f"wrote {out / BUNDLE} and the model's config and tokenizer")
    return out


def run(input_dir: str | Path, out_dir: str | Path = "benchmarks/results", sizes=None, device: str | None = None,
        ttft_tokens=(256, 1024, 4096), kv_facts: int = 200, name: str = "speed", console: Any = None) -> dict[str, Any]:
    """Time the lora and kv tiers on ``device`` (default: the GPU if there is one) with random weights.

    ``sizes``: the prepared sizes to train (default: all of them). Writes ``out_dir/name.json``.
    """
    import gc

    import torch

    from memplug.runtime import fresh_model
    from memplug.runtime import model_cache_dir as cache_dir
    from memplug_kv.encode import encode
    from memplug_lora import adapter
    from memplug_lora import train as lora
    from memplug_lora.synth import ItemData

    from .kv import _machine, _ttft, codec_for
    from .lora import _switch_times, _synchronizer

    say = console.print if console is not None else print
    if not re.fullmatch(r"[\w.-]+", name):
        raise InvalidInput(f"bench speed: name {name!r} must be a plain file name (letters, digits, '.', '-', '_')")
    source = Path(input_dir)
    try:
        bundle = json.loads((source / BUNDLE).read_text())
        lacking = [k for k in BUNDLE_KEYS if k not in bundle]
    except (OSError, ValueError, TypeError) as e:
        raise InvalidInput(f"bench speed: {source / BUNDLE} is missing or unreadable ({e}); "
                           f"write it with `python -m benchmarks.speed --prepare {source}` where the model is") from e
    if lacking:
        raise InvalidInput(f"bench speed: {source / BUNDLE} lacks {', '.join(lacking)}; "
                           f"write it again with `python -m benchmarks.speed --prepare {source}` where the model is")
    if not (source / "model" / "config.json").is_file():
        raise InvalidInput(f"bench speed: no model config in {source / 'model'}; "
                           f"write it with `python -m benchmarks.speed --prepare {source}` where the model is")
    chosen = [str(n) for n in (sizes or bundle["sets"])]
    missing = [n for n in chosen if n not in bundle["sets"]]
    if missing:
        raise InvalidInput(f"bench speed: no training set for {', '.join(missing)} facts in {source / BUNDLE} "
                           f"(it has {', '.join(bundle['sets'])})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sync = _synchronizer(device)
    seed = bundle["seed"]
    replay = [tuple(p) for p in bundle["replay"]]
    machine = _machine()
    if str(device).startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(torch.device(device))
    result: dict[str, Any] = {"machine": machine, "device": device, "model": bundle["model"],
                              "weights": "random (the model's architecture from its config)",
                              "input_date": bundle["date"], "seed": seed, "date": time.strftime("%Y-%m-%d %H:%M"),
                              "lora": {}, "kv": {}}

    def release() -> None:
        gc.collect()
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _random_model(source / "model", Path(tmp) / "model")
        home = Path(tmp) / "home"
        cache = cache_dir(home, str(model_dir))
        cache.mkdir(parents=True, exist_ok=True)

        # kv first, on a model that has never held an adapter (as `python -m benchmarks.kv` runs).
        lm = fresh_model(home, str(model_dir), device)
        facts = generate(kv_facts, seed)
        warm = facts[:16]
        encode(lm, [f.statement for f in warm], list(range(len(warm))), scores=True, batch_size=16)  # warm-up
        sync()
        t = time.perf_counter()
        encode(lm, [f.statement for f in facts], list(range(kv_facts)), scores=True, batch_size=16)
        sync()
        result["kv"]["encode_items_per_s"] = kv_facts / (time.perf_counter() - t)
        result["kv"]["ttft"] = {}
        for n_tokens in ttft_tokens:
            r = _ttft(lm, n_tokens, max(1, min(8, n_tokens // 32)), seed, codec_for("int4"), repair=4)
            result["kv"]["ttft"][str(n_tokens)] = r
            say(f"TTFT {n_tokens:>5} memory tokens in {r['items']} items: recompute {1000 * r['recompute_s']:.1f} ms, "
                f"KV cold {1000 * r['cold_s']:.1f} ms, hot {1000 * r['hot_s']:.1f} ms")
        say(f"KV encoding: {result['kv']['encode_items_per_s']:.0f} items/s")
        _save(result, out_dir, name)
        del lm
        release()

        # The first training in a process pays for kernel set-up and for the base model's replay
        # targets (kept in the cache after): timed apart, as a run of the tier after its first.
        lm = fresh_model(home, str(model_dir), device)
        first = [ItemData(**d) for d in bundle["sets"][chosen[0]]][:2]
        sync()
        t = time.perf_counter()
        lora.train(lm, first, replay, lora.TrainConfig(seed=seed, min_steps=4, epochs=1, eval_from=1), cache=cache)
        sync()
        result["lora"]["first_training_s"] = time.perf_counter() - t
        say(f"first training (set-up and replay targets): {result['lora']['first_training_s']:.1f} s on {device}")
        del lm
        release()
        cfg = lora.TrainConfig(seed=seed)
        trained = None
        for n in chosen:
            data = [ItemData(**d) for d in bundle["sets"][n]]
            lm = fresh_model(home, str(model_dir), device)
            sync()
            t = time.perf_counter()
            lora.make_data(lm, [d.statement for d in data], [d.item_id for d in data], cfg)
            sync()
            synth_s = time.perf_counter() - t
            t = time.perf_counter()
            trained = lora.train(lm, data, replay, cfg, cache=cache)
            sync()
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
            release()

        serving = fresh_model(home, str(model_dir), device)
        assert trained is not None
        weights, peft_config = adapter.pack(trained, serving.fingerprint, {"bench": True})
        result["lora"]["switch"] = _switch_times(serving, weights, peft_config, trained)
        result["lora"]["adapter_bytes"] = len(weights) + len(peft_config)
        sw = result["lora"]["switch"]
        say(f"adapter: switch {1000 * sw['switch_s']:.2f} ms, cold load {1000 * sw['cold_load_s']:.1f} ms "
            f"(the model's first: {1000 * (sw['first_load_s'] or 0):.0f} ms)")
        _save(result, out_dir, name)
        del serving, trained
        release()
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
    for path in config_dir.iterdir():  # the tokenizer's files and the generation config
        if path.is_file() and not (out / path.name).exists():
            shutil.copyfile(path, out / path.name)
    return out


def _save(result: dict[str, Any], out_dir: str | Path, name: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{name}.json", json.dumps(result, indent=2, default=str).encode())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--prepare", "prepare_dir", default=None, metavar="DIR",
              help="with the real model: write the input of a run to DIR, and stop")
@click.option("--input", "input_dir", default=None, metavar="DIR", help="run on the input written by --prepare")
@click.option("--facts", "sizes", default=None,
              help="facts per user, per run [--prepare: 20,50,100; --input: every prepared size]")
@click.option("--device", default=None, help="torch device, --input (default: cuda if there is one, else cpu)")
@click.option("--seed", default=7, show_default=True, help="the facts' seed, --prepare")
@click.option("--out", default="benchmarks/results", show_default=True, help="where --input writes NAME.json")
@click.option("--name", default="speed", show_default=True, help="the result's file name, --input")
@fail_cleanly
def main(prepare_dir: str | None, input_dir: str | None, sizes: str | None, device: str | None, seed: int,
         out: str, name: str) -> None:
    """Training, switch, KV-encoding and time-to-first-token speed with the model's architecture and random weights."""
    if (prepare_dir is None) == (input_dir is None):
        raise click.UsageError("give one of --prepare DIR (where the model is) or --input DIR (to run)")
    try:
        chosen = [int(n) for n in sizes.split(",") if n.strip()] if sizes else None
    except ValueError:
        raise click.UsageError(f"--facts takes numbers separated by commas, not {sizes!r}") from None
    if prepare_dir is not None:
        prepare(prepare_dir, sizes=chosen or (20, 50, 100), seed=seed, console=console)
    else:
        run(input_dir, out_dir=out, sizes=chosen, device=device, name=name, console=console)


if __name__ == "__main__":
    main()
