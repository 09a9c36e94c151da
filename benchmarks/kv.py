"""Explicit-memory benchmark: accuracy, size and time to first token of KV memory against text.

For every method (no memory, text in the prompt, KV in fp16, int8, int4, and
int4 after token selection) the local model answers a direct and a paraphrased
question about each fact, with the fact alone or composed with 7 or 31 others;
an answer is right when it contains the expected string. Sizes are measured on
the serialized blobs. Time to first token compares injecting stored KV
(reading the blobs, de-quantizing, re-rotating) with recomputing the same
memory as prompt text, at 256, 1k and 4k memory tokens.
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
    """``int4``, ``int3-g64``, ``int4-keep50``...: codec name, then optional group and kept percentage."""
    from memplug_kv.codec import Codec

    name, *options = method.split("-")
    group, keep = 32, 1.0
    for option in options:
        if option.startswith("g") and option[1:].isdigit():
            group = int(option[1:])
        elif option.startswith("keep") and option[4:].isdigit():
            keep = int(option[4:]) / 100
        else:
            raise ValueError(f"unknown method option {option!r} in {method!r}")
    return Codec(name, group, keep)


def run(n_facts: int = 200, seed: int = 7, compositions=(1, 8, 32), methods=METHODS,
        ttft_tokens=(256, 1024, 4096), out_dir: str | Path = "benchmarks/results", home: Path | None = None,
        console: Any = None, ttft_method: str = "int4") -> dict[str, Any]:
    import torch

    from memplug.runtime import load_model
    from memplug.settings import Settings
    from memplug_kv.encode import encode

    say = console.print if console is not None else print
    settings = Settings()
    lm = load_model(home or settings.home, settings.model)
    torch.set_num_threads(torch.get_num_threads())
    facts = generate(n_facts, seed)
    t0 = time.perf_counter()
    raw = encode(lm, [f.statement for f in facts], list(range(n_facts)), scores=True, batch_size=16)
    encode_s = time.perf_counter() - t0
    say(f"encoded {n_facts} facts in {encode_s:.1f} s")

    result: dict[str, Any] = {
        "machine": _machine(), "model": lm.name, "fingerprint": lm.fingerprint, "facts": n_facts, "seed": seed,
        "encode_items_per_s": n_facts / encode_s, "sizes": {}, "accuracy": {}, "ttft": {},
    }
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
            "vs_utf8_text": size / text_bytes, "stored_tokens_fraction": sum(c.stored_tokens for c in chunks) / span,
        }
    result["sizes"]["text"] = {"bytes_per_token": text_bytes / span, "vs_fp16_kv": text_bytes / span / fp16_per_token,
                               "vs_utf8_text": 1.0}
    result["fp16_kv_bytes_per_token_unserialized"] = fp16_per_token

    for c in compositions:
        for method in methods:
            t = time.perf_counter()
            acc = _accuracy(lm, facts, decoded.get(method), method, c)
            result["accuracy"].setdefault(method, {})[str(c)] = acc
            say(f"{method:>12} x{c:<2}  direct {acc['direct']:.3f}  paraphrase {acc['paraphrase']:.3f}  "
                f"({time.perf_counter() - t:.0f} s)")
            _save(result, out_dir)

    codec = codec_for(ttft_method)
    for n_tokens in ttft_tokens:
        result["ttft"][str(n_tokens)] = _ttft(lm, n_tokens, seed, codec)
        r = result["ttft"][str(n_tokens)]
        say(f"TTFT {n_tokens:>5} memory tokens: recompute {r['recompute_s']:.3f} s, "
            f"KV {r['kv_s']:.3f} s, ratio {r['ratio']:.3f}")
        _save(result, out_dir)
    _plot(result, out_dir)
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
        outputs = _answers(lm, per_row, rows, expected, with_preamble=method != "none")
        for (kind, answer), text in zip(expected, outputs, strict=True):
            right[kind] += answer in text.lower()
            correct[kind].append(answer in text.lower())
        asked += len(rows) // 2
    return {k: v / asked for k, v in right.items()} | {"questions": asked} | ({"correct": correct} if detail else {})


def _answers(lm, per_row, rows, expected, with_preamble=True, max_new_tokens=24) -> list[str]:
    replies = lm.replies(rows, max_new_tokens, batch_size=len(rows), with_preamble=with_preamble,
                         per_row_chunks=per_row,
                         stop=lambda i, text: expected[i][1] in text.lower() or "\n" in text)
    return [text for text, _ in replies]


def _ttft(lm, n_tokens: int, seed: int, codec, repeats: int = 3) -> dict[str, float]:
    import torch

    from memplug.artifacts import ArtifactStore
    from memplug_kv.codec import decode
    from memplug_kv.codec import encode as pack_blob
    from memplug_kv.encode import encode, thin

    facts, total = [], 0
    for f in generate(n_tokens // 6 + 50, seed + 1):
        n = len(lm.chunk_ids(f.statement))
        if total + n > n_tokens:
            break
        facts.append(f)
        total += n
    chunks = encode(lm, [f.statement for f in facts], list(range(len(facts))), scores=codec.keep < 1, batch_size=16)
    layout = {"layers": lm.layers, "kv_heads": lm.kv_heads, "head_dim": lm.head_dim}
    closing = _closing_of_length(lm, QUERY_TOKENS)
    memory_text = "".join(lm.chunk_text(f.statement) for f in facts)
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(tmp)
        keys = [f"kv/{i}.safetensors" for i in range(len(chunks))]
        for key, chunk in zip(keys, chunks, strict=True):
            store.put(key, pack_blob(thin(chunk, codec.keep), codec, lm.fingerprint, layout))

        def inject():
            loaded = [decode(store.get(k), fingerprint=lm.fingerprint, layout=layout, where=k) for k in keys]
            next(iter(lm.decode(loaded, [closing], max_new_tokens=1)))

        def recompute():
            ids = lm.preamble()[0] + lm.ids(memory_text) + closing
            with torch.inference_mode():
                int(lm.model(torch.tensor([ids], device=lm.device)).logits[0, -1].argmax())  # waits for a GPU

        kv_s = _median_time(inject, repeats)
        recompute_s = _median_time(recompute, repeats)
    return {"memory_tokens": total, "items": len(facts), "query_tokens": len(closing), "codec": codec.label,
            "kv_s": kv_s, "recompute_s": recompute_s, "ratio": kv_s / recompute_s}


def _closing_of_length(lm, n: int) -> list[int]:
    """Closing tokens (template and a question) of about ``n`` tokens: the query side of a TTFT run."""
    words = LONG_QUESTION.split()
    for k in range(1, len(words) + 1):
        ids = lm.ids(lm.layout(" ".join(words[:k]))[1])
        if len(ids) >= n:
            return ids
    return ids


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first calls pay for allocations
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _machine() -> dict[str, Any]:
    import os

    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def _save(result: dict[str, Any], out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv.json").write_text(json.dumps(result, indent=2))


def _plot(result: dict[str, Any], out_dir: str | Path) -> None:
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
    fig.savefig(Path(out_dir) / "kv.png", dpi=120)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--facts", "n_facts", default=200, show_default=True, help="facts in the set (each asked two ways)")
@click.option("--compose", default="1,8,32", show_default=True, help="items composed per prompt, per run")
@click.option("--methods", default=",".join(["none", "text", "fp16", "int8", "int4", "int4-keep50", "int4-keep25"]),
              show_default=True, help="memory methods to compare")
@click.option("--ttft", default="256,1024,4096", show_default=True, help="memory sizes (tokens) for time to first token")
@click.option("--ttft-method", default="int4", show_default=True, help="codec of the KV side of the TTFT runs")
@click.option("--seed", default=7, show_default=True)
@click.option("--out", default="benchmarks/results", show_default=True)
@fail_cleanly
def main(n_facts: int, compose: str, methods: str, ttft: str, ttft_method: str, seed: int, out: str) -> None:
    """Accuracy, bytes per token and time to first token of explicit (KV) memory against text."""
    run(n_facts=n_facts, seed=seed, compositions=[int(c) for c in compose.split(",") if c],
        methods=[m for m in methods.split(",") if m], ttft_tokens=[int(t) for t in ttft.split(",") if t],
        out_dir=out, console=console, ttft_method=ttft_method)


if __name__ == "__main__":
    main()
