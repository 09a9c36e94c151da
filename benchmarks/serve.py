"""Serving per-user adapters: memplug's in-process loop (``hf``) against a vLLM server, in one run.

N users each have their own LoRA adapter, of the lora tier's shape (rank 8 on
gate/up/down by default; the weights are seeded random factors large enough
that every user's adapter changes the answer, which is what the correctness
check needs and what a trained adapter's cost is: the same tensors). Every
user sends R requests at once; the same requests are served

- by the ``hf`` backend (:class:`memplug.runtime.LocalModel`: one request at a
  time, adapters switched in slots), and
- by the ``vllm`` backend (:class:`memplug.runtime.vllm.VLLMModel` against a server
  started from vLLM's own environment: requests batched across users, each
  naming its adapter).

Reported per backend: generated tokens/s over the whole burst, time to first
token (p50/p95) from the burst's start and for one request alone, and for vLLM
the adapter hot-load time (``/v1/load_lora_adapter``). Correctness: every
vLLM answer must be token-identical to the ``hf`` answer with the same user's
adapter (greedy, fp32), and the ``hf`` answers of different users must differ
(so an answer from another user's adapter would show).

With ``--model-config`` the model is that architecture with random weights
(a fixed seed), for a device the real weights are not on: e.g. a 1B Llama on a
GPU. Writes ``serve.json`` (or ``serve-<tag>.json``) to ``benchmarks/results/``.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from benchmarks import console, fail_cleanly, machine

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
QUESTIONS = ["Where should I travel this summer?", "What is a good name for a cat?",
             "How do I keep basil alive?", "What should I cook tonight?"]


def make_adapters(model_config: dict[str, Any], n: int, folder: Path, rank: int = 8,
                  targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj"), scale: float = 1.0,
                  seed: int = 0) -> list[Path]:
    """``n`` PEFT adapter folders for a Llama-like model: seeded random A and B factors."""
    from safetensors.numpy import save_file

    hidden, inter = model_config["hidden_size"], model_config["intermediate_size"]
    shapes = {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    rng = np.random.default_rng(seed)
    out = []
    for u in range(n):
        path = folder / f"user{u}"
        path.mkdir(parents=True, exist_ok=True)
        state = {}
        for layer in range(model_config["num_hidden_layers"]):
            for t in targets:
                n_in, n_out = shapes[t]
                key = f"base_model.model.model.layers.{layer}.mlp.{t}"
                state[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
                state[f"{key}.lora_B.weight"] = (rng.standard_normal((n_out, rank)) * scale / np.sqrt(rank)
                                                 ).astype(np.float32)
        save_file(state, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
            "target_modules": list(targets), "bias": "none"}))
        out.append(path)
    return out


def adapter_ref(path: Path, version: int, fingerprint: str) -> Any:
    """An :class:`memplug.AdapterRef` for a PEFT folder (user ``bench<version>``)."""
    from safetensors.torch import load_file

    from memplug import AdapterRef, Scope

    def load() -> tuple[dict[str, Any], dict[str, Any]]:
        return load_file(str(path / "adapter_model.safetensors")), json.loads(
            (path / "adapter_config.json").read_text())
    return AdapterRef("lora", Scope(f"bench{version}"), version, fingerprint, (), str(path),
                      (path / "adapter_model.safetensors").stat().st_size, load)


class _Recall:
    """Just enough of a Recall for a backend's ``stream``: an adapter, no memories."""

    kv = None

    def __init__(self, adapter: Any):
        self.adapter = adapter

    def as_text(self, kv_as_text: bool = True, adapter_as_text: bool = True) -> str:
        return ""


def burst(model: Any, jobs: list[tuple[int, str, Any]], max_new_tokens: int) -> dict[str, Any]:
    """Send every job at once (one thread each); time to first token from the burst's start."""
    answers: dict[int, str] = {}
    ttft: dict[int, float] = {}
    tokens: dict[int, int] = {}
    errors: list[str] = []
    start = time.perf_counter()

    def one(i: int, question: str, ref: Any) -> None:
        try:
            text = ""
            for piece in model.stream(question, _Recall(ref), max_new_tokens=max_new_tokens):
                ttft.setdefault(i, time.perf_counter() - start)
                text += piece
            answers[i] = text
            tokens[i] = len(model_tokens(text))
        except Exception as e:  # noqa: BLE001 - reported, and the run fails on it
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=one, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, the first: {errors[0]}")
    firsts = sorted(ttft.values())
    return {"answers": answers, "seconds": round(wall, 2), "tokens": sum(tokens.values()),
            "tokens_per_s": round(sum(tokens.values()) / wall, 2),
            "ttft_ms": {"p50": round(1000 * float(np.percentile(firsts, 50)), 1),
                        "p95": round(1000 * float(np.percentile(firsts, 95)), 1)}}


_TOKENIZER: Any = None


def model_tokens(text: str) -> list[int]:
    return _TOKENIZER(text, add_special_tokens=False)["input_ids"] if text else []


def single_ttft(model: Any, ref: Any, repeats: int = 3) -> float:
    """Median ms to the first token of one request alone."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _piece in model.stream(QUESTIONS[0], _Recall(ref), max_new_tokens=2):
            times.append(1000 * (time.perf_counter() - start))
            break
    return round(float(np.median(times)), 1)


def random_model(config_path: Path, folder: Path, tokenizer_from: Path) -> Path:
    """The architecture in ``config_path`` with seeded random weights, saved with SmolLM2's tokenizer."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_path))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if torch.cuda.is_available()
                                             else torch.float32)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(str(folder))
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")) or f.name == "generation_config.json":
            shutil.copy2(f, folder / f.name)
    return folder


@click.command()
@click.option("--users", default="8", show_default=True, help="Users per run, comma-separated (8,64,256).")
@click.option("--requests", "per_user", type=int, default=2, show_default=True, help="Requests per user.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--model-config", type=click.Path(exists=True, path_type=Path), default=None,
              help="A config.json: serve that architecture with random weights instead of SmolLM2.")
@click.option("--hf-users-max", type=int, default=64, show_default=True,
              help="Runs with more users skip the hf loop (one request at a time takes too long).")
@click.option("--tag", default="", help="Results go to serve-<tag>.json.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
@fail_cleanly
def main(users: str, per_user: int, max_new_tokens: int, model_config: Path | None, hf_users_max: int, tag: str,
         out: Path) -> None:
    global _TOKENIZER
    from memplug import Memory, Settings
    from memplug.runtime.model import load_model
    from memplug.runtime.model_files import cache_dir
    from memplug.serving import vllm_model

    counts = [int(u) for u in users.split(",") if u.strip()]
    work = Path(tempfile.mkdtemp(prefix="memplug-bench-serve-"))
    home = Path(os.environ.get("MEMPLUG_HOME") or Path.home() / ".memplug")
    model_path = None
    if model_config is not None:
        load_model(home)  # the packaged model's tokenizer files
        model_path = str(random_model(model_config, work / "model", cache_dir(home, None)))
    options = {"backend": "vllm", "artifacts": str(work), "vllm_max_loras": min(max(counts), 32)}
    with Memory(home=home, settings=Settings(plugins="context,pgvector", model=model_path),
                options=options) as mem:
        result: dict[str, Any] = {"machine": machine(mem), "max_new_tokens": max_new_tokens,
                                  "requests_per_user": per_user, "model": model_path and str(model_config)
                                  or "SmolLM2-135M-Instruct", "runs": {}}
        hf = load_model(home, model_path)
        _TOKENIZER = hf.tokenizer
        config = json.loads(((Path(model_path) if model_path else cache_dir(home, None)) / "config.json")
                            .read_text())
        result["device"] = hf.device
        paths = make_adapters(config, max(counts), work / "adapters")
        refs = [adapter_ref(p, i + 1, hf.fingerprint) for i, p in enumerate(paths)]
        vllm = vllm_model(mem)
        started = time.perf_counter()
        vllm.base_model()
        result["vllm_start_s"] = round(time.perf_counter() - started, 1)
        hf.max_adapters = max(counts)
        for n in counts:
            jobs = [(u * per_user + r, QUESTIONS[(u + r) % len(QUESTIONS)], refs[u])
                    for u in range(n) for r in range(per_user)]
            run: dict[str, Any] = {"users": n, "requests": len(jobs)}
            load_ms = []
            for ref in refs[:n]:
                t = time.perf_counter()
                vllm.load_adapter(ref)
                load_ms.append(1000 * (time.perf_counter() - t))
            run["vllm_adapter_load_ms"] = {"p50": round(float(np.percentile(load_ms, 50)), 1),
                                           "p95": round(float(np.percentile(load_ms, 95)), 1)}
            burst(vllm, jobs[:min(4, len(jobs))], 4)  # warm-up: every adapter's first use
            run["vllm_single_ttft_ms"] = single_ttft(vllm, refs[0])
            v = burst(vllm, jobs, max_new_tokens)
            run["vllm"] = {k: v[k] for k in ("seconds", "tokens", "tokens_per_s", "ttft_ms")}
            console.print(f"{n} users: vllm {v['tokens_per_s']} tokens/s, TTFT p95 {v['ttft_ms']['p95']} ms "
                          f"(alone {run['vllm_single_ttft_ms']} ms), adapter load p50 "
                          f"{run['vllm_adapter_load_ms']['p50']} ms")
            if n <= hf_users_max:
                for ref in refs[:n]:
                    hf.load_adapter(ref)
                run["hf_single_ttft_ms"] = single_ttft(hf, refs[0])
                h = burst(hf, jobs, max_new_tokens)
                run["hf"] = {k: h[k] for k in ("seconds", "tokens", "tokens_per_s", "ttft_ms")}
                same = sum(v["answers"][i] == h["answers"][i] for i in h["answers"])
                per_user_hf = {u: h["answers"][u * per_user] for u in range(n)}
                run["correct"] = {"vllm_equal_to_hf": same, "of": len(jobs),
                                  "distinct_users_hf": len(set(per_user_hf.values())), "users": n}
                run["speedup"] = round(v["tokens_per_s"] / h["tokens_per_s"], 2)
                console.print(f"  hf {h['tokens_per_s']} tokens/s, TTFT p95 {h['ttft_ms']['p95']} ms; vLLM answers "
                              f"equal to hf: {same}/{len(jobs)}; distinct users: "
                              f"{run['correct']['distinct_users_hf']}/{n}")
            for ref in refs[:n]:
                vllm.drop_adapter(ref.name)
            result["runs"][str(n)] = run
        if vllm.server is not None:
            vllm.server.stop()
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"serve-{tag}.json" if tag else "serve.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
