"""What a fact statement says, read without a model: its words, key word, subject and value.

These plain-text heuristics let a tier probe what a model recalls of a memory:
the word an answer must contain (:func:`answer_key`), what the statement is
about (:func:`anchor`), the statement with its value taken out
(:func:`without_value`) and its beginning up to the key word
(:func:`cloze_prefix`). None of this imports torch.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[A-Za-z0-9][\w'\u2019\-]*")
STOPWORDS = frozenset("""
a an the and or but if of in on at to for from by with about as into onto over under than then that this these
those there here is are was were be been being am has have had do does did done not no yes it its it's they
them their he him his she her we us our you your i me my mine who whom whose what which when where why how
can could will would shall should may might must also very just so such too up down out off one ones some any
all each every both either neither s t called named name lives live living works work working likes like
""".split())  # noqa: SIM905 - a word list reads best as text


def words(text: str) -> list[str]:
    """The words of ``text`` (letters and digits, with inner apostrophes and hyphens)."""
    return _WORD.findall(text)


def stem(word: str) -> str:
    """A crude stem for matching words across forms: lower case, no possessive, five letters."""
    return word.lower().replace("\u2019", "'").removesuffix("'s")[:5]


def stems(text: str) -> set[str]:
    """The stems of the content words of ``text``."""
    return {stem(w) for w in content_words(text)}


def content_words(text: str) -> list[str]:
    """The words of ``text`` that are not stopwords (numbers always count)."""
    return [w for w in words(text) if w.lower() not in STOPWORDS and len(w) > 1 or w.isdigit()]


def answer_key(statement: str, question: str = "") -> str | None:
    """The word an answer must contain: the statement's last content word that the question lacks.

    English puts new information at the end of a sentence, so the last content
    word not already in the question is the one an answer has to supply
    ("X lives in Kyoto" asked "Where does X live?" gives "Kyoto"). A closing
    phrase that only says how often ("X competes in fencing at weekends") is
    passed over: its words are the key only for a question that names
    everything before it ("When does X compete in fencing?").
    """
    asked = {stem(w) for w in words(question)}
    found = content_words(statement)
    habit = _habit_words(statement)
    for group in (found[:len(found) - habit], found[len(found) - habit:]):
        for word in reversed(group):
            if stem(word) not in asked:
                return word
    return None


_TIME = (r"(?:day|morning|afternoon|evening|night|week|weekend|weekday|month|year|summer|winter|spring|autumn"
         r"|(?:mon|tues|wednes|thurs|fri|satur|sun)day)")
# A closing phrase that says how often: "at weekends", "on Fridays", "in the evenings",
# "every morning", "each other week", "daily".
_HABIT = re.compile(rf"(?:\b(?:at|on|in|during|most)\s+(?:the\s+)?{_TIME}s|\b(?:every|each)\s+(?:other\s+)?{_TIME}"
                    rf"|\b(?:daily|weekly|monthly|yearly|nightly))\W*$", re.IGNORECASE)


def _habit_words(statement: str) -> int:
    """How many of the statement's last content words only say how often something happens.

    Only a phrase that follows an object counts: a content word after a stopword
    ("competes in fencing at weekends", "plays the cello on Sundays": 1). After a
    verb or a stopword the phrase is what the statement says ("The team meets
    every Monday", "The meeting is every Tuesday": 0).
    """
    m = _HABIT.search(statement)
    if m is None:
        return 0
    before = [w.lower() for w in words(statement[:m.start()])]
    if len(before) < 2 or before[-1] in STOPWORDS or before[-2] not in STOPWORDS:
        return 0
    return len(content_words(m.group(0)))


def without_value(statement: str) -> str:
    """The statement with its value taken out: every whole-word occurrence of its answer key
    ("Kara lives in." for "Kara lives in Kyoto.").

    A gate that routes queries to an adapter compares them with this. An adapter supplies a memory's
    value, so a question about the memory's subject ("Where does Kara live?") should
    reach it, and one that already names the value ("In which country is Kyoto?") is
    about something else. The statement is kept whole where nothing would be left
    of it but its value.
    """
    key = answer_key(statement)
    if key is None:
        return statement
    # The key as a word of its own (with a possessive "'s"), never a piece of a longer word or
    # a hyphenated compound ("Kyotoville", "Kyoto-born" stay).
    rest = re.sub(rf"(?<![\w'\u2019-]){re.escape(key)}(?:['\u2019]s)?(?![\w-])", "", statement, flags=re.IGNORECASE)
    rest = re.sub(r"\s+([.,;:!?])", r"\1", re.sub(r"\s{2,}", " ", rest)).strip()
    return rest if content_words(rest) else statement


def anchor(statement: str) -> str:
    """What the statement is about: its first run of capitalised words (a name), else its first three words."""
    tokens = statement.split()
    best: list[str] = []
    run: list[str] = []
    for n, tok in enumerate(tokens):
        bare = tok.strip(",;:!?\"()")
        if bare.endswith(".") and len(bare) > 2:  # keep the dot of an initial ("T.")
            bare = bare[:-1]
        is_name = bool(bare) and bare[0].isupper() and not (n == 0 and bare.lower() in STOPWORDS)
        if is_name and not (bare.endswith("'s") or bare.endswith("\u2019s")):
            run.append(bare)
            continue
        if is_name:  # a possessive ends the name: "Ana B. Kov's dog"
            run.append(bare)
        if len(run) > len(best) and any(len(r.rstrip(".")) > 1 for r in run):
            best = run
        run = []
        if best:
            break
    if len(run) > len(best):
        best = run
    if best:
        name = " ".join(best)
        return re.sub(r"(['\u2019]s)$", "", name)
    return " ".join(statement.split()[:3]).rstrip(".,;:!?")


def contains_word(text: str, word: str) -> bool:
    """Whether ``word`` occurs in ``text`` as a word of its own (any case)."""
    return re.search(rf"(?<![\w]){re.escape(word.lower())}(?![\w])", text.lower()) is not None


def recalled(statement: str, question: str, answer: str) -> bool:
    """Whether ``answer`` to ``question`` supplies the statement's key word."""
    key = answer_key(statement, question)
    return key is not None and contains_word(answer, key)


def cloze_prefix(statement: str) -> str | None:
    """The statement up to its key word, when at least two words come before it (else None)."""
    key = answer_key(statement)
    if key is None:
        return None
    at = statement.lower().rfind(key.lower())
    prefix = statement[:at].rstrip()
    return prefix if len(prefix.split()) >= 2 else None
