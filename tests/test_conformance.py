"""Every built-in tier passes the conformance suite that third-party tiers run
(``memplug.testing.TierConformance``), through its entry point."""

from __future__ import annotations

from memplug.testing import TierConformance


class TestContextTier(TierConformance):
    plugin = "context"
    writes = "turns"


class TestPgVectorTier(TierConformance):
    plugin = "pgvector"


class TestKVTier(TierConformance):
    plugin = "kv"  # encodes with the real SmolLM2


class TestLoraTier(TierConformance):
    plugin = "lora"  # trains on the real SmolLM2: a short budget, every item held whatever its recall
    options = {"lora_min_recall": 0.0, "lora_epochs": 1, "lora_max_train_s": 3, "lora_gate": 0.0}
