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
