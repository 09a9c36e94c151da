"""The profile tier, found through its entry point, on a real Postgres: it passes the
conformance suite and puts the user's profile first in every read."""

from __future__ import annotations

import uuid

import pytest

from memplug import Budget, Memory, Scope, Settings
from memplug.testing import TierConformance
from memplug_profile import extract

PROFILE_FACTS = ("My name is Ana Duarte.", "I live in Lisbon.", "I work at Corvana Labs.",
                 "My sister is called Maria.", "I'm allergic to peanuts.")


class TestProfileConformance(TierConformance):
    plugin = "profile"
    texts = PROFILE_FACTS


def test_extract_reads_first_person_facts():
    assert extract("Hi, my name is Ana and I live in Lisbon, but I work at Corvana Labs.") == [
        ("name", "Ana", 0), ("lives in", "Lisbon", 1), ("works at", "Corvana Labs", 2)]
    assert extract("My dog's name is Biscuit and I really love green tea.") == [
        ("dog", "Biscuit", 3), ("likes: green tea", "green tea", 5)]
    assert extract("The weather in Lisbon is mild.") == []


@pytest.fixture
def profiled(memplug_dsn, memplug_home):
    mem = Memory(memplug_dsn, home=memplug_home, settings=Settings(plugins="context,pgvector,profile"),
                 options={"profile_tokens": 24})
    yield mem
    mem.close()


def test_profile_comes_first_within_its_budget_and_follows_the_user(profiled):
    user = Scope("p" + uuid.uuid4().hex[:10])
    name = profiled.write(user, "My name is Ana and I live in Lisbon.")
    profiled.write(user, [f"Trivia {n}: the moon is about 384,000 km away." for n in range(8)])
    profiled.write(user, "My sister is called Maria. I love green tea. I'm allergic to peanuts and shellfish.")
    recall = profiled.read(user, "moon trivia", Budget(k=3))
    assert recall.pinned[0].pinned and recall.pinned[0].text == "name: Ana; lives in: Lisbon"
    assert recall.pinned[1].text.startswith("sister: Maria")
    # The profile takes none of the k ranked places, and as_text() has both, the profile first.
    assert len(recall.hits) == 3 and not any(h.pinned for h in recall.hits)
    assert recall.as_text().splitlines()[1] == "- name: Ana; lives in: Lisbon"
    assert all(f"- {h.text}" in recall.as_text() for h in recall.hits)
    profile = [h.text for h in recall.pinned]
    assert sum(profiled.token_counter.count_many(profile)) <= 24 + len(profile)  # within profile_tokens
    # A newer statement replaces the slot; forgetting the source removes the fact.
    profiled.write(user, "Please call me Annie.")
    assert profiled.read(user, "moon").pinned[0].text.startswith("name: Annie")
    profiled.forget(user, [name.id])
    assert all("Lisbon" not in h.text for h in profiled.read(user, "moon").pinned)
    # Facts said to one agent stay with that agent.
    profiled.write(Scope(user.user_id, "coach"), "I work at the harbour office? No: I work at Harbour Office.")
    assert any("Harbour Office" in h.text for h in profiled.read(Scope(user.user_id, "coach"), "job").pinned)
    assert not any("Harbour Office" in h.text for h in profiled.read(Scope(user.user_id, "chef"), "job").pinned)
    profiled.forget(Scope(user.user_id))


def test_inspect_shows_the_profile_bytes(profiled):
    """The profile tier implements memplug_footprint with fewer arguments than the hook offers."""
    user = Scope("p" + uuid.uuid4().hex[:10])
    item = profiled.write(user, "My name is Ana and I live in Lisbon.")
    [row] = profiled.inspect(user)
    assert row["id"] == item.id and row["bytes"]["profile"] > 0 and row["bytes"]["pgvector"] > 0
    profiled.forget(user)
