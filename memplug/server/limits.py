"""Requests per second per API key, as a token bucket in each server process."""

from __future__ import annotations

import math
import threading
import time

from ..errors import RateLimited


class RateLimiter:
    """Allows each key ``rate`` requests per second on average and up to ``burst`` at once.

    The buckets live in this process: with N server processes behind one address a
    key may reach N times the rate, which the operator divides out when setting it.
    ``rate`` 0 turns the limit off (a key's own rate still applies).
    """

    def __init__(self, rate: float, burst: float | None = None):
        if rate < 0 or (burst is not None and burst < 1):
            raise ValueError(f"rate must be >= 0 and burst >= 1, got {rate} and {burst}")
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key_id: str, own_rate: float | None = None) -> None:
        """Spend one request of ``key_id``; :class:`RateLimited` (with the wait) when none is left."""
        rate = own_rate or self.rate
        if not rate:
            return
        burst = max(1.0, self.burst if self.burst is not None and own_rate is None else 2 * rate)
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key_id, (burst, now))
            tokens = min(burst, tokens + (now - at) * rate)
            if tokens < 1:
                self._buckets[key_id] = (tokens, now)
                wait = (1 - tokens) / rate
                raise RateLimited(f"API key {key_id} is over its limit of {rate:g} requests per second; "
                                  f"retry in {wait:.2f} s", retry_after=math.ceil(wait * 100) / 100)
            self._buckets[key_id] = (tokens - 1, now)
