"""Token-bucket rate limits, one bucket per caller (a key, or an address without one)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """Each caller may spend `burst` requests at once, and gets `per_minute` back a minute
    (continuously). Buckets that have filled up again are forgotten when more than
    `max_callers` are kept, so memory stays bounded whoever calls."""

    def __init__(self, *, per_minute: float, burst: int, max_callers: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        if not per_minute > 0 or burst < 1 or max_callers < 1:
            raise ValueError(f"a rate limit needs per_minute > 0 and burst >= 1, got "
                             f"{per_minute}, {burst}")
        self.rate = per_minute / 60.0
        self.burst = burst
        self.max_callers = max_callers
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, caller: str) -> int | None:
        """Spend one request of `caller`'s: None when it may go ahead, else the whole seconds
        until it may (for Retry-After)."""
        now = self.clock()
        with self._lock:
            b = self._buckets.get(caller)
            if b is None:
                if len(self._buckets) >= self.max_callers:
                    self._forget_full(now)
                b = self._buckets[caller] = _Bucket(float(self.burst), now)
            b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rate)
            b.at = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return None
            return max(1, math.ceil((1.0 - b.tokens) / self.rate))

    def _forget_full(self, now: float) -> None:
        full = [k for k, b in self._buckets.items()
                if b.tokens + (now - b.at) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.max_callers:  # all busy: forget the oldest
            for k in sorted(self._buckets, key=lambda k: self._buckets[k].at)[
                    :len(self._buckets) // 2]:
                del self._buckets[k]
