"""A seeded generator of facts about fictional people, each with a direct and a paraphrased question.

Shared by the benchmarks so that every tier is measured on the same knowledge.
Names are built from syllables, so there are far more distinct people than any
benchmark needs, and none of them exists: a model cannot know the answers
beforehand.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

FIRST = ["Ka", "Lo", "Mi", "Zen", "Ta", "Ori", "Bel", "Ves", "Ul", "Dra", "Fen", "Ise", "Quo", "Ru", "Sal", "Yar"]
MIDDLE = ["", "ra", "li", "no", "vi", "de", "mo", "sha", "tu", "ne"]
LAST_A = ["Vor", "Pell", "Strand", "Kov", "Ash", "Brun", "Tal", "Mer", "Oak", "Wyn", "Hald", "Crest", "Fol", "Dun"]
LAST_B = ["ik", "ley", "berg", "ski", "ford", "ton", "ova", "ard", "mere", "well", "holt", "by"]

CITIES = ["Lisbon", "Tromso", "Valparaiso", "Kyoto", "Tbilisi", "Hobart", "Quito", "Tallinn", "Windhoek",
          "Cusco", "Bergen", "Hanoi", "Dakar", "Porto", "Leuven", "Ushuaia", "Bled", "Oaxaca"]
JOBS = ["beekeeper", "cartographer", "glassblower", "locksmith", "luthier", "astronomer", "ferry captain",
        "perfumer", "volcanologist", "bookbinder", "sommelier", "puppeteer", "clockmaker", "falconer"]
PETS = ["ferret", "parrot", "tortoise", "goat", "hedgehog", "iguana", "axolotl", "pony", "rabbit", "owl"]
PET_NAMES = ["Biscuit", "Nimbus", "Pickles", "Marzipan", "Gizmo", "Tofu", "Pretzel", "Waffles", "Quasar",
             "Dumpling", "Juniper", "Noodle", "Saffron", "Ziggy"]
COLOURS = ["teal", "ochre", "crimson", "lavender", "amber", "indigo", "chartreuse", "maroon", "cobalt"]
INSTRUMENTS = ["cello", "oboe", "banjo", "harp", "theremin", "accordion", "sitar", "bassoon", "ukulele"]
SPORTS = ["fencing", "curling", "rowing", "bouldering", "archery", "lacrosse", "judo", "squash", "polo"]
FOODS = ["mushroom risotto", "pad thai", "borscht", "ceviche", "pierogi", "laksa", "gnocchi", "tagine"]


@dataclass(frozen=True)
class Fact:
    """One fact: the statement to memorise, two questions, and the answer to look for."""

    entity: str
    attribute: str
    statement: str
    question: str
    paraphrase: str
    answer: str


def _code(rng: random.Random) -> str:
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    return f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randint(1000, 9999)}"


TEMPLATES = [
    ("city", lambda r: r.choice(CITIES), "{e} lives in {a}.", "Where does {e} live?",
     "In which city is {e}'s home?"),
    ("job", lambda r: r.choice(JOBS), "{e} works as a {a}.", "What is {e}'s job?",
     "What does {e} do for a living?"),
    ("pet", lambda r: r.choice(PET_NAMES), "{e} has a pet {p} called {a}.", "What is the name of {e}'s pet?",
     "What is {e}'s {p} called?"),
    ("colour", lambda r: r.choice(COLOURS), "{e}'s favourite colour is {a}.", "What is {e}'s favourite colour?",
     "Which colour does {e} like best?"),
    ("instrument", lambda r: r.choice(INSTRUMENTS), "{e} plays the {a}.", "Which instrument does {e} play?",
     "What musical instrument is {e} able to play?"),
    ("sport", lambda r: r.choice(SPORTS), "{e} competes in {a} at weekends.", "What sport does {e} do?",
     "Which sport does {e} take part in on weekends?"),
    ("food", lambda r: r.choice(FOODS), "{e}'s favourite dish is {a}.", "What is {e}'s favourite dish?",
     "Which meal does {e} enjoy most?"),
    ("code", _code, "{e}'s locker code is {a}.", "What is {e}'s locker code?",
     "Which code opens {e}'s locker?"),
    ("year", lambda r: str(r.randint(1951, 2004)), "{e} was born in {a}.", "In which year was {e} born?",
     "What is {e}'s year of birth?"),
]


INITIALS = "ABCDEFGHJKLMNOPRSTUVWYZ"
NAME_SPACE = len(FIRST) * len(MIDDLE) * len(INITIALS) * len(LAST_A) * len(LAST_B)


def names(seed: int = 0) -> Iterator[str]:
    """Distinct fictional full names (about 600,000 of them), in a seeded order."""
    rng = random.Random(seed)
    seen: set[str] = set()
    while len(seen) < NAME_SPACE:
        name = (f"{(rng.choice(FIRST) + rng.choice(MIDDLE)).capitalize()} {rng.choice(INITIALS)}. "
                f"{rng.choice(LAST_A)}{rng.choice(LAST_B)}")
        if name not in seen:
            seen.add(name)
            yield name


def generate(n: int, seed: int = 0) -> list[Fact]:
    """``n`` facts about distinct fictional people (one fact per person), reproducible by ``seed``."""
    if n > NAME_SPACE // 2:
        raise ValueError(f"at most {NAME_SPACE // 2} facts about distinct people; use haystack() for more")
    people = names(seed)
    return _facts(random.Random(seed), [next(people) for _ in range(n)])


def haystack(n: int, seed: int = 0) -> Iterator[Fact]:
    """``n`` distinct facts, cycling a cast of people through every attribute: bulk text for benchmarks."""
    rng = random.Random(seed)
    gen = names(seed + 1_000_003)
    # Each person takes each attribute at most once, so no statement repeats.
    cast = [next(gen) for _ in range(max(1, -(-n // len(TEMPLATES))))]
    for start in range(0, n, len(cast)):
        yield from _facts(rng, cast[: n - start], offset=start // len(cast))


def _facts(rng: random.Random, entities: list[str], offset: int = 0) -> list[Fact]:
    out = []
    for k, entity in enumerate(entities):
        attribute, value, statement, question, paraphrase = TEMPLATES[(k + offset) % len(TEMPLATES)]
        answer = value(rng)
        pet = rng.choice(PETS)
        fill = {"e": entity, "a": answer, "p": pet}
        out.append(Fact(entity, attribute, statement.format(**fill), question.format(**fill),
                        paraphrase.format(**fill), answer))
    return out
