"""Weights-tier benchmark: closed-book recall of per-user LoRA adapters, and what they cost the model.

For 20, 50 and 100 facts (the kv benchmark's generator) and each training
setting, an adapter is trained exactly as the lora tier trains one, then:

- **closed-book accuracy**: the adapted model answers the direct and the
  paraphrased question of every fact with no memory in the prompt, against
  the base model and against the fact as text in the prompt;
- **forgetting**: perplexity on held-out general text
  (``benchmarks/data/heldout_text.txt``), and accuracy on the general
  questions the base model answers correctly
  (``benchmarks/data/general_questions.json``), on those of them it answers
  surely (:func:`answer_margins`), and the net change over all of them
  (answers that tip either way), per topic; and the same for a random adapter
  as large as the trained one (:func:`random_adapter`), which holds nothing:
  what it loses is what a change of the weights that size costs by itself;
- **near misses**: general questions about the facts' values ("In which
  country is Lisbon?" beside "... lives in Lisbon",
  ``benchmarks/data/near_questions.json``), answered by the base model, by
  the adapter, and as served (the adapter only where the gate routes the
  question), with how many replies name one of the user's values;
- **as the tier serves it**: the items that pass the tier's own held-out check
  answered closed-book, the others with their text in the prompt;
- training time (synthesis included), adapter bytes, and the time to switch
  to the adapter when resident and to load it cold.

The paraphrased questions are never seen in training: the tier writes its own
questions from the statements.
"""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any

import click

from memplug.checks.facts import generate
from memplug.plugin import write_atomic

from . import console, fail_cleanly, setting
from .kv import _accuracy, _machine, _median_time

DATA = Path(__file__).resolve().parent / "data"

SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
}

GATE_RULE = "items without their values"  # what routed() compares a question with (runs merge only alike)
SURE_MARGIN = 1.0  # nats: general answers the base model gives this surely (see answer_margins)
MARGIN_BANDS = (0.1, 0.3, 0.6, 1.0, 2.0)  # nats: the bands' upper edges that by_margin counts answers in
_trained = 0  # trainings this process has run: each makes the next slower (see :func:`run`)


def general_questions() -> list[dict[str, Any]]:
    return json.loads((DATA / "general_questions.json").read_text())


def near_questions() -> list[dict[str, Any]]:
    """General questions about the facts' values ("In which country is Lisbon?" beside "... lives
    in Lisbon"): each names its value in ``near``. The gate's hardest cases: the topic of a memory,
    with none of its subject."""
    return json.loads((DATA / "near_questions.json").read_text())


def near(questions: list[dict[str, Any]], statements: list[str]) -> list[dict[str, Any]]:
    """The questions whose value some statement names (as a whole word, in any case)."""
    text = " ".join(statements)
    return [q for q in questions if re.search(rf"\b{re.escape(q['near'])}\b", text, re.IGNORECASE)]


def naming(questions: list[dict[str, Any]], replies: list[str], values: list[str]) -> list[bool]:
    """Whether each reply names one of ``values`` (a user's answers, as whole words) that its
    question does not: "Lisbon is in Portugal" repeats the question; "... in Tallinn" does not."""
    def named(text: str) -> set[str]:
        return {v.lower() for v in values if re.search(rf"\b{re.escape(v)}\b", text, re.IGNORECASE)}

    return [bool(named(r) - named(q["question"])) for q, r in zip(questions, replies, strict=True)]


def heldout_text() -> list[str]:
    text = (DATA / "heldout_text.txt").read_text()
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def perplexity(lm: Any, paragraphs: list[str], batch_size: int = 10) -> float:
    """Token-level perplexity of ``lm`` on raw paragraphs (no chat template)."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(paragraphs), batch_size):
            rows = [lm.ids(p) for p in paragraphs[start:start + batch_size]]
            n = max(len(r) for r in rows)
            ids = torch.full((len(rows), n), lm.pad_id, dtype=torch.long)
            mask = torch.zeros(len(rows), n, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).logits.float().cpu()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            keep = mask[:, 1:].bool()
            total -= float(logp[keep].sum())
            count += int(keep.sum())
    return math.exp(total / count)


def routed(gate: float, embedder: Any, statements: list[str], questions: list[str]) -> list[bool]:
    """Which questions the lora tier would apply the adapter to: those within cosine ``gate``
    of a trained statement with its value taken out (the tier's ``lora_gate`` rule)."""
    return [bool(x >= gate) for x in route_scores(embedder, statements, questions)]


def route_scores(embedder: Any, statements: list[str], questions: list[str]) -> list[float]:
    """Each question's score at the gate: its highest cosine similarity to a statement with its
    value taken out (:func:`memplug.runtime.without_value`)."""
    from memplug.runtime import without_value

    s = embedder.encode([without_value(x) for x in statements])
    q = embedder.encode(questions)
    return [float(x) for x in (q @ s.T).max(1)]


def general_replies(lm: Any, questions: list[dict[str, Any]], max_new_tokens: int = 20) -> list[str]:
    """``lm``'s greedy reply to each general question, up to an accepted answer or the first line."""
    from memplug_lora.train import ask

    rows = [lm.ids(ask(lm, q["question"])) for q in questions]
    replies = lm.replies(rows, max_new_tokens, with_preamble=False,
                         stop=lambda i, text: answered_so_far(questions[i], text) or "\n" in text.strip())
    return [text for text, _ in replies]


def answered_so_far(question: dict[str, Any], text: str) -> bool:
    """Whether a reply that may go on already gives an accepted answer: a number at its very end
    may still grow ("6" then "0" then "0"), so trailing digits do not count yet."""
    return answered(question, text.rstrip("0123456789"))


def answered(question: dict[str, Any], reply: str) -> bool:
    """Whether ``reply`` gives one of the question's accepted answers where a word starts ("lungs"
    and "Indian" give "lung" and "india"; "often" does not give "ten", nor "domesticated" "cat"),
    and, for a number, where it ends ("360" does not give "60")."""
    text = reply.lower()
    return any(re.search(p, text) for p in _answer_patterns(tuple(question["answers"])))


@functools.lru_cache(maxsize=4096)
def _answer_patterns(answers: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for answer in (a.strip().lower() for a in answers):
        if answer:  # an empty answer would be found in every reply
            out.append((r"(?<!\w)" if re.match(r"\w", answer) else "") + re.escape(answer)
                       + (r"(?!\d)" if answer[-1].isdigit() else ""))
    return tuple(out)


def general_answers(lm: Any, questions: list[dict[str, Any]], max_new_tokens: int = 20) -> list[bool]:
    """Whether ``lm`` answers each general question right (any accepted answer in its reply)."""
    return [answered(q, r) for q, r in zip(questions, general_replies(lm, questions, max_new_tokens), strict=True)]


def rounded_control(lm: Any, questions: list[dict[str, Any]], right: list[bool], sure: list[bool]) -> dict[str, Any]:
    """The base model's general answers with its weights rounded to bfloat16 (under bf16 autocast):
    a change that teaches it nothing, against which to read an adapter's drop. ``right`` says which
    questions it answers right as it is; ``sure``, which of those it answers surely."""
    from memplug_lora.train import _autocast, _bf16_weights

    with _bf16_weights(lm.model, lm.device, "bf16"), _autocast(lm.device, "bf16")():
        now = general_answers(lm, questions)
    kept = [ok for ok, was in zip(now, right, strict=True) if was]
    lost = len(kept) - sum(kept)
    return {"what": "the base model's weights in bf16", "lost": lost,
            "general_lost": [q["question"] for q, ok, was in zip(questions, now, right, strict=True) if was and not ok],
            "gained": sum(ok and not was for ok, was in zip(now, right, strict=True)),
            "drop_points": 100 * lost / max(1, len(kept)),
            "sure_lost": sum(s and not ok for s, ok in zip(sure, kept, strict=True))}


def answer_margins(lm: Any, questions: list[dict[str, Any]], replies: list[str]) -> list[float]:
    """How surely ``lm`` gives each reply: the smallest gap, over the reply's tokens up to the one
    that completes an accepted answer, between the log-probability of the reply's token and of
    the likeliest other (nats). For its own greedy reply, the gap between its first and second
    choice: near 0, the answer was a coin toss that any change of the weights can tip; below 0,
    a reply it would not give."""
    import torch

    from memplug_lora.train import ask

    out = []
    with torch.inference_mode():
        for q, reply in zip(questions, replies, strict=True):
            prompt, ids = lm.ids(ask(lm, q["question"])), lm.ids(reply)
            cut = next((k for k in range(1, len(ids) + 1) if answered_so_far(q, lm.tokenizer.decode(ids[:k]))
                        or k == len(ids) and answered(q, reply)), len(ids))
            if not cut:
                out.append(0.0)
                continue
            logits = lm.model(torch.tensor([prompt + ids[:cut]], device=lm.device)).logits[0]
            logp = torch.log_softmax(logits[len(prompt) - 1:len(prompt) + cut - 1].float(), -1)
            chosen = torch.tensor(ids[:cut], device=logp.device)
            own = logp.gather(-1, chosen[:, None]).squeeze(-1)
            rival = logp.scatter(-1, chosen[:, None], float("-inf")).max(-1).values
            out.append(float((own - rival).min()))
    return out


def by_margin(margins: dict[str, float], lost: list[str], bands: tuple[float, ...] = MARGIN_BANDS,
              ) -> list[dict[str, Any]]:
    """The answers the base model gets right, counted by how surely it gives them (``margins``,
    question → nats, :func:`answer_margins`), with how many of them ``lost`` (questions) holds:
    one row per band, below each of ``bands``'s edges (the first from 0, the last open-ended).
    Where a change of the weights tips answers, this shows whether it tips coin tosses or breaks
    what the model knows."""
    from memplug.errors import InvalidInput

    unknown = sorted(set(lost) - set(margins))
    if unknown:
        raise InvalidInput(f"by_margin: {len(unknown)} lost question(s) the base model did not get right, "
                           f"such as {unknown[0]!r}")
    if list(bands) != sorted(set(bands)) or not bands or bands[0] <= 0:
        raise InvalidInput(f"by_margin: band edges must be positive and rising, not {bands!r}")
    gone = set(lost)
    edges = [0.0, *bands, None]
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = [q for q, m in margins.items()
                  if (lo == 0.0 or m >= lo) and (hi is None or m < hi)]  # the first band takes any m below 0 too
        rows.append({"from": lo, "to": hi, "right": len(inside), "lost": sum(q in gone for q in inside)})
    return rows


def run(sizes=(20, 50, 100), settings: dict[str, dict[str, Any]] | None = None, seed: int = 7,
        out_dir: str | Path = "benchmarks/results", home: Path | None = None, console: Any = None,
        name: str = "lora", gate: float = 0.5, isolate: bool = False) -> dict[str, Any]:
    """Train and measure every (size, setting) pair; with ``isolate`` (as ``python -m benchmarks.lora``
    runs it), each pair in a child process of its own (:mod:`memplug.runtime.child`), which loads
    the models and measures the base model again (about half a minute each). A process that has
    trained before trains slower (10% by its second training here, about 50% by its fifth; glibc's
    heap, it seems), so pairs measured one after another in one process are not comparable in time."""
    global _trained
    from memplug.runtime import Embedder, fresh_model, load_model
    from memplug.runtime import model_cache_dir as cache_dir
    from memplug.settings import Settings
    from memplug_lora import adapter
    from memplug_lora import train as lora

    say = console.print if console is not None else print
    settings = settings or SETTINGS
    configs = _configs(settings, seed)  # a bad setting fails here, before anything is loaded
    pairs = [(n, label) for n in sizes for label in settings]
    if isolate and len(pairs) > 1:
        return _run_isolated(pairs, settings, seed, out_dir, home, name, gate)
    config = Settings()
    home = Path(home or config.home)
    base = load_model(home, config.model)
    paragraphs = heldout_text()
    questions = general_questions()
    t = time.perf_counter()
    base_replies = general_replies(base, questions)
    base_right = [answered(q, r) for q, r in zip(questions, base_replies, strict=True)]
    known = [q for q, ok in zip(questions, base_right, strict=True) if ok]
    unknown = [q for q, ok in zip(questions, base_right, strict=True) if not ok]
    margins = answer_margins(base, known, [r for r, ok in zip(base_replies, base_right, strict=True) if ok])
    sure = [m >= SURE_MARGIN for m in margins]
    base_ppl = perplexity(base, paragraphs)
    say(f"base model: perplexity {base_ppl:.2f}, answers {len(known)}/{len(questions)} general questions "
        f"({time.perf_counter() - t:.0f} s), {sum(sure)} of them by more than {SURE_MARGIN} nat")
    rounded = rounded_control(base, questions, base_right, sure)
    say(f"  the same model in bf16: {rounded['lost']} of the {len(known)} lost, {rounded['gained']} gained, "
        f"{rounded['sure_lost']} of the {sum(sure)} sure answers lost")
    nearby = near_questions()
    near_base = general_replies(base, nearby)
    replay = lora.replay_prompts()
    embedder = Embedder()
    margin_of = {q["question"]: m for q, m in zip(known, margins, strict=True)}
    measured = {"perplexity": base_ppl, "general_known": len(known), "general_total": len(questions),
                "general_margins": margin_of,
                "general_bf16": {**rounded, "by_margin": by_margin(margin_of, rounded["general_lost"])},
                "near_total": len(nearby),
                "near_known": [q["question"] for q, r in zip(nearby, near_base, strict=True) if answered(q, r)]}
    result: dict[str, Any] = {"machine": _machine(), "model": base.name, "fingerprint": base.fingerprint,
                              "seed": seed, "gate": gate, "gate_rule": GATE_RULE, "base": measured,
                              "runs": _earlier_runs(out_dir, name, base.fingerprint, seed, gate, measured)}
    for n in sizes:
        facts = generate(n, seed)
        none = _accuracy(base, facts, None, "none", 1, detail=True)
        statements = [f.statement for f in facts]
        # The gate's scores, the statements embedded once: the facts' questions, the general
        # questions, and another workload, the replay's instructions and questions (what training
        # holds to the base model; none is about a user).
        scores = route_scores(embedder, statements, [f.question for f in facts] + [f.paraphrase for f in facts]
                              + [q["question"] for q in questions] + replay)
        fact_scores, general_scores = scores[:2 * n], scores[2 * n:2 * n + len(questions)]
        replay_scores = scores[2 * n + len(questions):]
        gated = {"direct": [x >= gate for x in fact_scores[:n]], "paraphrase": [x >= gate for x in fact_scores[n:]]}
        every_gated = [x >= gate for x in general_scores]
        general_gated = [g for g, ok in zip(every_gated, base_right, strict=True) if ok]
        named = near(nearby, statements)
        close = [i for i, q in enumerate(nearby) if q in named]
        near_gated = routed(gate, embedder, statements, [nearby[i]["question"] for i in close]) if close else []
        text = _accuracy(base, facts, None, "text", 1, detail=True)
        say(f"{n} facts: base closed-book {none['direct']:.2f}/{none['paraphrase']:.2f}, "
            f"text in prompt {text['direct']:.2f}/{text['paraphrase']:.2f} (direct/paraphrased)")
        for label, cfg in configs.items():
            lm = fresh_model(home, config.model)
            t0 = time.perf_counter()
            data = lora.make_data(lm, [f.statement for f in facts], list(range(n)), cfg)
            synth_s = time.perf_counter() - t0
            cache = cache_dir(home, config.model)
            before, _trained = _trained, _trained + 1
            trained = lora.train(lm, data, lora.replay_pairs(lm, cache), cfg, cache=cache)
            train_s = time.perf_counter() - t0
            closed = _accuracy(lm, facts, None, "none", 1, detail=True)
            ppl = perplexity(lm, paragraphs)
            kept = general_answers(lm, known)
            still = sum(kept) / max(1, len(known))
            # The drop is taken on the questions the base model got right, so it counts every
            # borderline answer that tips the other way and none that tips back: the whole set shows both.
            lost, gained = len(known) - sum(kept), sum(general_answers(lm, unknown))
            sure_lost = sum(s_ and not ok for s_, ok in zip(sure, kept, strict=True))
            lost_questions = [q["question"] for q, ok in zip(known, kept, strict=True) if not ok]
            near_misses = _near_misses(lm, [nearby[i] for i in close], [near_base[i] for i in close], near_gated,
                                       [f.answer for f in facts])
            # As served: the adapter answers only the questions the gate routes to it.
            served = {k: sum(a if g else b for a, b, g in zip(closed["correct"][k], none["correct"][k], gated[k],
                                                             strict=True)) / n for k in gated}
            # As the tier serves a fact: by the adapter if it passed the tier's own held-out check
            # and the question is routed to it, else as text (the lower tiers keep it).
            held = set(trained.passed(cfg.min_recall))
            tiered = {k: sum(c if i in held and g else t for i, (c, t, g) in enumerate(
                zip(closed["correct"][k], text["correct"][k], gated[k], strict=True))) / n for k in gated}
            held_right = {k: sum(closed["correct"][k][i] for i in held) / len(held) if held else None
                          for k in gated}
            served_still = sum(ok or not g for ok, g in zip(kept, general_gated, strict=True)) / max(1, len(known))
            weights, peft_config = adapter.pack(trained, base.fingerprint, {"bench": True})
            switch = _switch_times(base, weights, peft_config, trained)
            control = _control(lm, known, unknown, sure, paragraphs, base_ppl, seed)
            run = {
                "facts": n, "setting": label, "config": trained.metrics["config"],
                "closed_book": {"direct": closed["direct"], "paraphrase": closed["paraphrase"]},
                "base_closed_book": {"direct": none["direct"], "paraphrase": none["paraphrase"]},
                "text_in_prompt": {"direct": text["direct"], "paraphrase": text["paraphrase"]},
                "paraphrase_vs_text": closed["paraphrase"] / text["paraphrase"] if text["paraphrase"] else None,
                "perplexity": ppl, "perplexity_change": ppl / base_ppl - 1,
                "general_accuracy_drop_points": 100 * (1 - still),
                "general_all": {"base_right": len(known), "lost": lost, "gained": gained, "total": len(questions),
                                "change_points": 100 * (gained - lost) / len(questions)},
                "general_lost": lost_questions,
                "general_by_topic": _by_topic(known, kept, control),
                # The questions the base model answers surely (margin, see answer_margins): a drop
                # here is not coin tosses tipping.
                "general_sure": {"margin": SURE_MARGIN, "base_right": sum(sure), "lost": sure_lost,
                                 "drop_points": 100 * sure_lost / max(1, sum(sure))},
                # The same measures for a random adapter as large as the trained one: what any change
                # of the weights this size costs, whatever it learned.
                "general_control": control,
                # Which answers tip: those the base model gives by a narrow margin, or sure ones too.
                "general_by_margin": {"adapter": by_margin(margin_of, lost_questions),
                                      "random": by_margin(margin_of, control["general_lost"])},
                "near_misses": near_misses,
                "routed": {"closed_book": served,
                           # The gate's margins: the lowest fact question's score, the highest general ones'.
                           "fact_question_min_score": min(fact_scores),
                           "general_top_scores": sorted(zip(general_scores, (q["question"] for q in questions), strict=True),
                                                        reverse=True)[:3],
                           "paraphrase_vs_text": served["paraphrase"] / text["paraphrase"] if text["paraphrase"] else None,
                           "fact_questions_routed": {k: sum(v) / n for k, v in gated.items()},
                           "general_questions_routed": sum(general_gated) / max(1, len(known)),
                           "all_general_questions_routed": [q["question"] for q, g in zip(questions, every_gated,
                                                                                          strict=True) if g],
                           "general_accuracy_drop_points": 100 * (1 - served_still),
                           "replay_prompts_routed": sum(x >= gate for x in replay_scores),
                           "replay_prompts": len(replay),
                           "replay_top_scores": sorted(zip(replay_scores, replay, strict=True), reverse=True)[:3]},
                "self_measured_recall": trained.metrics["held_out_recall"],
                "items_passed": len(held), "held_items_right": held_right, "tiered": tiered,
                "synthesis_s": synth_s, "train_s": train_s, "examples": trained.metrics["examples"],
                "steps": trained.metrics["steps"], "stopped": trained.metrics["stopped"],
                "date": time.strftime("%Y-%m-%d %H:%M"), "trainings_before_in_process": before,
                "adapter_bytes": len(weights) + len(peft_config), **switch,
            }
            result["runs"][f"{n}/{label}"] = run
            say(f"  {label:>12}: closed-book {closed['direct']:.2f}/{closed['paraphrase']:.2f} "
                f"({run['paraphrase_vs_text']:.2f} of text), perplexity {ppl:.2f} "
                f"({100 * run['perplexity_change']:+.1f}%), general -{run['general_accuracy_drop_points']:.1f} pts, "
                f"{train_s:.0f} s, {run['adapter_bytes'] / 1e6:.2f} MB, switch {1000 * switch['switch_s']:.2f} ms, "
                f"cold {1000 * switch['cold_load_s']:.0f} ms")
            say(f"  {'':>12}  all {len(questions)} general questions: {lost} of the {len(known)} "
                f"the base model got right now wrong, {gained} of the other {len(unknown)} now right "
                f"({run['general_all']['change_points']:+.1f} pts); of the {sum(sure)} it answers surely, "
                f"{sure_lost} now wrong")
            say(f"  {'':>12}  a random adapter of the same size: perplexity {100 * control['perplexity_change']:+.1f}%, "
                f"{control['lost']} of the {len(known)} lost, {control['gained']} gained, {control['sure_lost']} of "
                f"the {sum(sure)} sure answers lost")
            say(f"  {'':>12}  lost by the base model's margin (nats), trained / random: " + ", ".join(
                f"{_band(a)} {a['lost']}/{b['lost']} of {a['right']}"
                for a, b in zip(run["general_by_margin"]["adapter"], run["general_by_margin"]["random"], strict=True)))
            say(f"  {'':>12}  routed (gate {gate}): closed-book {served['direct']:.2f}/{served['paraphrase']:.2f}, "
                f"general -{run['routed']['general_accuracy_drop_points']:.1f} pts, "
                f"{sum(general_gated)}/{len(known)} general questions routed to the adapter "
                f"({sum(every_gated)}/{len(questions)} of all; {run['routed']['replay_prompts_routed']}/{len(replay)} "
                f"replay prompts)")
            say(f"  {'':>12}  {near_misses['questions']} general questions about the facts' values: "
                f"{near_misses['routed']} routed, right {near_misses['base_right']} by the base model, "
                f"{near_misses['adapter_right']} with the adapter, {near_misses['served_right']} as served; replies "
                f"naming a user's value {near_misses['base_naming']} / {near_misses['adapter_naming']} / "
                f"{near_misses['served_naming']}")
            say(f"  {'':>12}  {len(held)}/{n} items passed the tier's check; of those, closed-book "
                f"{_share(held_right['direct'])}/{_share(held_right['paraphrase'])}; with the rest as text: "
                f"{tiered['direct']:.2f}/{tiered['paraphrase']:.2f}")
            _save(result, out_dir, name)
            del lm
    _plot(result, out_dir, name)
    return result


def _configs(settings: dict[str, dict[str, Any]], seed: int) -> dict[str, Any]:
    """Each setting's ``TrainConfig``; an unknown option or a bad value is an ``InvalidInput``."""
    from dataclasses import fields

    from memplug.errors import InvalidInput
    from memplug_lora import train as lora

    known = {f.name for f in fields(lora.TrainConfig)} - {"seed"}
    configs = {}
    for label, overrides in settings.items():
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InvalidInput(f"setting {label!r}: unknown LoRA training option(s) {', '.join(unknown)} "
                               f"(known: {', '.join(sorted(known))})")
        configs[label] = lora.TrainConfig(**{**overrides, "seed": seed})
    return configs


def _run_isolated(pairs: list[tuple[int, str]], settings: dict[str, dict[str, Any]], seed: int,
                  out_dir: str | Path, home: Path | None, name: str, gate: float) -> dict[str, Any]:
    """:func:`run` for one pair at a time, each in a fresh process; their runs merge in ``name``.json."""
    from memplug.errors import MemplugError
    from memplug.runtime import child

    for n, label in pairs:
        try:
            child.call("benchmarks.lora:run", {
                "sizes": (n,), "settings": {label: settings[label]}, "seed": seed, "out_dir": str(out_dir),
                "home": home, "name": name, "gate": gate}, what=f"bench lora ({n} facts, {label})")
        except Exception as e:
            raise MemplugError(f"bench lora: the run for {n} facts, setting {label!r}, failed: "
                               f"{type(e).__name__}: {e}; the runs before it are kept in {name}.json") from e
    result = json.loads((Path(out_dir) / f"{name}.json").read_text())
    _plot(result, out_dir, name)
    return result


def random_adapter(model: Any, seed: int) -> float:
    """Replace each LoRA update ``B @ A`` in ``model`` by a random one of the same Frobenius norm;
    returns the norm of all the updates together (the root of their squared norms' sum).

    The result changes the weights as much as the trained adapter did, module by module,
    in directions that hold nothing: the forgetting it causes is what a change of that size
    costs by itself (answers the base model gives by a narrow margin tip either way).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for module in model.modules():
            if not hasattr(module, "lora_A") or not hasattr(module, "active_adapters"):
                continue
            for name in module.active_adapters:
                if name not in module.lora_A:
                    continue
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
                norm = (b.float() @ a.float()).norm()
                total += float(norm) ** 2
                a2 = torch.randn(a.shape, generator=generator)
                b2 = torch.randn(b.shape, generator=generator)
                k = (norm / (b2 @ a2).norm()).sqrt()
                a.copy_(a2 * k)
                b.copy_(b2 * k)
    return math.sqrt(total)


def _near_misses(lm: Any, questions: list[dict[str, Any]], base_replies: list[str], gated: list[bool],
                 values: list[str]) -> dict[str, Any]:
    """The general questions about the facts' values (:func:`near`), answered by the base model, by the
    adapter on every one of them, and as served (the adapter where the gate routes the question):
    how many are right, and how many replies name one of the user's values that the question does
    not, as if it were about the user."""
    replies = general_replies(lm, questions) if questions else []
    served = [a if g else b for a, b, g in zip(replies, base_replies, gated, strict=True)]

    def right(rs: list[str]) -> int:
        return sum(answered(q, r) for q, r in zip(questions, rs, strict=True))

    return {"questions": len(questions), "routed": sum(gated),
            "routed_questions": [q["question"] for q, g in zip(questions, gated, strict=True) if g],
            "base_right": right(base_replies), "adapter_right": right(replies), "served_right": right(served),
            "base_naming": sum(naming(questions, base_replies, values)),
            "adapter_naming": sum(naming(questions, replies, values)),
            "served_naming": sum(naming(questions, served, values)),
            "replies": [{"question": q["question"], "routed": g, "base": b, "adapter": a}
                        for q, g, b, a in zip(questions, gated, base_replies, replies, strict=True)],
            "lost": [q["question"] for q, a, b in zip(questions, replies, base_replies, strict=True)
                     if answered(q, b) and not answered(q, a)]}


def _control(lm: Any, known: list[dict[str, Any]], unknown: list[dict[str, Any]], sure: list[bool],
             paragraphs: list[str], base_ppl: float, seed: int) -> dict[str, Any]:
    """Forgetting measured for :func:`random_adapter` in place of ``lm``'s trained adapter
    (which it overwrites)."""
    norm = random_adapter(lm.model, seed)  # general replies run with no cached prefix: nothing stale to drop
    kept = general_answers(lm, known)
    lost = len(known) - sum(kept)
    sure_lost = sum(s and not ok for s, ok in zip(sure, kept, strict=True))
    return {"what": "a random adapter, each module's update as large (Frobenius norm) as the trained one's",
            "update_norm": norm,
            "perplexity_change": perplexity(lm, paragraphs) / base_ppl - 1,
            "lost": lost, "gained": sum(general_answers(lm, unknown)),
            "general_accuracy_drop_points": 100 * lost / max(1, len(known)),
            "sure_lost": sure_lost, "sure_drop_points": 100 * sure_lost / max(1, sum(sure)),
            "general_lost": [q["question"] for q, ok in zip(known, kept, strict=True) if not ok]}


def _by_topic(known: list[dict[str, Any]], kept: list[bool], control: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per topic of the general questions: how many the base model gets right, how many of those
    the adapter lost, and how many the random adapter of the same size lost."""
    control_lost = set(control["general_lost"])
    out: dict[str, dict[str, int]] = {}
    for q, ok in zip(known, kept, strict=True):
        row = out.setdefault(q["topic"], {"base_right": 0, "lost": 0, "control_lost": 0})
        row["base_right"] += 1
        row["lost"] += not ok
        row["control_lost"] += q["question"] in control_lost
    return dict(sorted(out.items()))


def _band(row: dict[str, Any]) -> str:
    """A :func:`by_margin` row's band as text: "<0.1", "0.1-0.3", ">=2"."""
    if row["to"] is None:
        return f">={row['from']:g}"
    return f"<{row['to']:g}" if row["from"] == 0 else f"{row['from']:g}-{row['to']:g}"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _switch_times(base: Any, weights: bytes, peft_config: bytes, trained: Any) -> dict[str, float]:
    """Cold load (into a free slot; and the model's first load, which injects the slot) and resident
    switch of the adapter on the serving model, and back to the base model."""
    from memplug.types import AdapterRef, Scope
    from memplug_lora import adapter

    def ref(version: int) -> AdapterRef:
        return AdapterRef("bench", Scope("bench"), version, base.fingerprint, (), "memory", len(weights),
                          lambda: adapter.unpack(weights, peft_config, base.fingerprint, "bench adapter"))

    a, b = ref(1_000_001), ref(1_000_002)
    # The model's first adapter of a shape makes PEFT inject modules (a slot); later ones, such as
    # one loaded after another was unloaded, are copied into a free slot.
    fresh = not base._slots
    sync = _synchronizer(base.device)
    sync()
    t = time.perf_counter()
    with base._lock:
        base._use_adapter(a)
    sync()
    first = time.perf_counter() - t
    cold = []
    for _ in range(3):
        base.drop_adapter(a.name)
        sync()
        t = time.perf_counter()
        with base._lock:
            base._use_adapter(a)
        sync()
        cold.append(time.perf_counter() - t)
    with base._lock:
        base._use_adapter(b)

    def switch() -> None:
        with base._lock:
            base._use_adapter(a)
            base._use_adapter(b)
        sync()

    switch_s = _median_time(switch, 20) / 2

    def off() -> None:
        with base._lock:
            base._use_adapter(None)
            base._use_adapter(a)
        sync()

    off_s = _median_time(off, 20) / 2
    base.drop_adapter(a.name)
    base.drop_adapter(b.name)
    return {"cold_load_s": statistics.median(cold), "switch_s": switch_s, "base_switch_s": off_s,
            "first_load_s": first if fresh else None}


def _synchronizer(device: Any) -> Any:
    """A call that waits for ``device``'s queued work (a GPU's), so a timing ends when the work does."""
    import torch

    if str(device).startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _earlier_runs(out_dir: str | Path, name: str, fingerprint: str, seed: int, gate: float,
                  base: dict[str, Any]) -> dict[str, Any]:
    """Runs of an earlier invocation on the same model, seed, gate and general questions (the same
    ones answered right by the base model): a run of other sizes adds to them."""
    try:
        earlier = json.loads((Path(out_dir) / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}
    same = (earlier.get("fingerprint"), earlier.get("seed"), earlier.get("gate"), earlier.get("gate_rule")) == \
        (fingerprint, seed, gate, GATE_RULE) and \
        sorted(earlier.get("base", {}).get("general_margins", {})) == sorted(base["general_margins"]) and \
        earlier.get("base", {}).get("general_total") == base["general_total"] and \
        earlier.get("base", {}).get("near_known") == base["near_known"]
    return dict(earlier.get("runs", {})) if same else {}


def _save(result: dict[str, Any], out_dir: str | Path, name: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Atomically: runs merge through this file, and a half-written one would lose them all.
    write_atomic(out / f"{name}.json", json.dumps(result, indent=2, default=str).encode())


def _plot(result: dict[str, Any], out_dir: str | Path, name: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), sharey=True)
    panels = ((axes[0], lambda r: 100 * r["perplexity_change"], "held-out perplexity change (%)", 10,
               "perplexity target (+10%)"),
              (axes[1], lambda r: -r["general_accuracy_drop_points"],
               "general questions the base model gets right, change (points)", -2,
               "general-question target (-2 points)"),
              (axes[2], lambda r: -r["general_sure"]["drop_points"],
               "... of them, those it answers surely, change (points)", -2, "general-question target (-2 points)"))
    for ax, x_of, label, target, target_label in panels:
        placed: list[tuple[float, float]] = []
        runs = {key: run for key, run in result["runs"].items() if "general_sure" in run}  # older runs lack it
        xs = [x_of(run) for run in runs.values()] + [target]
        width = 0.2 * (max(xs) - min(xs)) or 1.0  # about a label's length in data units
        for key, run in runs.items():
            x, y = x_of(run), run["closed_book"]["paraphrase"]
            ax.scatter(x, y, s=20 + run["facts"])
            # A label that would run into an earlier one at about the same height goes above it.
            near = sum(abs(x - px) < width and abs(y - py) < 0.015 for px, py in placed)
            ax.annotate(key, (x, y), fontsize=7, xytext=(3, 3 + 10 * near), textcoords="offset points")
            placed.append((x, y))
        ax.axvline(target, color="grey", ls=":", label=target_label)
        ax.set_xlabel(label, fontsize=9)
    # What a random adapter of the same size does to the same answers (see random_adapter).
    controls = [(run["general_control"], run["closed_book"]["paraphrase"]) for run in result["runs"].values()
                if "general_control" in run]
    for ax, field in ((axes[0], None), (axes[1], "general_accuracy_drop_points"), (axes[2], "sure_drop_points")):
        if controls:
            ax.scatter([100 * c["perplexity_change"] if field is None else -c[field] for c, _ in controls],
                       [y for _, y in controls], marker="x", color="grey", label="random adapter as large as the run's (at its height)")
        ax.legend(fontsize=8)
    rounded = result.get("base", {}).get("general_bf16")
    if rounded:  # the floor of the raw measure: the base model itself, its weights in bf16
        axes[1].axvline(-rounded["drop_points"], color="tab:red", ls="--", lw=1,
                        label=f"base model in bf16 ({-rounded['drop_points']:.1f})")
        axes[1].legend(fontsize=8)
    axes[0].set_ylabel("closed-book accuracy, paraphrased questions")
    fig.suptitle(f"LoRA memory on {result['model']}: recall vs forgetting")
    fig.tight_layout()
    fig.savefig(Path(out_dir) / f"{name}.png", dpi=120)
    plt.close(fig)
    _plot_margins(result, out_dir, name, plt)


def _plot_margins(result: dict[str, Any], out_dir: str | Path, name: str, plt: Any) -> None:
    """``NAME-margins.png``: the share of the base model's right answers each run lost, by how
    surely the base model gives them (:func:`by_margin`), beside the run's random adapter and the
    base model in bf16."""
    margins = result.get("base", {}).get("general_margins")
    runs = {key: run for key, run in result["runs"].items() if "general_lost" in run and "general_control" in run}
    if not margins or not runs:
        return
    fig, ax = plt.subplots(figsize=(9, 4.5))

    def share(rows: list[dict[str, Any]]) -> list[float]:
        return [100 * r["lost"] / r["right"] if r["right"] else float("nan") for r in rows]

    first: list[dict[str, Any]] = []
    for k, (key, run) in enumerate(runs.items()):
        trained = by_margin(margins, run["general_lost"])
        random = by_margin(margins, run["general_control"]["general_lost"])
        first = first or trained
        colour = f"C{k}"
        ax.plot(range(len(trained)), share(trained), marker="o", color=colour, label=f"{key}: trained adapter")
        ax.plot(range(len(random)), share(random), marker="x", ls="--", color=colour, alpha=0.7,
                label=f"{key}: random adapter as large")
    rounded = result["base"].get("general_bf16", {})
    if "general_lost" in rounded:
        ax.plot(range(len(first)), share(by_margin(margins, rounded["general_lost"])), marker="s", ls=":",
                color="black", label="base model in bf16")
    ax.axhline(2, color="grey", ls=":", label="general-question target (2 points)")
    ax.set_xticks(range(len(first)), [f"{_band(r)}\n({r['right']} answers)" for r in first], fontsize=8)
    ax.set_xlabel("the base model's margin on its right answer (nats: its first choice over its second)")
    ax.set_ylabel("of those answers, lost (%)")
    ax.set_title(f"LoRA memory on {result['model']}: which general answers an adapter tips", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / f"{name}-margins.png", dpi=120)
    plt.close(fig)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--facts", "sizes", default="20,50,100", show_default=True, help="facts per user, per run")
@click.option("--setting", "settings", multiple=True,
              help="a training setting to try, as name:key=value,key=value (repeatable; default: the defaults)")
@click.option("--seed", default=7, show_default=True)
@click.option("--gate", default=0.5, show_default=True, help="the lora tier's routing threshold (lora_gate)")
@click.option("--out", default="benchmarks/results", show_default=True)
@fail_cleanly
def main(sizes: str, settings: tuple[str, ...], seed: int, gate: float, out: str) -> None:
    """Closed-book recall, forgetting, training time and switch time of per-user LoRA adapters."""
    chosen = dict(setting(s) for s in settings) if settings else SETTINGS
    run(sizes=[int(n) for n in sizes.split(",") if n], settings=chosen, seed=seed, out_dir=out, console=console,
        gate=gate, isolate=True)


if __name__ == "__main__":
    main()
