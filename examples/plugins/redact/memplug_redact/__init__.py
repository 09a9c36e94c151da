"""Plugin ``redact``: masks e-mail addresses, phone numbers and card numbers before anything
is stored, by a ``wrapper=True`` implementation of ``memplug_ingest`` (it runs around every
other plugin's, so none of them sees the original text).

Per scope: option ``redact_rules`` maps scope prefixes to the kinds masked there, the
longest matching prefix winning; ``*`` is the default::

    Memory(options={"redact_rules": {"*": "email,phone,card", "support-bot": "card",
                                     "alice/notes": ""}})

A scope is written ``user/agent/session`` (see ``Scope.parse``); ``alice/notes`` covers
user alice's agent ``notes`` and its sessions. Metadata values that are strings are
masked too (option ``redact_metadata``, true).

An example: installing it does not activate it (``opt_in``); name it in ``MEMPLUG_PLUGINS``
or pass it in code, ``Memory(plugins=[Redactor()])``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from memplug.plugin import ConfigError, Option, flag, hookimpl

KINDS = ("email", "phone", "card")
EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# 13 to 19 digits, in groups separated by single spaces or dashes.
CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
# An optional +, then 7 to 15 digits with spaces, dots, dashes or one pair of brackets between them.
PHONE = re.compile(r"(?<![\w+])\+?\(?\d(?:[\d .()-]{5,}\d)(?!\d)")


def luhn(digits: str) -> bool:
    total = 0
    for n, ch in enumerate(reversed(digits)):
        d = int(ch)
        if n % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def mask(text: str, kinds: frozenset[str]) -> str:
    """``text`` with every e-mail address, card number and phone number of ``kinds`` masked."""
    if "email" in kinds:
        text = EMAIL.sub("[email]", text)
    if "card" in kinds:
        text = CARD.sub(lambda m: "[card]" if luhn(re.sub(r"\D", "", m.group())) else m.group(), text)
    if "phone" in kinds:
        def phone(m: re.Match) -> str:
            digits = re.sub(r"\D", "", m.group())
            return "[phone]" if 7 <= len(digits) <= 15 else m.group()
        text = PHONE.sub(phone, text)
    return text


def rules_mapping(raw: Any) -> dict[str, Any]:
    """The ``redact_rules`` value: a mapping, or its JSON text (from ``MEMPLUG_REDACT_RULES``)."""
    rules = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(rules, dict):
        raise ValueError(f"expected a mapping of scope prefixes to kinds, got {type(rules).__name__}")
    return rules


def parse_rules(raw: Any) -> dict[str, frozenset[str]]:
    rules = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(rules, dict):
        raise ConfigError(f"redact_rules must map scope prefixes to kinds, got {type(rules).__name__}")
    out = {}
    for prefix, kinds in rules.items():
        names = kinds.split(",") if isinstance(kinds, str) else list(kinds)
        chosen = frozenset(k.strip() for k in names if k.strip())
        unknown = chosen - set(KINDS)
        if unknown:
            raise ConfigError(f"redact_rules[{prefix!r}] names unknown kind(s) {sorted(unknown)}; known: {KINDS}")
        out[str(prefix).strip("/")] = chosen
    out.setdefault("*", frozenset(KINDS))
    return out


class Redactor:
    """Masks personal data in text (and string metadata) before it is stored."""

    name = "redact"
    opt_in = True
    options = (
        Option("redact_rules", rules_mapping, {"*": ",".join(KINDS)}, "Kinds masked per scope prefix "
               "(email, phone, card); the longest matching prefix wins, * is the default.", metavar="mapping"),
        Option("redact_metadata", flag, True, "Mask string metadata values too.", metavar="bool"),
    )

    @hookimpl
    def memplug_configure(self, memory):
        self.rules = parse_rules(memory.option("redact_rules"))
        self.metadata = memory.option("redact_metadata")

    def kinds_for(self, scope) -> frozenset[str]:
        key = "/".join(scope.key)  # user/agent/session, absent parts empty
        best, best_len = self.rules["*"], -1
        for prefix, kinds in self.rules.items():
            if prefix == "*":
                continue
            if (key == prefix or key.startswith(prefix + "/")) and len(prefix) > best_len:
                best, best_len = kinds, len(prefix)
        return best

    @hookimpl(wrapper=True)
    def memplug_ingest(self, scope, records):
        kinds = self.kinds_for(scope)
        if kinds:
            for rec in records:
                rec["text"] = mask(rec["text"], kinds)
                if self.metadata:
                    rec["metadata"] = {k: mask(v, kinds) if isinstance(v, str) else v
                                       for k, v in rec["metadata"].items()}
        return (yield)
