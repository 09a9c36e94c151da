"""Plugin discovery, selection, in-process plugins, and the hook documentation."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from memplug import Budget, Hit, Move, Placement, PluginError, Scope, Settings, hookimpl, hookspecs
from memplug.plugin import ITEM_COLUMNS, item_from_row
from memplug.plugins import PluginRegistry
from memplug.scoping import visible_sql

DOCS = Path(__file__).resolve().parents[1] / "docs" / "hooks.md"


def test_builtin_tiers_come_from_entry_points():
    info = {p.name: p for p in PluginRegistry(None).info()}
    assert {"context", "pgvector"} <= set(info)
    assert info["context"].level == 0 and info["pgvector"].level == 1
    assert info["pgvector"].version and info["pgvector"].source == "entry point memplug_pgvector:PgVectorTier"
    assert "memplug_read" in info["pgvector"].hooks and "memplug_forget" in info["context"].hooks


@pytest.mark.parametrize(
    ("selection", "expected"),
    [("pgvector", {"pgvector"}), ("-context", {"pgvector"}), ("context, pgvector", {"context", "pgvector"}), ("", set())],
)
def test_memplug_plugins_restricts_loading(selection, expected):
    assert {p.name for p in PluginRegistry(selection).info()} >= expected
    assert {p.name for p in PluginRegistry(selection).info()} & {"context", "pgvector"} == expected


def test_unknown_plugin_name_is_an_error():
    with pytest.raises(PluginError, match="unknown plugin.*pgvectr.*installed: .*pgvector"):
        PluginRegistry("pgvectr")


def test_selection_from_the_environment(monkeypatch):
    monkeypatch.setenv("MEMPLUG_PLUGINS", "pgvector")
    assert Settings().plugins == "pgvector"
    monkeypatch.delenv("MEMPLUG_PLUGINS")
    assert Settings().plugins is None


class PinnedNotes:
    """A test-only tier: items tagged pinned=true always come back, first."""

    name = "pinned"
    level = 0

    @hookimpl
    def memplug_write(self, items):
        ids = [it.id for it in items if it.metadata.get("pinned")]
        return [Placement(self.name, self.level, ids, "pinned")] if ids else None

    @hookimpl
    def memplug_read(self, scope, db):
        where, params = visible_sql(scope, "i")
        rows = db.execute(
            f"SELECT {ITEM_COLUMNS} FROM items i JOIN placements p ON p.item_id = i.id AND p.tier = 'pinned' "
            f"WHERE {where} ORDER BY i.id", params).fetchall()
        return [Hit(item_from_row(r), self.name, 1.0) for r in rows]


def test_a_plugin_registered_in_process(make_memory, user):
    mem = make_memory(plugins=[PinnedNotes()])
    s = Scope(user)
    pinned = mem.write(s, "Always answer in French.", metadata={"pinned": True})
    mem.write(s, [f"Trivia {n}: the moon is far away." for n in range(10)])
    recall = mem.read(s, "moon trivia", Budget(k=3))
    assert recall.hits[0].item.id == pinned.id and recall.hits[0].tier == "pinned"
    assert mem.stats(s)["items_per_tier"] == {"pgvector": 11, "pinned": 1}
    # only this Memory has it
    other = make_memory()
    assert "pinned" not in {p.name for p in other.plugins.info()}
    mem.plugins.unregister("pinned")
    assert all(h.tier != "pinned" for h in mem.read(s, "moon trivia").hits)


class ReadTwicePolicy:
    name = "read-twice"

    @hookimpl
    def memplug_plan(self, usage):
        hot = tuple(u.item_id for u in usage if u.reads >= 2 and u.level == 1)
        return [Move(hot, 1, 2, "read twice")] if hot else None


class FakeLevelTwo:
    """Records what it is asked to hold; a stand-in for a level-2 tier in plumbing tests."""

    name = "level-two"
    level = 2

    def __init__(self):
        self.held = set()

    @hookimpl
    def memplug_consolidate(self, moves):
        ids = [i for m in moves if m.dst_level == self.level for i in m.item_ids]
        self.held.update(ids)
        return [Placement(self.name, self.level, ids, moves[0].reason)]

    @hookimpl
    def memplug_forget(self, item_ids):
        self.held.difference_update(item_ids)


def test_plan_and_consolidate_record_placements(make_memory, user):
    tier = FakeLevelTwo()
    mem = make_memory(plugins=[ReadTwicePolicy(), tier])
    s = Scope(user)
    hot, cold = mem.write(s, ["The wifi password is hunter2.", "The office plant is a fern."])
    for _ in range(2):
        mem.read(s, "wifi password", Budget(k=1))
    placed = mem.consolidate(s)
    assert placed == [Placement("level-two", 2, (hot.id,), "read twice")]
    levels = {u.item_id: u.level for u in mem.usage(s)}
    assert levels == {hot.id: 2, cold.id: 1}
    assert mem.consolidate(s) == []  # nothing left to move
    mem.forget(s, [hot.id])
    assert tier.held == set()


def test_tiers_are_validated(make_memory):
    class NoLevel:
        name = "broken"
        level = -1

    with pytest.raises(PluginError, match="level must be an int >= 0"):
        make_memory(plugins=[NoLevel()])

    class BadHook:
        @hookimpl
        def memplug_raed(self):  # typo: not a hook
            pass

    with pytest.raises(PluginError, match="memplug_raed"):
        make_memory(plugins=[BadHook()])


def _hookspecs():
    return {name: fn for name, fn in vars(hookspecs).items() if name.startswith("memplug_") and callable(fn)}


def test_every_hook_is_documented_with_its_exact_signature():
    docs = DOCS.read_text()
    headings = set(re.findall(r"^## (memplug_\w+\(.*\))$", docs, flags=re.M))
    expected = {f"{name}({', '.join(inspect.signature(fn).parameters)})" for name, fn in _hookspecs().items()}
    assert expected - headings == set(), "hooks missing from docs/hooks.md (or with another signature)"
    assert headings - expected == set(), "docs/hooks.md documents hooks that do not exist"


def test_every_hookspec_has_a_docstring():
    for name, fn in _hookspecs().items():
        assert (fn.__doc__ or "").strip(), f"{name} has no docstring"


def test_memplug_trace_logs_every_hook_call_with_its_time(make_memory, user, monkeypatch, tmp_path):
    from memplug.plugins import trace_log

    log = tmp_path / "trace.log"
    monkeypatch.setenv("MEMPLUG_TRACE", str(log))
    try:
        mem = make_memory(plugins=[PinnedNotes()])
        mem.write(Scope(user), "Traced note.", metadata={"pinned": True})
        mem.read(Scope(user), "traced")
    finally:
        for handler in list(trace_log.handlers):
            trace_log.removeHandler(handler)
            handler.close()
    lines = log.read_text().splitlines()
    for hook, plugin in (("memplug_write", "pinned"), ("memplug_write", "pgvector"), ("memplug_read", "pinned"),
                         ("memplug_read", "pgvector"), ("memplug_configure", "context")):
        assert any(f" {hook} {plugin} " in line and line.endswith(" ok") for line in lines), (hook, plugin)
    assert all(" ms " in line for line in lines)


def test_importing_memplug_and_its_plugins_loads_no_torch_langchain_llama_index_or_web_framework():
    """The library and its tiers import their models lazily: an app that never loads a local model
    (API models only) never pays for torch; nor for a web framework or the MCP SDK, which only the
    servers load (the client needs httpx alone)."""
    import subprocess
    import sys

    code = ("import sys, memplug, memplug.cli, memplug_context, memplug_pgvector, memplug_kv, memplug_lora\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'langchain_core', 'llama_index',"
            " 'fastapi', 'starlette', 'mcp', 'uvicorn', 'httpx', 'pydantic') if m in sys.modules)\n"
            "assert not heavy, heavy\n"
            "import memplug.server, memplug.client\n"
            "heavy = sorted(m for m in ('torch', 'fastapi', 'starlette', 'mcp', 'uvicorn') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


class Profile:
    """A test-only tier pinning a scope's oldest item before every read, as a profile plugin does."""

    name = "pin-oldest"
    level = 0

    @hookimpl
    def memplug_read(self, scope, db):
        where, params = visible_sql(scope, "i")
        row = db.execute(f"SELECT {ITEM_COLUMNS} FROM items i WHERE {where} ORDER BY i.id LIMIT 1", params).fetchone()
        return [Hit(item_from_row(row), self.name, 1.0, text="profile: " + row[4], pinned=True)] if row else None


def test_recall_hits_hold_at_most_k_ranked_hits_and_pinned_hits_apart(make_memory, user):
    # A caller that takes recall.hits used to get the pinned hits first and then k ranked ones.
    mem = make_memory(plugins=[Profile()])
    oldest = mem.write(user, "My name is Ana.")
    mem.write(user, [f"Trivia {n}: the moon is about 384,000 km away." for n in range(6)])
    for k in (1, 3, 5):
        recall = mem.read(user, "moon trivia", Budget(k=k))
        assert len(recall.hits) == k and not any(h.pinned for h in recall.hits)
        assert [h.item.id for h in recall.pinned] == [oldest.id]
        text = recall.as_text()
        assert text.splitlines()[1] == "- profile: My name is Ana."  # pinned first, then the ranked hits
        assert all(f"- {h.text}" in text for h in recall.hits)
        assert oldest.id in {it.id for it in recall.items}  # read, and counted as read
    assert mem.usage(user)[0].reads == 3


def test_example_plugins_are_active_only_when_asked_for(make_memory, user):
    """`make` installs the example plugins (profile, redact) into the project's environment, where
    every Memory used to load them: the profile's pinned hits and the redaction changed every read."""
    info = {p.name: p for p in PluginRegistry(None).info()}
    assert info["profile"].status == "opt-in" and info["redact"].status == "opt-in"
    assert "MEMPLUG_PLUGINS names it (+profile)" in info["profile"].detail
    mem = make_memory(settings=Settings(plugins=None))  # every installed plugin
    assert mem.plugins.pm.get_plugin("profile") is None and mem.plugins.pm.get_plugin("redact") is None
    mem.write(user, ["My name is Ana and I live in Lisbon.", "Call the office at +1 555 123 4567."])
    recall = mem.read(user, "office phone number", Budget(k=1))
    assert recall.pinned == () and "555 123 4567" in recall.hits[0].text
    # Named, they load: as the only ones, or with '+' on top of all the others.
    loaded = {p.name for p in PluginRegistry("+profile").info() if p.status == "loaded"}
    assert {"profile", "context", "pgvector"} <= loaded and "redact" not in loaded
    assert PluginRegistry("context,pgvector,redact").pm.get_plugin("redact") is not None


def test_a_tier_whose_requirements_are_missing_is_unavailable_and_nothing_moves_to_it(
        make_memory, user, dsn, monkeypatch):
    """The lora tier needs peft, from the `lora` extra. Without it, the tier used to load, and the
    policies planned moves to level 3 that failed inside a job with an ImportError."""
    import json
    import sys

    from click.testing import CliRunner

    from memplug import InvalidInput
    from memplug.cli import main
    from memplug_lora import LoraTier

    monkeypatch.setitem(sys.modules, "peft", None)  # as where memplug[lora] is not installed
    info = {p.name: p for p in PluginRegistry(None).info()}
    assert info["lora"].status == "unavailable" and info["lora"].level == 3
    assert info["lora"].detail == "needs peft: pip install 'memplug[lora]'"

    mem = make_memory(settings=Settings(plugins=None),
                      options={"policy": "frequency", "freq_weights_reads": 1, "freq_weights_min_items": 1,
                               "freq_promote_reads": 1000})
    assert mem.plugins.pm.get_plugin("lora") is None and 3 not in mem.plugins.levels()
    items = mem.write(user, ["Ann keeps bees.", "Ann lives in Oslo."])
    for _ in range(3):
        mem.read(user, "Ann bees Oslo")
    plans = [m for part in mem.hook.memplug_plan(memory=mem, scope=Scope(user), usage=mem.usage(user)) if part
             for m in part]
    assert not [m for m in plans if m.dst_level == 3], plans
    assert mem.consolidate(user) == []
    with pytest.raises(InvalidInput, match=r"cannot move items to level 3: the lora tier is unavailable "
                                           r"\(needs peft: pip install 'memplug\[lora\]'\); nothing was changed"):
        mem.consolidate(user, [Move(tuple(it.id for it in items), 1, 3, "asked")])
    with pytest.raises(PluginError, match=r"plugin 'lora' cannot load here: it needs peft"):
        mem.register(LoraTier())
    # Its options are still settings (a deployment's configuration need not change with its extras).
    assert make_memory(settings=Settings(plugins=None), options={"lora_rank": 4}).option("lora_rank") == 4

    monkeypatch.setenv("MEMPLUG_DSN", dsn)
    monkeypatch.delenv("MEMPLUG_PLUGINS")
    runner = CliRunner()
    listed = {p["name"]: p for p in json.loads(runner.invoke(main, ["plugins", "--json"]).output)}
    assert listed["lora"]["status"] == "unavailable" and "pip install 'memplug[lora]'" in listed["lora"]["detail"]
    assert runner.invoke(main, ["plugins"]).exit_code == 0  # the table, with a status column
    doctor = runner.invoke(main, ["doctor", "--json"])
    checks = {c["name"]: c for c in json.loads(doctor.output)}
    assert not checks["plugin lora"]["ok"] and "pip install 'memplug[lora]'" in checks["plugin lora"]["detail"]
    assert doctor.exit_code == 0  # an optional tier does not fail the check of the deployment
