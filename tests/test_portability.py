"""Export a scope as JSON lines and import it back: the API, the command line, bad files."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from memplug import InvalidInput, InvalidScope, Scope
from memplug.cli import main
from memplug.portability import export, import_

FACTS = ["Mara Quell moved to Ghent in April.", "Mara's cat Tofu needs pills twice a day."]


def fill(mem, user):
    """Knowledge with metadata, a keyed document and a session's turns, read and used."""
    facts = mem.write(user, FACTS, metadata={"source": "chat", "tags": ["home", "pets"]})
    [doc] = mem.put(user, ["doc-7"], ["The boiler was serviced in March."], [{"kind": "note"}],
                    occurred_at="2024-03-12")
    chat = Scope(user, "helper", "s1")
    turns = mem.write_messages(chat, [{"role": "user", "content": "I'm allergic to shellfish."},
                                      {"role": "assistant", "content": "Noted."}])
    mem.read(user, "Where does Mara live?")
    mem.read(user, "Where does Mara live?")
    mem.feedback(user, [facts[0].id])
    return facts + [doc] + turns


def snapshot(mem, user):
    """What an import must restore, item by item (ids aside)."""
    usage = {u.item_id: u for u in mem.usage(Scope(user), subtree=True)}
    rows = []
    for u in sorted(usage.values(), key=lambda u: u.item_id):
        [item] = mem.get(u.scope, [u.item_id])
        rows.append((str(item.scope), item.text, item.role, item.key, dict(item.metadata), item.created_at,
                     u.reads, u.used, round(u.heat, 3)))
    return sorted(rows, key=lambda r: (r[0], r[1]))


def test_export_then_import_restores_every_item(memory, user):
    items = fill(memory, user)
    before = snapshot(memory, user)
    lines = list(export(memory, user))
    assert len(lines) == len(items) == 5
    first = json.loads(lines[0])
    assert first["format"] == "memplug-item/1" and first["scope"] == user and first["text"] == FACTS[0]
    assert first["metadata"] == {"source": "chat", "tags": ["home", "pets"]}
    assert first["usage"]["reads"] == 2 and first["usage"]["used"] == 1 and first["level"] == 1
    turn = json.loads(lines[-1])
    assert turn["scope"] == f"{user}/helper/s1" and turn["role"] == "assistant" and turn["level"] == 0
    assert json.loads(lines[2])["key"] == "doc-7"
    assert json.loads(lines[2])["occurred_at"] == "2024-03-12T00:00:00+00:00" and first["occurred_at"] is None

    memory.forget(user)
    assert memory.stats(user)["items"] == 0
    done = import_(memory, None, lines)
    assert (done.written, done.existing) == (5, 0)
    assert snapshot(memory, user) == before
    assert memory.read(user, "Where does Mara live?").hits[0].item.text == FACTS[0]  # indexed again
    assert [t.text for t in memory.turns(Scope(user, "helper", "s1"))] == ["I'm allergic to shellfish.", "Noted."]
    assert memory.get_keys(user, ["doc-7"])[0].text == "The boiler was serviced in March."
    assert memory.get_keys(user, ["doc-7"])[0].occurred_at.isoformat() == "2024-03-12T00:00:00+00:00"

    now = snapshot(memory, user)  # the read above counted
    again = import_(memory, None, lines)  # idempotent: nothing is added twice
    assert (again.written, again.existing) == (0, 5)
    assert snapshot(memory, user) == now


def test_import_into_another_scope(memory, users):
    alice, bob = users(2)
    fill(memory, alice)
    lines = list(export(memory, Scope(alice, "helper")))  # only the agent's subtree: the two turns
    assert len(lines) == 2
    done = import_(memory, Scope(bob), "\n".join(lines))
    assert done.written == 2
    assert [t.text for t in memory.turns(Scope(bob, "helper", "s1"))] == ["I'm allergic to shellfish.", "Noted."]
    assert len(memory.items(Scope(alice, "helper", "s1"))) == 5  # alice keeps hers


def good_line(user: str, text: str = "A fine fact.", **changes) -> str:
    data = {"format": "memplug-item/1", "scope": user, "text": text, "role": None, "key": None, "metadata": {},
            "created_at": "2025-05-01T10:00:00+00:00", "usage": {"reads": 1, "used": 0, "heat": 0.5,
                                                                 "last_read_at": None}}
    data.update(changes)
    return json.dumps(data)


BAD_LINES = [
    ("{not json", InvalidInput, "line 2: not JSON"),
    ("[1, 2]", InvalidInput, "line 2: expected a JSON object, got list"),
    ('{"format": "other/1"}', InvalidInput, "line 2: format is 'other/1'"),
    (lambda u: good_line(u, extra=1), InvalidInput, r"line 2: unknown field\(s\) \['extra'\]"),
    (lambda u: good_line("../etc"), InvalidScope, "line 2: .*may use only"),
    (lambda u: good_line(u, "nul \x00 byte"), InvalidInput, "line 2: text contains a NUL byte"),
    (lambda u: good_line(u, ""), InvalidInput, "line 2: text is empty"),
    (lambda u: good_line(u, role="robot"), InvalidInput, "line 2: role is 'robot'"),
    (lambda u: good_line(u, role="user"), InvalidInput, "line 2: a turn .* needs a scope with a session"),
    (lambda u: good_line(u, metadata=[1]), InvalidInput, "line 2: metadata must be a dict"),
    (lambda u: good_line(u, created_at="yesterday"), InvalidInput, "line 2: created_at 'yesterday' is not"),
    (lambda u: good_line(u, created_at="2025-05-01T10:00:00"), InvalidInput, "line 2: .*no time zone"),
    (lambda u: good_line(u, usage={"reads": -1}), InvalidInput, "line 2: usage.reads must be an int"),
    (lambda u: good_line(u, usage={"heat": "hot"}), InvalidInput, "line 2: usage.heat must be"),
    (lambda u: good_line(u, key="k" * 513), InvalidInput, "line 2: key is 513 characters"),
    (lambda u: good_line(u, key="doc-1", text="Another text for doc-1."), InvalidInput,
     "line 2: key 'doc-1' .* another text on line 1"),
]


@pytest.mark.parametrize(("bad", "error", "message"), BAD_LINES)
def test_a_bad_line_is_named_and_nothing_is_imported(memory, user, bad, error, message):
    lines = [good_line(user, "The first fact.", key="doc-1"), bad(user) if callable(bad) else bad,
             good_line(user, "The third fact.")]
    with pytest.raises(error, match=message):
        import_(memory, None, lines)
    assert memory.stats(user)["items"] == 0


def test_a_key_holding_another_text_is_refused(memory, user):
    memory.put(user, ["doc-1"], ["What doc-1 says now."])
    with pytest.raises(InvalidInput, match="line 2: key 'doc-1' .* already holds another text"):
        import_(memory, None, [good_line(user, "New."), good_line(user, "What doc-1 said.", key="doc-1")])
    assert [it.text for it in memory.items(user)] == ["What doc-1 says now."]


def test_command_line_round_trip(dsn, monkeypatch, user, tmp_path, memory):
    monkeypatch.setenv("MEMPLUG_DSN", dsn)
    fill(memory, user)
    before = snapshot(memory, user)
    runner = CliRunner()
    out = tmp_path / "alice.jsonl"
    result = runner.invoke(main, ["export", user, "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0 and "exported 5 item(s)" in result.output
    assert len(out.read_text().splitlines()) == 5
    stdout = runner.invoke(main, ["export", f"{user}/helper"], catch_exceptions=False)
    assert [json.loads(x)["text"] for x in stdout.stdout.splitlines()] == ["I'm allergic to shellfish.", "Noted."]

    memory.forget(user)
    result = runner.invoke(main, ["import", str(out), "--json"], catch_exceptions=False)
    assert result.exit_code == 0 and json.loads(result.stdout) == {"written": 5, "existing": 0}
    assert snapshot(memory, user) == before
    result = runner.invoke(main, ["import", str(out)], catch_exceptions=False)
    assert "imported 0 item(s); 5 were already there" in result.output

    bad = tmp_path / "bad.jsonl"
    bad.write_text(good_line(user, "Fine.") + "\n" + '{"format": "memplug-item/1", "scope": 5}\n')
    result = runner.invoke(main, ["import", str(bad)], catch_exceptions=False)
    assert result.exit_code == 2 and "line 2: scope must be a string" in result.output
    assert "Fine." not in {it.text for it in memory.items(user)}
    result = runner.invoke(main, ["export", user, "-o", str(tmp_path / "no" / "such" / "dir.jsonl")],
                           catch_exceptions=False)
    assert result.exit_code == 2 and "cannot write" in result.output
