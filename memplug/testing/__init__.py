"""Conformance checks for memory tiers, shipped as a pytest plugin.

A tier author subclasses :class:`TierConformance` in their own tests::

    from memplug.testing import TierConformance
    from my_tier import MyTier

    class TestMyTier(TierConformance):
        plugin = MyTier            # a class, an instance, or an installed entry-point name

and runs pytest: every built-in tier passes the same checks. Installing memplug
registers the fixtures below through the ``pytest11`` entry point, so nothing else
is needed: a fresh embedded Postgres is started in a temporary folder (or
``MEMPLUG_TEST_DSN`` is used), and every test works in scopes of its own.
"""

from __future__ import annotations

from .conformance import TierConformance
from .scan import Trace, assert_no_traces, find_traces

__all__ = ["TierConformance", "Trace", "assert_no_traces", "find_traces"]
