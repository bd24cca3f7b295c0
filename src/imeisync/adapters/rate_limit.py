"""The one rate limiter: a token bucket per key, in the process's memory, with a bounded
number of keys. The police API and console (per address, per token, failed sign-ins, foreign
look-ups per user) and the reference registry (per member, failed signatures per address) all
use it.

A rate is written ``N/s``, ``N/m`` or ``N/h``: a key may spend N at once (the bucket holds N)
and then one more every period/N. ``take(key)`` spends one and answers None, or — when the
bucket is empty — the whole seconds until one is back (the ``Retry-After``), spending nothing.
``wait(key)`` answers the same without spending (a brake that counts only failures).

Memory stays bounded whatever the callers do: at most ``max_keys`` buckets; a new key beyond
that evicts the least recently used one (which then starts full again — an attacker needs more
addresses than ``max_keys`` to gain anything, and then each address still gets only N). Each
worker process counts its own; a restart forgets the counts.

>>> limiter = RateLimiter.parse("2/s", clock=lambda: 100.0)
>>> limiter.take("a"), limiter.take("a"), limiter.take("a"), limiter.take("b")
(None, None, 1, None)
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_KEYS = 10_000
_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"\s*(\d{1,9})\s*/\s*([smh])\s*")


def parse_rate(text: str) -> tuple[int, float]:
    """``"20/s"`` → (20, 1.0): how many per how many seconds. TypeError when malformed (the
    config's validators turn that into a message naming the key)."""
    match = _RATE.fullmatch(text) if isinstance(text, str) else None
    if not match or int(match.group(1)) < 1:
        raise TypeError("a rate N/s, N/m or N/h with N at least 1, e.g. 20/s")
    return int(match.group(1)), _PERIODS[match.group(2)]


def check_rate(value: object) -> str:
    """A config validator: the rate text, unchanged, once it parses."""
    parse_rate(value)  # type: ignore[arg-type]
    return str(value).strip()


class RateLimiter:
    """At most ``count`` per ``period`` seconds per key (a token bucket of ``count``)."""

    def __init__(self, count: int, period: float, *, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic):
        self.count = count
        self.period = period
        self.max_keys = max_keys
        self.clock = clock
        self._per_unit = period / count  # seconds for one unit to come back
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # units, at
        self._lock = threading.Lock()

    @classmethod
    def parse(cls, rate: str, **options: object) -> RateLimiter:
        count, period = parse_rate(rate)
        return cls(count, period, **options)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"RateLimiter({self.count}/{self.period:g}s, {len(self._buckets)} keys)"

    def _level(self, key: str, now: float) -> float:
        units, at = self._buckets.get(key, (self.count, now))
        return min(float(self.count), units + (now - at) / self._per_unit)

    def _retry_after(self, level: float) -> int:
        return max(1, math.ceil((1.0 - level) * self._per_unit))

    def wait(self, key: str) -> int | None:
        """Seconds until ``key`` may spend one, or None if it may now (nothing is spent)."""
        with self._lock:
            level = self._level(key, self.clock())
            return None if level >= 1.0 else self._retry_after(level)

    def take(self, key: str) -> int | None:
        """Spend one for ``key``: None when admitted, else the seconds to wait."""
        with self._lock:
            now = self.clock()
            level = self._level(key, now)
            if level < 1.0:
                self._buckets[key] = (level, now)
                self._buckets.move_to_end(key)
                return self._retry_after(level)
            if key not in self._buckets and len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)  # the least recently used key
            self._buckets[key] = (level - 1.0, now)
            self._buckets.move_to_end(key)
            return None

    def forget(self, key: str) -> None:
        with self._lock:
            self._buckets.pop(key, None)

    @property
    def tracked(self) -> int:
        """How many keys it holds now (at most ``max_keys``)."""
        return len(self._buckets)
