"""Scope isolation under random interleavings of several users (hypothesis, real Postgres).

A model of what each scope should hold is kept beside the real Memory; after
every step, every read must return only items the reader's scope may see.
"""

from __future__ import annotations

import uuid

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from memplug import Budget, Memory, Scope

WORDS = ["apple", "harbour", "violin", "granite", "lantern", "orbit", "pepper", "tundra", "saffron", "quartz"]
AGENTS = [None, "a1", "a2"]
SESSIONS = [None, "s1"]


class Interleavings(RuleBasedStateMachine):
    dsn: str = ""

    @initialize()
    def setup(self):
        self.mem = Memory(self.dsn)
        run = uuid.uuid4().hex[:8]
        self.users = [f"iso{run}{n}" for n in range(3)]
        self.held: dict[int, Scope] = {}  # item id -> scope it was written in
        self.reads = 0

    def teardown(self):
        for u in getattr(self, "users", []):
            self.mem.forget(Scope(u))
        if hasattr(self, "mem"):
            self.mem.close()

    def scope(self, data):
        return Scope(data.draw(st.sampled_from(self.users)), data.draw(st.sampled_from(AGENTS)),
                     data.draw(st.sampled_from(SESSIONS)))

    @rule(data=st.data(), words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=4))
    def write(self, data, words):
        s = self.scope(data)
        item = self.mem.write(s, f"{s.user_id} note: " + " ".join(words))
        self.held[item.id] = s

    @rule(data=st.data(), word=st.sampled_from(WORDS))
    def read(self, data, word):
        s = self.scope(data)
        recall = self.mem.read(s, f"{word} note", Budget(tokens=4096, k=50))
        self.reads += 1
        for hit in recall.hits:
            owner = self.held.get(hit.item.id)
            assert owner is not None, f"read returned item {hit.item.id}, which was forgotten or never written"
            assert owner.user_id == s.user_id, f"{s} saw {owner}'s item"
            assert owner.agent_id in (None, s.agent_id) and owner.session_id in (None, s.session_id)
            assert hit.item.scope == owner

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def forget_one(self, data):
        item_id = data.draw(st.sampled_from(sorted(self.held)))
        owner = self.held.pop(item_id)
        assert self.mem.forget(Scope(owner.user_id), [item_id]) == 1

    @rule(data=st.data())
    def forget_scope(self, data):
        s = self.scope(data)
        gone = [i for i, o in self.held.items() if o.user_id == s.user_id
                and (s.agent_id is None or o.agent_id == s.agent_id)
                and (s.session_id is None or o.session_id == s.session_id)]
        assert self.mem.forget(s) == len(gone)
        for i in gone:
            del self.held[i]

    @invariant()
    def counts_match(self):
        if not hasattr(self, "mem"):
            return
        for u in self.users:
            expected = sum(1 for o in self.held.values() if o.user_id == u)
            assert self.mem.stats(Scope(u))["items"] == expected


def test_no_scope_ever_sees_another(dsn):
    Interleavings.dsn = dsn
    Interleavings.TestCase.settings = settings(
        max_examples=25, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
    )
    Interleavings.TestCase().runTest()
