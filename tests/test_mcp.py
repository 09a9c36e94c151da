"""`memplug mcp`, driven by the official MCP SDK's client: in process, and over stdio in a subprocess."""

from __future__ import annotations

import json
import os
import sys

import pytest
from mcp import Client, StdioServerParameters

from memplug import Memory, Scope
from memplug.server.mcp import build_server

TOOLS = {"remember", "recall", "forget", "list", "inspect"}


@pytest.fixture(scope="module")
def mem(dsn):
    with Memory(dsn) as m:
        yield m


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def data(result) -> dict:
    assert not result.is_error, result.content[0].text
    return result.structured_content


def error(result) -> str:
    assert result.is_error, result.structured_content
    return result.content[0].text


async def test_tools_are_listed_with_schemas_and_descriptions(mem, user):
    async with Client(build_server(mem, Scope(user))) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == TOOLS
        for tool in tools.values():
            assert len(tool.description) > 80, tool.name  # written for a model: what it does, and when
            assert tool.input_schema["type"] == "object"
            assert not any("user" in n or "scope" in n for n in tool.input_schema["properties"])  # never whose
            for name, prop in tool.input_schema["properties"].items():
                assert prop.get("description"), (tool.name, name)
        assert tools["remember"].input_schema["required"] == ["text"]
        assert tools["recall"].input_schema["properties"]["k"] == {
            "default": 5, "description": "How many memories to return at most.", "maximum": 50, "minimum": 1,
            "title": "K", "type": "integer"}
        assert tools["recall"].annotations.read_only_hint and tools["forget"].annotations.destructive_hint
        resources = {str(r.uri) for r in (await client.list_resources()).resources}
        assert resources == {"memplug://memories/recent", "memplug://memories/profile"}
    async with Client(build_server(mem, Scope(user), operator=True)) as client:
        assert {t.name for t in (await client.list_tools()).tools} == TOOLS | {"end_session", "consolidate"}


async def test_remember_recall_forget_round_trip_and_two_users_apart(mem, users):
    alice, bob = users(2)
    async with Client(build_server(mem, Scope(alice))) as a, Client(build_server(mem, Scope(bob))) as b:
        stored = data(await a.call_tool("remember", {"text": "Alice is allergic to shellfish.",
                                                     "occurred_at": "2024-03-15", "metadata": {"topic": "health"}}))
        kept = stored["stored"]
        assert kept["text"] == "Alice is allergic to shellfish." and kept["occurred_at"].startswith("2024-03-15")
        data(await a.call_tool("remember", {"text": "Alice works at Corvana Labs."}))
        data(await b.call_tool("remember", {"text": "Bob keeps bees in his garden."}))

        found = data(await a.call_tool("recall", {"query": "what food allergies does she have?", "k": 2}))["memories"]
        assert found[0]["id"] == kept["id"] and found[0]["tier"] == "pgvector"
        assert found[0]["score"] > 0 and found[0]["relevance"] > 0.3 and found[0]["metadata"] == {"topic": "health"}
        assert {m["text"] for m in found} <= {"Alice is allergic to shellfish.", "Alice works at Corvana Labs."}

        # Bob's server never shows Alice's memory, by any tool or resource; nor the other way round.
        for query in ("shellfish allergy", "Corvana Labs"):
            assert "Alice" not in json.dumps(data(await b.call_tool("recall", {"query": query})))
        assert [m["text"] for m in data(await b.call_tool("list", {}))["memories"]] == ["Bob keeps bees in his garden."]
        assert "Alice" not in json.dumps(data(await b.call_tool("inspect", {})))
        for uri in ("memplug://memories/recent", "memplug://memories/profile"):
            assert "Alice" not in (await b.read_resource(uri)).contents[0].text
        assert "bees" not in json.dumps(data(await a.call_tool("list", {})))
        assert "NotFound" in error(await b.call_tool("forget", {"item_ids": [kept["id"]]}))
        assert "takes no argument(s) user" in error(await b.call_tool("inspect", {"limit": 5, "user": alice}))
        recent = json.loads((await a.read_resource("memplug://memories/recent")).contents[0].text)
        assert recent["items"] == 2 and recent["newest"][0]["text"] == "Alice works at Corvana Labs."
        profile = json.loads((await a.read_resource("memplug://memories/profile")).contents[0].text)
        assert profile["items_per_tier"] == {"pgvector": 2} and profile["most_read"][0]["id"] == kept["id"]

        assert data(await a.call_tool("forget", {"item_ids": [kept["id"]]})) == {"forgotten": 1}
        after = data(await a.call_tool("recall", {"query": "shellfish allergy"}))["memories"]
        assert kept["id"] not in {m["id"] for m in after}
        assert data(await a.call_tool("forget", {"everything": True})) == {"forgotten": 1}
        assert data(await a.call_tool("list", {}))["memories"] == []
        assert len(data(await b.call_tool("list", {}))["memories"]) == 1  # Bob's is untouched


@pytest.mark.parametrize("tool, arguments, names", [
    ("recall", {"query": "x", "user_id": "someone-else"}, ["user_id", "API key"]),
    ("remember", {"text": "x", "scope": "other/agent"}, ["scope"]),
    ("recall", {"query": "x", "k": "many"}, ["k", "valid integer"]),
    ("recall", {"query": "x", "k": 0}, ["k", "greater than or equal to 1"]),
    ("remember", {"text": 42}, ["text", "valid string"]),
    ("remember", {}, ["text", "required"]),
    ("remember", {"text": "   "}, ["InvalidInput", "text is empty"]),
    ("remember", {"text": "x", "occurred_at": "last tuesday"}, ["InvalidInput", "occurred_at"]),
    ("remember", {"text": "x", "metadata": nested(120)}, ["InvalidInput", "metadata", "nested more than 100"]),
    ("forget", {}, ["InvalidInput", "item_ids", "everything"]),
    ("forget", {"item_ids": [-3]}, ["InvalidInput", "item_ids"]),
    ("list", {"limit": 5000}, ["limit", "less than or equal to 200"]),
])
async def test_a_bad_argument_gets_a_tool_error_naming_it_and_changes_nothing(mem, user, tool, arguments, names):
    mem.write(user, "Kept whatever the calls below try.")
    async with Client(build_server(mem, Scope(user))) as client:
        message = error(await client.call_tool(tool, arguments))
        assert all(n in message for n in names), message
        assert "Traceback" not in message
    assert [it.text for it in mem.items(user)] == ["Kept whatever the calls below try."]


async def test_the_operator_tools_end_a_session(mem, user):
    chat = Scope(user, "helper", "s1")
    mem.write_messages(chat, [{"role": "user", "content": "My sister lives in Lyon."}])
    async with Client(build_server(mem, Scope(user, "helper"), operator=True)) as client:
        placed = data(await client.call_tool("end_session", {"session_id": "s1"}))["placements"]
        assert {(p["tier"], p["held"]) for p in placed} == {("context", False)}
        assert "InvalidScope" in error(await client.call_tool("end_session", {"session_id": "../s1"}))
        assert data(await client.call_tool("consolidate", {})) == {"placements": []}
    assert mem.turns(chat) == [] and "Lyon" in mem.read(Scope(user, "helper"), "where does my sister live").as_text()


async def test_over_stdio_in_a_subprocess(dsn, mem, users):
    alice, bob = users(2)
    env = {k: v for k, v in os.environ.items() if k.startswith(("MEMPLUG_", "HF_", "PATH", "HOME"))}
    params = StdioServerParameters(command=sys.executable, args=["-m", "memplug.cli", "mcp", "--user", alice],
                                   env={**env, "MEMPLUG_DSN": dsn})
    async with Client(params) as client:
        assert {t.name for t in (await client.list_tools()).tools} == TOOLS
        kept = data(await client.call_tool("remember", {"text": "Alice's locker code is 4417."}))["stored"]
        found = data(await client.call_tool("recall", {"query": "locker code"}))["memories"]
        assert found[0]["id"] == kept["id"] and found[0]["text"] == "Alice's locker code is 4417."
        assert "user_id" in error(await client.call_tool("recall", {"query": "x", "user_id": bob}))
        mem.write(bob, "Bob's locker code is 9001.")  # another user, in the same database
        assert [m["id"] for m in data(await client.call_tool("recall", {"query": "locker code"}))["memories"]] \
            == [kept["id"]]
        assert data(await client.call_tool("forget", {"item_ids": [kept["id"]]})) == {"forgotten": 1}
        assert data(await client.call_tool("list", {}))["memories"] == []
    assert [it.text for it in mem.items(bob)] == ["Bob's locker code is 9001."] and mem.items(alice) == []
