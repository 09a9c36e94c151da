"""The memplug command, run in-process against the test server."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from memplug.cli import main


@pytest.fixture
def run(dsn, monkeypatch):
    monkeypatch.setenv("MEMPLUG_DSN", dsn)
    runner = CliRunner()

    def invoke(*args, ok=True):
        result = runner.invoke(main, list(args), catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return invoke


def test_write_read_forget(run, user):
    out = json.loads(run("write", user, "My bike is a red Bianchi.", "I live in Porto.", "-m", "source=cli",
                         "--json").output)
    assert [i["text"] for i in out] == ["My bike is a red Bianchi.", "I live in Porto."]
    assert out[0]["metadata"] == {"source": "cli"}

    hits = json.loads(run("read", user, "what bike do I ride", "-k", "1", "--json").output)["hits"]
    assert hits[0]["text"] == "My bike is a red Bianchi." and hits[0]["tier"] == "pgvector"
    table = run("read", user, "where do I live").output
    assert "Porto" in table and "pgvector" in table

    filtered = json.loads(run("read", user, "bike", "--filter", "source=other", "--json").output)
    assert filtered["hits"] == []

    gone = json.loads(run("forget", user, "--id", str(out[0]["id"]), "--json").output)
    assert gone == {"scope": user, "forgotten": 1}
    assert json.loads(run("forget", user, "--all", "--json").output)["forgotten"] == 1
    assert json.loads(run("stats", user, "--json").output)["items"] == 0


def test_stats_plugins_doctor(run, user):
    run("write", f"{user}/agent/s1", "A session note.")
    stats = json.loads(run("stats", user, "--json").output)
    assert stats["items"] == 1 and stats["scopes"] == 1 and stats["items_per_tier"] == {"pgvector": 1}
    assert "items per tier" in run("stats").output

    plugins = {p["name"]: p for p in json.loads(run("plugins", "--json").output)}
    assert plugins["pgvector"]["level"] == 1 and "memplug_read" in plugins["pgvector"]["hooks"]
    assert "context" in run("plugins").output

    doctor = {c["name"]: c for c in json.loads(run("doctor", "--json").output)}
    assert doctor["postgres"]["ok"] and "PostgreSQL 18" in doctor["postgres"]["detail"]
    assert doctor["pgvector"]["ok"] and doctor["embedding model"]["ok"] and doctor["local model"]["ok"]


def test_errors_are_one_clear_line(run):
    result = run("write", "../etc", "text", ok=False)
    assert result.exit_code == 2
    assert "InvalidScope" in result.output and "Traceback" not in result.output
    result = run("write", "alice", "", ok=False)
    assert result.exit_code == 2 and "text[0] is empty" in result.output
    assert run("forget", "alice", ok=False).exit_code == 2  # neither --id nor --all


def test_unreachable_store_exit_code(monkeypatch):
    monkeypatch.setenv("MEMPLUG_DSN", "postgresql://u:topsecret@127.0.0.1:1/db?connect_timeout=1")
    result = CliRunner().invoke(main, ["stats"])
    assert result.exit_code == 2 and "StoreUnavailable" in result.output and "topsecret" not in result.output
    doctor = CliRunner().invoke(main, ["doctor", "--json"])
    assert doctor.exit_code == 1 and "topsecret" not in doctor.output


def test_consolidate(run, user):
    run("write", user, "A note to keep.")
    assert "nothing to consolidate" in run("consolidate", user).output
    assert json.loads(run("consolidate", user, "--json").output) == []
    assert run("consolidate", user, "--id", "1", ok=False).exit_code == 2  # --id needs --to
    empty = run("consolidate", f"{user}-nobody", "--to", "3", ok=False)
    assert empty.exit_code == 2 and "no knowledge items" in empty.output


def test_inspect_and_jobs(run, user):
    written = json.loads(run("write", user, "Dana plays chess on Sundays.", "--json").output)
    run("read", user, "when does Dana play chess?")
    rows = json.loads(run("inspect", user, "--json").output)
    assert [(r["id"], r["level"], r["reads"]) for r in rows] == [(written[0]["id"], 1, 1)]
    assert rows[0]["bytes"]["pgvector"] > 0 and rows[0]["history"][0]["reason"] == "write"
    assert "Dana" in run("inspect", user).output

    queued = json.loads(run("consolidate", user, "--queue", "--json").output)["job"]
    listed = json.loads(run("jobs", "--status", "todo", "--json").output)
    assert any(j["id"] == queued and j["scope"] == user and j["moves"] is None for j in listed)
    assert run("jobs", "--status", "sleeping", ok=False).exit_code == 2
    assert run("worker", "--concurrency", "0", ok=False).exit_code == 2
    run("worker", "--once")  # runs the queued job (nothing to move) and exits
    done = {j["id"]: j for j in json.loads(run("jobs", "--json").output)}
    assert done[queued]["status"] == "succeeded"


def test_text_in_square_brackets_prints_as_it_is(run, user, monkeypatch):
    """Memories, queries and error messages are not markup: "[/red]" in a note neither fails nor vanishes."""
    from memplug import cli

    monkeypatch.setattr(cli.console, "width", 240)  # inspect's columns, unfolded
    note = "Deploy key is [/red] and [bold]secret[/bold], list[0]."
    run("write", user, note)
    flat = re.sub(r"[\s│]", "", run("read", user, "deploy key [/x]").output)  # the table folds the text
    assert re.sub(r"\s", "", note) in flat
    assert note in run("inspect", user).output
    result = run("read", user, "key", "--filter", "[bold]oops", ok=False)
    assert result.exit_code == 2 and "'[bold]oops' must look like key=value" in result.output
    result = run("write", "", "hello", ok=False)  # the scope's format in the message holds brackets
    assert result.exit_code == 2 and "InvalidScope" in result.output and "Traceback" not in result.output


def test_read_shows_pinned_hits_apart(run, user, monkeypatch):
    monkeypatch.setenv("MEMPLUG_PLUGINS", "context,pgvector,profile")
    run("write", user, "My name is Ana and I live in Lisbon.", "The boiler was serviced in March.")
    out = json.loads(run("read", user, "boiler", "-k", "1", "--json").output)
    assert [h["text"] for h in out["pinned"]] == ["name: Ana; lives in: Lisbon"]
    assert [h["text"] for h in out["hits"]] == ["The boiler was serviced in March."]
    assert "1 pinned" in run("read", user, "boiler", "-k", "1").output
