"""The measured-cost ledger: what each tier's reads and writes cost on this deployment.

Tiers measure as they work (:meth:`CostLedger.measure`); the cost policy reads
the running means back (:meth:`CostLedger.measured`). The figures live in
Postgres (``tier_costs``), so every process and worker of a deployment shares them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import psycopg

from .errors import InvalidInput
from .store import Store

FLUSH_EVERY = 20  # buffered samples of one metric before they are written
WINDOW = 20  # samples a running mean remembers, about


class CostLedger:
    """Running means of measured costs, ``(tier, metric) -> mean``, shared through Postgres."""

    def __init__(self, store: Store):
        self.store = store
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], tuple[float, int]] = {}

    def measure(self, tier: str, metric: str, value: float, db: psycopg.Connection | None = None) -> None:
        """Fold one measurement into the running mean of ``tier``/``metric``.

        With ``db`` the sample is written in the caller's transaction, and the shared row
        stays locked until that transaction ends; without, it is buffered and written
        every ``FLUSH_EVERY`` samples (reads measure often and should not pay a write
        each), at consolidation and on close.
        """
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise InvalidInput(f"measurement {tier}/{metric} must be a finite number >= 0, got {value!r}")
        if db is not None:
            fold(db, [(tier, metric, value, 1)])
            return
        with self._lock:
            total, n = self._pending.get((tier, metric), (0.0, 0))
            self._pending[(tier, metric)] = (total + value, n + 1)
            full = n + 1 >= FLUSH_EVERY
        if full:
            self.flush()

    def flush(self) -> None:
        """Write buffered measurements now."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if pending:
            with self.store.transaction() as db:
                fold(db, [(t, m, total / n, n) for (t, m), (total, n) in sorted(pending.items())])

    def measured(self, tier: str) -> dict[str, tuple[float, int]]:
        """A tier's measured costs: ``{metric: (mean, samples)}``."""
        self.flush()
        with self.store.transaction() as db:
            rows = db.execute("SELECT metric, value, samples FROM tier_costs WHERE tier = %s", (tier,)).fetchall()
        return {r[0]: (float(r[1]), int(r[2])) for r in rows}


def fold(db: psycopg.Connection, samples: Sequence[tuple[str, str, float, int]]) -> None:
    """Fold ``(tier, metric, mean, count)`` samples into running means over about ``WINDOW`` samples."""
    for tier, metric, mean, count in samples:
        db.execute(
            """
            INSERT INTO tier_costs AS t (tier, metric, value, samples) VALUES (%(t)s, %(m)s, %(v)s, %(n)s)
            ON CONFLICT (tier, metric) DO UPDATE SET
                value = t.value + (EXCLUDED.value - t.value)
                        * least(1.0, EXCLUDED.samples::float / least(t.samples + EXCLUDED.samples, %(w)s)),
                samples = t.samples + EXCLUDED.samples, at = now()
            """,
            {"t": tier, "m": metric, "v": mean, "n": count, "w": WINDOW},
        )
