"""The vllm backend: adapter shapes and set-up checked without a server; then a real vLLM server
(its own environment, `memplug vllm setup`) serving the real SmolLM2 with two users' trained adapters."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from memplug import ConfigError, Memory, Move, ServerUnavailable, Settings
from memplug.runtime.vllm import default_env, env_ready, setup_env
from memplug.testing import find_traces

FACT = ("Zorbul Quenti lives in Marrakesh.", "Where does Zorbul Quenti live?", "Marrakesh")
OTHER = ("Ilse Varga plays the bassoon.", "Which instrument does Ilse Varga play?", "bassoon")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- without a server --------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "named"), [
    ({"lora_rank": 24}, "rank 24"),
    ({"lora_targets": "gate_proj,embed_tokens"}, "embed_tokens"),
    ({"vllm_max_lora_rank": 12}, "vllm_max_lora_rank=12"),
])
def test_adapter_shapes_the_server_would_refuse_are_refused_when_configured(dsn, tmp_path, options, named):
    with pytest.raises(ConfigError, match=named):
        Memory(dsn, settings=Settings(plugins="context,pgvector,lora"),
               options={"backend": "vllm", "artifacts": str(tmp_path), **options})
    # The same shapes are fine for the in-process model, where nothing limits them.
    if "vllm_max_lora_rank" not in options:
        Memory(dsn, settings=Settings(plugins="context,pgvector,lora"),
               options={"artifacts": str(tmp_path), **options}).close()


def test_a_remote_server_needs_to_be_told_where_it_reads_a_remote_store(dsn):
    with pytest.raises(ConfigError, match="vllm_artifacts_path"):
        Memory(dsn, options={"backend": "vllm", "vllm_url": "http://vllm.internal:8000",
                             "artifacts": "memory://memplug-test"})


def test_with_vllm_the_kv_tier_is_set_aside_and_no_policy_plans_level_2(dsn):
    with Memory(dsn, settings=Settings(plugins="context,pgvector,kv,lora")) as hf:
        assert 2 in hf.plugins.levels()
    with Memory(dsn, settings=Settings(plugins="context,pgvector,kv,lora"), options={"backend": "vllm"}) as mem:
        assert 2 not in mem.plugins.levels() and 3 in mem.plugins.levels()
        kv = next(i for i in mem.plugins.info() if i.name == "kv")
        assert kv.status == "unavailable" and "vllm backend takes no kv" in kv.detail
        assert mem.option("kv_codec") == "int4"  # its options are still settings


def test_a_server_that_is_down_is_a_clear_error(make_memory, user):
    mem = make_memory(options={"backend": "vllm", "vllm_url": f"http://127.0.0.1:{_closed_port()}"})
    mem.write(user, "Kara lives in Lisbon.")
    with pytest.raises(ServerUnavailable, match="cannot be reached"):
        mem.answer(user, "Where does Kara live?", max_new_tokens=4)
    assert mem.loaded_model is not None  # a configured URL is known without a call


# -- a real server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_env():
    """vLLM's environment, made on first use (minutes, once) and kept in the user cache folder."""
    python = default_env() / "bin" / "python"
    if not env_ready(python):
        setup_env(device="cpu")
    return python


@pytest.mark.timeout(1500)  # about 3 minutes on a 2-core CPU: two trainings and a server start (plus the set-up, once)
def test_vllm_serves_each_users_own_adapter_batched_and_forget_unloads_it(vllm_env, make_memory, users, tmp_path):
    alice, bob = users(2)
    common = {"artifacts": str(tmp_path / "artifacts"), "lora_epochs": 3, "lora_min_steps": 24,
              "lora_gate": 0.0, "vllm_max_loras": 2}
    hf = make_memory(settings=Settings(plugins="context,pgvector,lora"), options=common)
    [fact] = hf.write(alice, [FACT[0]])
    [other] = hf.write(bob, [OTHER[0]])
    for scope, item in ((alice, fact), (bob, other)):
        placed = hf.consolidate(scope, [Move((item.id,), 1, 3, "test")])
        assert any(p.tier == "lora" and p.held for p in placed), f"{scope}'s adapter recalls nothing: {placed}"

    mem = make_memory(settings=Settings(plugins="context,pgvector,lora"), options={**common, "backend": "vllm"})
    question = FACT[1]
    asked = {"alice": (alice, question), "bob": (bob, question), "base": (None, question)}
    answers: dict[str, str] = {}

    def ask(who: str) -> None:
        scope, q = asked[who]
        if scope is None:
            answers[who] = "".join(mem.respond(q, None, max_new_tokens=24))
        else:
            answers[who] = mem.answer(scope, q, max_new_tokens=24).text

    ask("alice")  # starts the server; then all three at once, in one batch
    threads = [threading.Thread(target=ask, args=(w,)) for w in asked]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each user's answer comes from their own adapter: alice's knows her fact, bob's adapter does not.
    assert FACT[2] in answers["alice"], answers
    assert FACT[2] not in answers["bob"] and FACT[2] not in answers["base"], answers
    # Token for token what the in-process model answers with the same adapter (fp32, greedy); the
    # request without an adapter gets none, although every adapter slot of the server is in use.
    assert answers["alice"] == hf.answer(alice, question, max_new_tokens=24).text
    assert answers["bob"] == hf.answer(bob, question, max_new_tokens=24).text
    assert answers["base"] == "".join(hf.respond(question, None, max_new_tokens=24))

    # The LangChain chat model answers through the same backend, whole, streamed and async.
    from memplug_langchain import ChatMemplug

    chat = ChatMemplug(memory=mem, scope=alice, max_tokens=24)
    assert chat.invoke(question).content == answers["alice"]
    assert "".join(c.content for c in chat.stream(question)) == answers["alice"]

    async def streamed() -> str:
        return "".join([c.content async for c in chat.astream(question)])
    assert asyncio.run(streamed()) == answers["alice"]
    # What serving her adapter cost on the server is what the cost policy reads for the lora tier.
    mem.flush_measurements()
    assert {"load_ms", "read_ms"} <= set(mem.measured("lora"))

    served = mem.model.served_adapters()
    ref = mem.read(alice, question).adapter
    assert mem.model.served_name(ref) in served and any(alice in name for name in served)
    # Forgetting alice's fact deletes her adapter, and the server lets it go.
    mem.forget(alice, [fact.id])
    assert not any(alice in name for name in mem.model.served_adapters())
    assert find_traces(mem, [fact]) == []
    assert any(bob in name for name in mem.model.served_adapters())
