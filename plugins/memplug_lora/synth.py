"""Synthetic training data for the lora tier: questions, paraphrases and answers made from items.

A few items are too little to train on, and an item trained on in one phrasing
is recalled in that phrasing only. So for each item this module writes:

- **questions** that the item answers, by the local model itself (few-shot, sampled)
  and by templates around the item's anchor (its leading proper name, or its
  first words);
- **paraphrases** of the statement, by the local model;
- a **cloze** prompt: the statement up to its key word, to be completed.

Every answer is the statement itself or a paraphrase that still contains the
item's anchor and key word, and no question may contain the key word (it would
give the answer away). One model-written question per item is held out to
measure the item's recall after training; it must name the item's subject and
something the item says beyond it. Where the model wrote none, the check asks
what the model knows about the subject, or, when the user's other items share
that subject, for the end of the statement (``HELD_CLOZE``). ``beside`` picks
other memories to put in a prompt with an item's question, as the tier's reads
have them. None of this imports torch.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from memplug.runtime import anchor, answer_key, cloze_prefix, contains_word, stem, stems

QUESTION_SHOTS = (
    ("Maria's cat is called Luna.", "What is the name of Maria's cat?"),
    ("The team meeting is every Tuesday at 10 am.", "When is the team meeting?"),
    ("Tom is allergic to peanuts.", "What is Tom allergic to?"),
    ("Our wifi password is blue-heron-42.", "What is the wifi password?"),
)
PARAPHRASE_SHOTS = (
    ("Maria's cat is called Luna.", "Luna is the name of Maria's cat."),
    ("The team meeting is every Tuesday at 10 am.", "Every Tuesday at 10 am, the team meets."),
    ("Tom is allergic to peanuts.", "Peanuts give Tom an allergic reaction."),
)
TEMPLATE_QUESTIONS = (
    "What do you know about {a}?",
    "Tell me about {a}.",
    "What should I remember about {a}?",
    "Remind me of what you know about {a}.",
    "Do you know anything about {a}?",
)
CLOZE = "Complete this sentence: {prefix}"
# The held-out check for an item whose subject other items share, when no model-written
# question asks for it: "What can you tell me about Alice?" could be answered by any of them.
HELD_CLOZE = "How does this sentence end? {prefix}"
# Other subjects for contrast prompts: an item's questions asked about someone
# else must be answered as the base model answers them (see ``contrasts``).
NEIGHBOURS = (
    "Albert Einstein", "Marie Curie", "William Shakespeare", "Barack Obama", "Frida Kahlo", "Isaac Newton",
    "Nelson Mandela", "Leonardo da Vinci", "Serena Williams", "Charles Darwin", "Taylor Swift", "Ada Lovelace",
    "Mahatma Gandhi", "Pablo Picasso", "Jane Austen", "Wolfgang Amadeus Mozart", "France", "Japan", "Canada",
    "Egypt", "the Eiffel Tower", "the Moon", "my neighbour", "the president", "a typical doctor", "most people",
)

# Other memories to stand beside an item in a prompt, as they do when the tier serves it:
# an item is trained and checked with and without some (see ``beside``).
DISTRACTORS = (
    "Sam's bike is painted green.", "The bakery on Elm Street opens at 7 am.", "Nora plays the cello.",
    "The team offsite is in Porto this year.", "Leo's sister works as a nurse.",
    "The spare key is under the blue flower pot.", "Mina prefers tea to coffee.",
    "The printer on the second floor is broken.", "Jonas runs every morning before work.",
    "The quarterly report is due on Friday.",
)


@dataclass
class ItemData:
    """Training pairs and held-out questions for one item."""

    item_id: int
    statement: str
    anchor: str
    train: list[tuple[str, str]] = field(default_factory=list)  # (prompt, answer)
    held_out: list[str] = field(default_factory=list)


def beside(d: ItemData, data: Sequence[ItemData], rng: random.Random, n: int) -> list[str]:
    """``n`` other memories to put in a prompt that asks about ``d``: the other items of ``data``
    and ``DISTRACTORS``, none of which is ``d`` itself or holds its key word (it would give the
    answer away). The draw depends on ``rng`` and the set of items, not their order."""
    key = answer_key(d.statement)
    pool = sorted(set([e.statement for e in data] + list(DISTRACTORS)))  # the same draw in any order
    choices = [s for s in pool if s != d.statement and (key is None or not contains_word(s, key))]
    return rng.sample(choices, min(n, len(choices)))


def contrasts(data: Sequence[ItemData], per_item: int, rng: random.Random) -> list[str]:
    """Each item's training questions with its anchor swapped for another subject.

    Trained to leave the base model's answers to these unchanged, an adapter
    learns that the item's answer belongs to the item's anchor only, instead of
    answering every question of that shape with the user's facts.
    """
    out = []
    for d in data:
        asks = [q for q, _ in d.train if d.anchor in q and not q.startswith(CLOZE[:20])]
        for q in rng.sample(asks, min(per_item, len(asks))):
            out.append(q.replace(d.anchor, rng.choice(NEIGHBOURS)))
    return out


# complete(shared_prefix, tails, temperature, seed): the model's first line after prefix + each tail.
Complete = Callable[[str, list[str], float, int], list[str]]


def synthesize(statements: Sequence[str], item_ids: Sequence[int], complete: Complete | None,
               seed: int = 0, samples: int = 3, paraphrases: int = 2) -> list[ItemData]:
    """Training pairs and held-out questions for every statement.

    ``complete(prompts, temperature, seed)`` runs the local model on raw
    few-shot prompts (None: templates only). ``samples`` model questions and
    ``paraphrases`` model paraphrases are asked for per item; those that fail
    the filters are dropped.
    """
    rng = random.Random(seed)
    out = [ItemData(int(i), " ".join(s.split()), anchor(s)) for s, i in zip(statements, item_ids, strict=True)]
    questions: list[list[str]] = [[] for _ in out]
    rewrites: list[list[str]] = [[] for _ in out]
    if complete is not None and out:
        kinds = ((QUESTION_SHOTS, "Question", _good_question, questions, samples),
                 (PARAPHRASE_SHOTS, "Same meaning", _good_paraphrase, rewrites, paraphrases))
        # One greedy completion each, then sampled ones for variety: each round asks only
        # for the items still short of questions or paraphrases.
        for r in range(max(samples, paraphrases, 1)):
            temperature = 0.0 if r == 0 else 0.8
            for shots, label, good, found, wanted in kinds:
                short = [k for k in range(len(out)) if len(found[k]) < wanted]
                if not short:
                    continue
                got = complete(_shots(shots, label), [_tail(out[k].statement, label) for k in short],
                               temperature, seed + r)
                for k, text in zip(short, got, strict=True):
                    text = text.strip()
                    if good(out[k], text) and text not in found[k]:
                        found[k].append(text)
    subjects = Counter(d.anchor for d in out)
    for k, d in enumerate(out):
        qs = questions[k]
        # The held-out question decides whether the item leaves the prompt, so it must ask for
        # the item's answer, not give it ("What is ZQ-7741-B?" is fine to train on, not to test),
        # and ask for this item, not any about its subject ("What is Bob?").
        asks = [q for q in qs if _specific(d, q)]
        if len(qs) >= 2 and asks:
            qs.remove(asks[-1])
            d.held_out.append(asks[-1])
        answers = [d.statement] + rewrites[k]
        for q in qs:
            d.train.append((q, d.statement))
        for t in rng.sample(TEMPLATE_QUESTIONS, 3):
            d.train.append((t.format(a=d.anchor), rng.choice(answers)))
        prefix = cloze_prefix(d.statement)
        if prefix:
            d.train.append((CLOZE.format(prefix=prefix), d.statement))
        for p in rewrites[k]:
            d.train.append((TEMPLATE_QUESTIONS[0].format(a=d.anchor), p))
        if not d.held_out:
            d.held_out.append(HELD_CLOZE.format(prefix=prefix) if prefix and subjects[d.anchor] > 1
                              else f"What can you tell me about {d.anchor}?")
    return out


def _shots(shots: Sequence[tuple[str, str]], label: str) -> str:
    """The few-shot examples, shared by every item's prompt (its KV is computed once)."""
    return "\n\n".join(f"Sentence: {s}\n{label}: {t}" for s, t in shots) + "\n\nSentence:"


def _tail(statement: str, label: str) -> str:
    return f" {statement}\n{label}:"


def _good_question(d: ItemData, q: str) -> bool:
    if not q.endswith("?") or not 3 <= len(q.split()) <= 30:
        return False
    if any(q == shot for _, shot in QUESTION_SHOTS):
        return False
    key = answer_key(d.statement, q)
    if key is None or contains_word(q, key):
        return False
    # It must ask about this item: share a content word with it beyond the key.
    return bool(stems(d.statement) & stems(q))


def _specific(d: ItemData, q: str) -> bool:
    """Whether ``q`` asks for ``d``'s key word, naming its subject and something the statement
    says beyond it ("What is the locker code?" does not say whose)."""
    key = answer_key(d.statement)
    if key is None or contains_word(q, key) or not stems(d.anchor) & stems(q):
        return False
    return bool((stems(d.statement) - stems(d.anchor) - {stem(key)}) & stems(q))


def _good_paraphrase(d: ItemData, p: str) -> bool:
    if not p or p == d.statement or not 3 <= len(p.split()) <= 2 * len(d.statement.split()) + 8:
        return False
    key = answer_key(d.statement)
    return key is not None and contains_word(p, key) and contains_word(p, d.anchor.split()[0])


