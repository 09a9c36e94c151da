"""Explicit-memory benchmark: accuracy, size and time to first token of KV memory against text.

For every method (no memory, text in the prompt, KV in fp16, int8, int4, and
int4 after token selection; ``-rcN`` adds the composition repair, reading the
first N tokens of each item again in context) the local model answers a direct
and a paraphrased question about each fact, with the fact alone or composed
with 7 or 31 others; an answer is right when it contains the expected string.
Sizes are measured on the serialized packs.

Time to first token compares placing stored KV with recomputing the same
memory as prompt text, at 1k, 4k and 16k memory tokens split into 1, 8 and 32
items (sizes beyond the model's context are skipped). The KV side is timed
four ways: ``cold`` reads the scope's pack from the artifact store (one file,
one checksum), moves it to the device compressed and expands it there;
``hot`` starts from the pack already resident on the device (what the tier's
cache serves); ``repaired`` is ``hot`` with the composition repair;
``per_item`` is the layout packs replace, one blob per item de-quantized on
the host. With ``--model-config`` the model is that architecture with random
weights (bf16 on a GPU): timings only, since speed does not depend on what the
weights hold.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from memplug.checks.facts import Fact, generate

from . import console, fail_cleanly

QUERY_TOKENS = 32
LONG_QUESTION = ("Given everything listed above, which one of these people lives in Kyoto, what is that "
                 "person's job, which colour do they like, and which instrument do they play at home?")
METHODS = ["none", "text", "fp16", "int8", "int4", "int4-keep50", "int4-keep25"]


def codec_for(method: str):
    """``int4``, ``int3-g64``, ``int4-keep50``, ``int4-rc4``...: codec name, then optional group,
    kept percentage and repair (tokens read again per item; see :func:`recompute_of`)."""
    from memplug_kv.codec import Codec

    name, *options = method.split("-")
    group, keep = 32, 1.0
    for option in options:
        if option.startswith("g") and option[1:].isdigit():
            group = int(option[1:])
        elif option.startswith("keep") and option[4:].isdigit():
            keep = int(option[4:]) / 100
        elif not (option.startswith("rc") and option[2:].isdigit()):
            raise ValueError(f"unknown method option {option!r} in {method!r}")
    return Codec(name, group, keep)


def recompute_of(method: str) -> int:
    """The repair of a method: ``int4-rc4`` reads the first 4 tokens of each item again."""
    return next((int(o[2:]) for o in method.split("-")[1:] if o.startswith("rc") and o[2:].isdigit()), 0)


def run(n_facts: int = 200, seed: int = 7, compositions=(1, 8, 32), methods=METHODS,
        ttft_tokens=(1024, 4096, 16384), ttft_items=(1, 8, 32), out_dir: str | Path = "benchmarks/results",
        home: Path | None = None, console: Any = None, ttft_method: str = "int4", repair: int = 4,
        model: str | None = None, name: str = "kv") -> dict[str, Any]:
    """The benchmark; ``model`` (a folder) replaces the packaged model, ``name`` the result file's stem."""
    import torch

    from memplug.runtime import load_model
    from memplug.settings import Settings
    from memplug_kv.encode import encode

    say = console.print if console is not None else print
    settings = Settings()
    lm = load_model(home or settings.home, model or settings.model)
    result: dict[str, Any] = {
        "machine": _machine(lm), "model": lm.name, "fingerprint": lm.fingerprint, "facts": n_facts, "seed": seed,
        "sizes": {}, "accuracy": {}, "ttft": {},
    }
    facts = generate(n_facts, seed)
    if compositions and methods:
        t0 = time.perf_counter()
        raw = encode(lm, [f.statement for f in facts], list(range(n_facts)), scores=True, batch_size=16)
        encode_s = time.perf_counter() - t0
        result["encode_items_per_s"] = n_facts / encode_s
        say(f"encoded {n_facts} facts in {encode_s:.1f} s")
        fp16_per_token = lm.layers * 2 * lm.kv_heads * lm.head_dim * 2
        span = sum(c.span for c in raw)
        text_bytes = sum(len(lm.chunk_text(f.statement).encode()) for f in facts)
        decoded: dict[str, list] = {}
        for method in methods:
            if method in ("none", "text"):
                continue
            chunks, size = _round_trip(lm, raw, codec_for(method))
            decoded[method] = chunks
            result["sizes"][method] = {
                "bytes_per_token": size / span, "vs_fp16_kv": size / span / fp16_per_token,
                "vs_utf8_text": size / text_bytes,
                "stored_tokens_fraction": sum(c.stored_tokens for c in chunks) / span,
            }
        result["sizes"]["text"] = {"bytes_per_token": text_bytes / span,
                                   "vs_fp16_kv": text_bytes / span / fp16_per_token, "vs_utf8_text": 1.0}
        result["fp16_kv_bytes_per_token_unserialized"] = fp16_per_token
        for c in compositions:
            for method in methods:
                t = time.perf_counter()
                acc = _accuracy(lm, facts, decoded.get(method), method, c)
                result["accuracy"].setdefault(method, {})[str(c)] = acc
                say(f"{method:>12} x{c:<2}  direct {acc['direct']:.3f}  paraphrase {acc['paraphrase']:.3f}  "
                    f"({time.perf_counter() - t:.0f} s)")
                _save(result, out_dir, name)

    codec = codec_for(ttft_method)
    limit = int(getattr(lm.model.config, "max_position_embeddings", 0) or 0)
    for n_tokens in ttft_tokens:
        for n_items in ttft_items:
            key = f"{n_tokens}x{n_items}"
            if limit and n_tokens + 200 > limit:
                result["ttft"][key] = {"skipped": f"{n_tokens} memory tokens exceed the model's context ({limit})"}
                say(f"TTFT {key}: skipped, beyond the model's context of {limit} tokens")
                continue
            r = result["ttft"][key] = _ttft(lm, n_tokens, n_items, seed, codec, repair)
            say(f"TTFT {n_tokens:>5} tokens in {n_items:>2} item(s): recompute {r['recompute_s']:.3f} s; "
                f"KV cold {r['cold_s']:.3f} s ({r['ratio_cold']:.3f}), hot {r['hot_s']:.3f} s ({r['ratio_hot']:.3f}), "
                f"repaired {r['repaired_s']:.3f} s, per item {r['per_item_s']:.3f} s")
            _save(result, out_dir, name)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    _save(result, out_dir, name)
    if result["accuracy"]:
        _plot(result, out_dir, name)
    return result


def _round_trip(lm, raw, codec):
    from memplug_kv.codec import decode
    from memplug_kv.codec import encode as pack_blob
    from memplug_kv.encode import thin

    layout = {"layers": lm.layers, "kv_heads": lm.kv_heads, "head_dim": lm.head_dim}
    out, size = [], 0
    for chunk in raw:
        blob = pack_blob(thin(chunk, codec.keep), codec, lm.fingerprint, layout)
        size += len(blob)
        out.append(decode(blob, fingerprint=lm.fingerprint, layout=layout, where="bench"))
    return out, size


def _accuracy(lm, facts: list[Fact], chunks, method: str, per_group: int, detail: bool = False) -> dict[str, Any]:
    """Share of direct and paraphrased questions answered right (with ``detail``, also each
    question's outcome, in fact order, under ``"correct"``)."""
    usable = len(facts) // per_group * per_group
    right = {"direct": 0, "paraphrase": 0}
    correct: dict[str, list[bool]] = {"direct": [], "paraphrase": []}
    asked = 0
    # Several groups per batch: rows carry their own group's memory.
    batch_groups = max(1, 16 // per_group)
    groups = [list(range(g, g + per_group)) for g in range(0, usable, per_group)]
    for start in range(0, len(groups), batch_groups):
        batch = groups[start:start + batch_groups]
        rows, expected = [], []
        for group in batch:
            memory = "".join(lm.chunk_text(facts[i].statement) for i in group) if method == "text" else ""
            for i in group:
                for kind, q in (("direct", facts[i].question), ("paraphrase", facts[i].paraphrase)):
                    if method == "none":
                        closing = lm.layout(q, "", chunks=False)[1]
                    else:
                        closing = memory + lm.layout(q)[1]
                    rows.append(lm.ids(closing))
                    expected.append((kind, facts[i].answer.lower()))
        per_row = None
        if chunks is not None:
            per_group = [[chunks[i] for i in group] for group in batch]
            per_row = [g for g in per_group for _ in range(2 * len(g))]
        outputs = _answers(lm, per_row, rows, expected, with_preamble=method != "none",
                           recompute=recompute_of(method))
        for (kind, answer), text in zip(expected, outputs, strict=True):
            right[kind] += answer in text.lower()
            correct[kind].append(answer in text.lower())
        asked += len(rows) // 2
    return {k: v / asked for k, v in right.items()} | {"questions": asked} | ({"correct": correct} if detail else {})


def _answers(lm, per_row, rows, expected, with_preamble=True, max_new_tokens=24, recompute=0) -> list[str]:
    replies = lm.replies(rows, max_new_tokens, batch_size=len(rows), with_preamble=with_preamble,
                         per_row_chunks=per_row, recompute=recompute,
                         stop=lambda i, text: expected[i][1] in text.lower() or "\n" in text)
    return [text for text, _ in replies]


def _items_of(lm, n_tokens: int, n_items: int, seed: int) -> list[str]:
    """``n_items`` texts of about ``n_tokens / n_items`` tokens each (as chunks), made of generated facts."""
    per_item = n_tokens // n_items
    facts = iter(generate(n_tokens // 5 + 100, seed + 1))
    texts = []
    for _ in range(n_items):
        parts: list[str] = []
        while len(lm.chunk_ids(" ".join(parts))) < per_item:
            parts.append(next(facts).statement)
        while len(parts) > 1 and len(lm.chunk_ids(" ".join(parts))) > per_item:
            parts.pop()
        texts.append(" ".join(parts))
    return texts


def _ttft(lm, n_tokens: int, n_items: int, seed: int, codec, repair: int, repeats: int = 3) -> dict[str, Any]:
    import torch

    from memplug.artifacts import ArtifactStore
    from memplug_kv.codec import compress, decode, parse, serialize
    from memplug_kv.codec import encode as one_blob
    from memplug_kv.encode import encode, thin

    texts = _items_of(lm, n_tokens, n_items, seed)
    chunks = [thin(c, codec.keep) for c in
              encode(lm, texts, list(range(n_items)), scores=codec.keep < 1, batch_size=max(1, 16 // n_items))]
    total = sum(c.span for c in chunks)
    layout = {"layers": lm.layers, "kv_heads": lm.kv_heads, "head_dim": lm.head_dim}
    closing = _closing_of_length(lm, QUERY_TOKENS)
    ids = lm.preamble()[0] + lm.ids("".join(lm.chunk_text(t) for t in texts)) + closing
    fp = lm.fingerprint
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(tmp)
        store.put("pack.safetensors", serialize(compress(chunks, codec), fp, layout, codec.keep))
        keys = [f"item/{i}.safetensors" for i in range(n_items)]
        for key, chunk in zip(keys, chunks, strict=True):
            store.put(key, one_blob(chunk, codec, fp, layout))
        resident = parse(store.get("pack.safetensors"), fingerprint=fp, layout=layout, where="pack").to(lm.device)
        wanted = list(range(n_items))

        def first_token(memory, recompute=0):
            next(iter(lm.decode(memory, [closing], max_new_tokens=1, recompute=recompute)))  # waits for a GPU

        def cold():
            first_token(parse(store.get("pack.safetensors"), fingerprint=fp, layout=layout, where="pack"))

        def per_item():
            first_token([decode(store.get(k), fingerprint=fp, layout=layout, where=k) for k in keys])

        def recompute():
            with torch.inference_mode():
                int(lm.model(torch.tensor([ids], device=lm.device), logits_to_keep=1).logits[0, -1].argmax())

        out = {"memory_tokens": total, "items": n_items, "query_tokens": len(closing), "codec": codec.label,
               "repair_tokens": repair,
               "cold_s": _median_time(cold, repeats), "hot_s": _median_time(lambda: first_token(
                   resident.select(wanted)), repeats),
               "repaired_s": _median_time(lambda: first_token(resident.select(wanted), repair), repeats),
               "per_item_s": _median_time(per_item, repeats),
               "recompute_s": _median_time(recompute, repeats)}
    for side in ("cold", "hot", "repaired", "per_item"):
        out[f"ratio_{side}"] = out[f"{side}_s"] / out["recompute_s"]
    return out


def _closing_of_length(lm, n: int) -> list[int]:
    """Closing tokens (template and a question) of about ``n`` tokens: the query side of a TTFT run."""
    words = LONG_QUESTION.split()
    for k in range(1, len(words) + 1):
        ids = lm.ids(lm.layout(" ".join(words[:k]))[1])
        if len(ids) >= n:
            return ids
    return ids


def _median_time(fn, repeats: int) -> float:
    """Median seconds of ``fn`` after a warm-up call (each call ends by reading a result back,
    so on a GPU it waits for the device)."""
    fn()  # warm-up: first calls pay for allocations
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _machine(lm: Any = None) -> dict[str, Any]:
    import os

    import torch

    cpu, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": cpu,
            "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            **({"dtype": str(lm.dtype)} if lm is not None else {}),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and (
                lm is None or lm.device != "cpu") else "cpu"}


def _save(result: dict[str, Any], out_dir: str | Path, name: str = "kv") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))


def _plot(result: dict[str, Any], out_dir: str | Path, name: str = "kv") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind in zip(axes, ("direct", "paraphrase"), strict=True):
        for comp in sorted({c for m in result["accuracy"].values() for c in m}, key=int):
            xs, ys, labels = [], [], []
            for method, by_comp in result["accuracy"].items():
                if method == "none" or comp not in by_comp or method not in result["sizes"]:
                    continue
                xs.append(result["sizes"][method]["bytes_per_token"])
                ys.append(by_comp[comp][kind])
                labels.append(method)
            ax.scatter(xs, ys, label=f"{comp} item(s) composed")
            for x, y, label in zip(xs, ys, labels, strict=True):
                ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        none = result["accuracy"].get("none", {})
        if none:
            ax.axhline(max(v[kind] for v in none.values()), color="grey", ls=":", label="no memory")
        ax.set_xscale("log")
        ax.set_xlabel("stored bytes per memory token (log)")
        ax.set_title(f"{kind} questions")
    axes[0].set_ylabel("exact-match accuracy")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Explicit memory on {result['model']}: accuracy vs size")
    fig.tight_layout()
    fig.savefig(Path(out_dir) / f"{name}.png", dpi=120)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--facts", "n_facts", default=200, show_default=True, help="facts in the set (each asked two ways)")
@click.option("--compose", default="1,8,32", show_default=True, help="items composed per prompt, per run")
@click.option("--methods", default=",".join(METHODS), show_default=True,
              help="memory methods to compare (none, text, a codec such as int4, int4-keep50, int4-rc4)")
@click.option("--ttft", default="1024,4096,16384", show_default=True, help="memory sizes (tokens) for time to first token")
@click.option("--ttft-items", default="1,8,32", show_default=True, help="items the memory is split into, per run")
@click.option("--ttft-method", default="int4", show_default=True, help="codec of the KV side of the TTFT runs")
@click.option("--repair", default=4, show_default=True, help="tokens per item the repaired TTFT run reads again")
@click.option("--model-config", type=click.Path(exists=True, path_type=Path), default=None,
              help="a config.json: time that architecture with random weights (no accuracy runs)")
@click.option("--seed", default=7, show_default=True)
@click.option("--out", default="benchmarks/results", show_default=True)
@click.option("--name", default=None, help="result file stem (default: kv, or kv-<config> with --model-config)")
@fail_cleanly
def main(n_facts: int, compose: str, methods: str, ttft: str, ttft_items: str, ttft_method: str, repair: int,
         model_config: Path | None, seed: int, out: str, name: str | None) -> None:
    """Accuracy, bytes per token and time to first token of explicit (KV) memory against text."""
    from memplug.runtime import model_cache_dir
    from memplug.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        model = None
        compositions = [int(c) for c in compose.split(",") if c]
        if model_config is not None:
            from .serve import random_model

            model = str(random_model(model_config, Path(tmp) / "model", model_cache_dir(Settings().home, None)))
            compositions = []
        run(n_facts=n_facts, seed=seed, compositions=compositions, methods=[m for m in methods.split(",") if m],
            ttft_tokens=[int(t) for t in ttft.split(",") if t], ttft_items=[int(t) for t in ttft_items.split(",") if t],
            out_dir=out, console=console, ttft_method=ttft_method, repair=repair, model=model,
            name=name or ("kv" if model_config is None else f"kv-{model_config.stem}"))


if __name__ == "__main__":
    main()
