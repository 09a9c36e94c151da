"""Bad input gets a MemplugError subclass naming what was wrong, and nothing is half-written."""

from __future__ import annotations

import pytest

from memplug import (
    Budget,
    ConfigError,
    InvalidInput,
    InvalidScope,
    Memory,
    MemplugError,
    Scope,
    Settings,
    StoreUnavailable,
)

BAD_TEXT = [
    ("", "text is empty"),
    ("   \n\t", "text is empty"),
    ("x" * 32_001, "32001 characters; the limit is 32000"),
    ("abc\x00def", "NUL byte"),
    ("lone \ud800 surrogate", "lone surrogate"),
    (42, "text must be a str"),
    (b"bytes", "text must be a str or a list of str"),
    (None, "text must be a str or a list of str"),
]


@pytest.mark.parametrize(("text", "message"), BAD_TEXT)
def test_bad_text(memory, user, text, message):
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(")):
        memory.write(Scope(user), text)
    assert memory.stats(Scope(user))["items"] == 0


def test_one_bad_text_in_a_batch_writes_nothing(memory, user):
    with pytest.raises(InvalidInput, match=r"text\[2\] contains a NUL byte"):
        memory.write(Scope(user), ["fine", "also fine", "not\x00fine"])
    assert memory.stats(Scope(user))["items"] == 0


def test_text_limit_is_configurable(make_memory, user):
    mem = make_memory(options={"max_text_chars": 10})
    with pytest.raises(InvalidInput, match="the limit is 10"):
        mem.write(Scope(user), "eleven char")
    assert mem.write(Scope(user), "ten chars!").text == "ten chars!"


BAD_METADATA = [
    (["not", "a", "dict"], "metadata must be a dict"),
    ({1: "int key"}, "non-string key"),
    ({"when": object()}, "is a object, which is not JSON"),
    ({"ratio": float("nan")}, "which JSON cannot hold"),
    ({"nested": {"deep": "nul\x00"}}, r"metadata\['nested'\]\['deep'\] contains a NUL byte"),
    ({"blob": "x" * 70_000}, "the limit is 65536"),
]


@pytest.mark.parametrize(("metadata", "message"), BAD_METADATA)
def test_bad_metadata(memory, user, metadata, message):
    with pytest.raises(InvalidInput, match=message):
        memory.write(Scope(user), "a fine text", metadata=metadata)
    assert memory.stats(Scope(user))["items"] == 0


BAD_SCOPES = [
    (lambda: Scope(""), "user_id must not be empty"),
    (lambda: Scope(None), "user_id is required"),
    (lambda: Scope(123), "user_id must be a string"),
    (lambda: Scope("../etc"), "may use only letters"),
    (lambda: Scope("a..b"), "may not contain '..'"),
    (lambda: Scope("alice", "x/y"), "agent_id='x/y' may use only"),
    (lambda: Scope("alice", session_id="s 1"), "session_id='s 1' may use only"),
    (lambda: Scope("u" * 129), "the limit is 128"),
    (lambda: Scope.of({"user_id": "alice", "tenant": "acme"}), "unknown scope field"),
    (lambda: Scope.of(42), "expected a Scope"),
    (lambda: Scope.parse("a/b/c/d"), "at most user/agent/session"),
]


@pytest.mark.parametrize(("make", "message"), BAD_SCOPES)
def test_bad_scope(make, message):
    with pytest.raises(InvalidScope, match=message):
        make()


def test_bad_scope_through_memory(memory):
    with pytest.raises(InvalidScope):
        memory.write("../../etc/passwd", "text")
    with pytest.raises(InvalidScope):
        memory.read({"user": "alice"}, "query")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, s: m.read(s, ""), "query is empty"),
        (lambda m, s: m.read(s, "q", budget={"tokens": 5}), "budget must be a memplug.Budget"),
        (lambda m, s: Budget(tokens=0), "Budget.tokens must be a positive integer"),
        (lambda m, s: Budget(k=-1), "Budget.k must be a positive integer"),
        (lambda m, s: m.read(s, "q", filters="source=chat"), "filters must be a dict"),
        (lambda m, s: m.read(s, "q", filters={"a": {1, 2}}), "not JSON"),
        (lambda m, s: m.forget(s, "12"), "item_ids must be a list of ints"),
        (lambda m, s: m.forget(s, [0]), "positive ints"),
        (lambda m, s: m.forget(s, [True]), "positive ints"),
        (lambda m, s: m.write_messages(s, [{"role": "user", "content": "hi"}]), "needs a scope with a session_id"),
        (lambda m, s: m.write_messages(Scope(s.user_id, session_id="s"), [{"role": "robot", "content": "x"}]),
         "role is 'robot'"),
        (lambda m, s: m.write_messages(Scope(s.user_id, session_id="s"), [{"role": "user"}]), "content must be a str"),
        (lambda m, s: m.write_messages(Scope(s.user_id, session_id="s"), []), "messages is empty"),
        (lambda m, s: m.write_messages(Scope(s.user_id, session_id="s"), "hello"), "messages must be a list"),
        (lambda m, s: m.write(s, []), "empty list"),
    ],
)
def test_bad_arguments(memory, user, call, message):
    s = Scope(user)
    with pytest.raises(InvalidInput, match=message):
        call(memory, s)
    assert memory.stats(s)["items"] == 0


def test_sql_looking_input_is_plain_data(memory, user):
    s = Scope(user)
    evil = "'; DROP TABLE items; --"
    item = memory.write(s, evil, metadata={"source": evil, "x')) OR 1=1 --": 1})
    assert memory.read(s, "DROP TABLE", filters={"source": evil}).hits[0].item.id == item.id
    assert memory.read(s, "DROP TABLE", filters={"source": "' OR '1'='1"}).hits == ()
    assert memory.stats(s)["items"] == 1


def test_invalid_dsn():
    with pytest.raises(ConfigError, match="not a valid Postgres connection string") as e:
        Memory("this is = not a dsn =", load_entrypoints=False)
    assert "this is" not in str(e.value)


def test_unreachable_postgres_names_it_without_the_password():
    with pytest.raises(StoreUnavailable, match="cannot reach Postgres") as e:
        Memory("postgresql://app:s3cret-pw@127.0.0.1:1/nowhere?connect_timeout=1", load_entrypoints=False)
    assert "s3cret-pw" not in str(e.value) and "***" in str(e.value)
    assert isinstance(e.value, MemplugError)


def test_bad_option(dsn):
    with pytest.raises(ConfigError, match=r"option pgvector_mode='fuzzy' \(plugin pgvector\) must be one of hybrid"):
        Memory(dsn, options={"pgvector_mode": "fuzzy"})
    with pytest.raises(ConfigError, match=r"option context_tokens='lots' \(plugin context\) is not a valid int"):
        Memory(dsn, options={"context_tokens": "lots"})
    # Values of the right type that mean nothing: named, not taken or left to fail later.
    for options, message in (({"pool_size": 0}, r"option pool_size=0 \(memplug\) is out of range: it must be >= 1"),
                             ({"pool_size": -3}, r"option pool_size=-3 \(memplug\) is out of range"),
                             ({"heat_half_life_s": 0}, r"option heat_half_life_s=0 \(memplug\) .* must be > 0"),
                             ({"context_tokens": -5}, r"option context_tokens=-5 \(plugin context\) .* must be >= 0"),
                             ({"context_idle_seconds": -1}, r"option context_idle_seconds=-1 .* must be >= 0"),
                             ({"pool_size": True}, r"option pool_size=True .* not a valid int"),
                             ({"pool_size": 2.5}, r"option pool_size=2.5 .* not a whole number")):
        with pytest.raises(ConfigError, match=message):
            Memory(dsn, options=options)
    with pytest.raises(ConfigError, match=r"option policy='frequncy' \(plugin (cost|frequency)\) must be one of cost, "
                                          r"frequency, none"):
        Memory(dsn, settings=Settings(plugins="context,pgvector,cost,frequency"), options={"policy": "frequncy"})
    with pytest.raises(ConfigError, match=r"option lora_served=1.5 \(plugin lora\) is out of range: it must be >= 0, "
                                          r"<= 1"):
        Memory(dsn, settings=Settings(plugins="context,pgvector,lora"),
               options={"lora_served": 1.5, "lora_max_train_s": 0, "lora_rank": 4})
    with pytest.raises(ConfigError, match=r"option lora_contrast_tokens=-1 \(plugin lora\) is out of range"):
        Memory(dsn, settings=Settings(plugins="context,pgvector,lora"),
               options={"lora_contrast_tokens": -1, "lora_weight_decay": -0.5})
    with pytest.raises(ConfigError, match=r"option lora_kl=-1 \(plugin lora\) is out of range"):
        Memory(dsn, settings=Settings(plugins="context,pgvector,lora"), options={"lora_kl": -1})
    with Memory(dsn, settings=Settings(plugins="context,pgvector,lora"), options={"lora_kl": 4}) as memory:
        assert memory.plugins.pm.get_plugin("lora").config.kl == 4.0
    with pytest.raises(ConfigError, match=r"option lora_isolate='maybe' \(plugin lora\) is not a valid bool"):
        Memory(dsn, settings=Settings(plugins="context,pgvector,lora"), options={"lora_isolate": "maybe"})


def test_an_unknown_option_names_its_plugin_and_the_closest_valid_name(dsn, monkeypatch):
    # It used to be ignored without a word: a typo left the default in place.
    with pytest.raises(ConfigError, match=r"option 'context_token' is not a memplug setting; did you mean "
                                          r"context_tokens \(of plugin context\)\?"):
        Memory(dsn, options={"context_token": 10})
    with pytest.raises(ConfigError, match=r"did you mean heat_half_life_s \(of memplug\)"):
        Memory(dsn, options={"heat_halflife_s": 10})
    with pytest.raises(ConfigError, match=r"option 'nothing_like_it' is not a memplug setting; `memplug options`"):
        Memory(dsn, options={"nothing_like_it": 1})
    # The same through the environment, named as it was given.
    monkeypatch.setenv("MEMPLUG_CONTEXT_TOKEN", "10")
    with pytest.raises(ConfigError, match=r"MEMPLUG_CONTEXT_TOKEN is not a memplug setting; did you mean "
                                          r"MEMPLUG_CONTEXT_TOKENS \(of plugin context\)"):
        Memory(dsn)
    monkeypatch.delenv("MEMPLUG_CONTEXT_TOKEN")
    monkeypatch.setenv("MEMPLUG_CONTEXT_TOKENS", "-1")
    with pytest.raises(ConfigError, match=r"MEMPLUG_CONTEXT_TOKENS='-1' \(plugin context\) is out of range"):
        Memory(dsn)
    monkeypatch.setenv("MEMPLUG_CONTEXT_TOKENS", "64")
    # An option of an installed plugin that MEMPLUG_PLUGINS leaves out is still a setting, and checked.
    with Memory(dsn, options={"kv_codec": "int8"}) as mem:
        assert mem.option("context_tokens") == 64 and mem.option("kv_codec") == "int8"
        assert mem.plugins.pm.get_plugin("kv") is None
    with pytest.raises(ConfigError, match=r"option kv_codec='int5' \(plugin kv\) must be one of"):
        Memory(dsn, options={"kv_codec": "int5"})
    # Code's options win over the environment; variables the test kit and the host read are not options.
    monkeypatch.setenv("MEMPLUG_TEST_ANYTHING", "1")
    with Memory(dsn, options={"context_tokens": 32}) as mem:
        assert mem.option("context_tokens") == 32


def test_option_values_are_read_as_a_person_writes_them(dsn, monkeypatch, caplog):
    with pytest.raises(ConfigError, match="option names must be strings, got 1"):
        Memory(dsn, options={1: 2})
    with pytest.raises(ConfigError, match=r"option heat_half_life_s=inf \(memplug\) is not a finite number"):
        Memory(dsn, options={"heat_half_life_s": float("inf")})
    with pytest.raises(ConfigError, match=r"option lora_lr=1 \(plugin lora\) is out of range: it must be > 0, < 1"):
        Memory(dsn, options={"lora_lr": 1})
    with pytest.raises(ConfigError, match=r"option lora_targets=' , ' \(plugin lora\) names no module"):
        Memory(dsn, settings=Settings(plugins="context,pgvector,lora"), options={"lora_targets": " , "})
    monkeypatch.setenv("MEMPLUG_MAX_KV_BYTES", "1e8")
    with Memory(dsn, options={"artifacts": ""}) as mem:  # an empty path is no path: the default
        assert mem.option("max_kv_bytes") == 100_000_000
        assert str(mem.artifacts.root).endswith("artifacts")
        # An option of an installed plugin that is not loaded here still has its value.
        assert mem.plugins.pm.get_plugin("cost") is None and mem.option("policy") == "cost"
    # Set for a plugin that is installed but not active here: it does nothing, and a warning says why.
    with caplog.at_level("WARNING", logger="memplug.plugins"), Memory(dsn, options={"redact_rules": {"*": ""}}):
        pass
    assert "option redact_rules is set, but no plugin that reads it is loaded here" in caplog.text
    assert "(redact: opt-in, active only when MEMPLUG_PLUGINS names it (+redact))" in caplog.text


# -- the corpus: tests/bad_input_corpus.py -----------------------------------------------


@pytest.fixture(scope="module")
def corpus_memory(dsn):
    with Memory(dsn) as mem:
        yield mem


@pytest.fixture
def probe(corpus_memory, users, tmp_path):
    from bad_input_corpus import Probe

    from memplug.artifacts import ArtifactStore

    me, them = users(2)
    secret = corpus_memory.write(Scope(them), f"{them}'s locker code is 5512.")
    (tmp_path / "outside").mkdir()
    return Probe(corpus_memory, Scope(me), Scope(them), secret, ArtifactStore(tmp_path / "artifacts"),
                 tmp_path / "outside")


def _files(root):
    """The regular files under ``root`` (links are not followed)."""
    import os

    paths = (os.path.join(d, n) for d, _, files in os.walk(root) for n in files)
    return sorted(p for p in paths if os.path.isfile(p) and not os.path.islink(p))


def _corpus():
    from bad_input_corpus import CORPUS

    return CORPUS


def test_the_corpus_is_large_and_its_names_distinct():
    names = [case.name for case in _corpus()]
    assert len(names) >= 50 and len(set(names)) == len(names)


@pytest.mark.parametrize("case", _corpus(), ids=lambda case: case.name)
def test_corpus(probe, case):
    from bad_input_corpus import Refused

    mem = probe.mem
    if isinstance(case, Refused):
        before = _files(probe.artifacts.root)
        with pytest.raises(case.error, match=case.match) as caught:
            case.call(probe)
        assert isinstance(caught.value, MemplugError)
        assert mem.stats(probe.scope)["items"] == 0, "a refused call wrote something"
        assert _files(probe.artifacts.root) == before, "a refused call left a file in the artifact root"
    else:
        case.check(probe, case.call(probe))
    assert list(probe.outside.iterdir()) == [], "something was written outside the artifact root"
    assert mem.get(probe.other, [probe.secret.id])[0].text == probe.secret.text
    assert mem.stats(probe.other)["items"] == 1
