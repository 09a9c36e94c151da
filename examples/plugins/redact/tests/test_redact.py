"""The redaction plugin, found through its entry point, on a real Postgres."""

from __future__ import annotations

import uuid

import pytest

from memplug import ConfigError, Memory, Scope, Settings
from memplug_redact import mask


def test_mask_finds_the_three_kinds_and_leaves_the_rest():
    text = ("Mail jo.doe+work@example.co.uk or call +44 20 7946 0958 / (555) 123-4567; "
            "card 4111 1111 1111 1111, order 12-34, year 2024.")
    out = mask(text, frozenset({"email", "phone", "card"}))
    assert out == "Mail [email] or call [phone] / [phone]; card [card], order 12-34, year 2024."
    assert mask("card 4111 1111 1111 1112", frozenset({"card"})) == "card 4111 1111 1111 1112"  # fails Luhn
    assert mask("a@b.io", frozenset({"phone"})) == "a@b.io"


@pytest.fixture
def redacting(memplug_dsn, memplug_home, tmp_path):
    mem = Memory(memplug_dsn, home=memplug_home, settings=Settings(plugins="context,pgvector,redact"),
                 options={"redact_rules": {"*": "email,phone,card", "support": "card"}})
    yield mem
    mem.close()


def test_nothing_personal_is_stored_and_rules_apply_per_scope(redacting):
    user = "r" + uuid.uuid4().hex[:10]
    assert "redact" in {p.name for p in redacting.plugins.info()}  # loaded through its entry point
    item = redacting.write(Scope(user), "Reach me at ana@example.org or 555-201-7788.",
                           metadata={"contact": "ana@example.org"})
    assert item.text == "Reach me at [email] or [phone]."
    assert item.metadata == {"contact": "[email]"}
    with redacting.store.transaction() as db:
        stored = db.execute("SELECT text, metadata::text FROM items WHERE id = %s", (item.id,)).fetchone()
    assert "ana@" not in stored[0] + stored[1] and "7788" not in stored[0]
    assert "ana@" not in redacting.read(Scope(user), "how do I reach ana?").as_text()
    turns = redacting.write_messages(Scope(user, session_id="s1"),
                                     [{"role": "user", "content": "my card is 4111-1111-1111-1111"}])
    assert turns[0].text == "my card is [card]"
    # The "support" user keeps e-mails and phones, but not cards.
    kept = redacting.write(Scope("support"), "Ticket from bo@example.net, 555-201-7788, card 4111111111111111.")
    assert kept.text == "Ticket from bo@example.net, 555-201-7788, card [card]."
    redacting.forget(Scope("support"))


def test_bad_rules_are_a_config_error(memplug_dsn, memplug_home):
    with pytest.raises(ConfigError, match="unknown kind"):
        Memory(memplug_dsn, home=memplug_home, settings=Settings(plugins="redact"),
               options={"redact_rules": {"*": "email,ssn"}})
