"""Authentication for the police API and the web console: tokens, and a brake on guessing.

``Gate.check(presented, client)`` answers who holds a token, counting failures: after
``max_failures`` failed attempts within ``window`` seconds from one client address — or with one
presented token (a revoked token a system keeps retrying) — further attempts from it are
refused with 429 and ``Retry-After`` until the window has passed, without looking at the token.
The counts live in the process's memory (each worker counts its own; a restart forgets them):
a brake on guessing, not an account lock-out — 256-bit tokens cannot be guessed anyway, the
brake keeps the attempts from costing anything and makes them visible in the log and metrics.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import Counter

from imeisync.adapters.tokens import TokenInfo, TokenStore

log = logging.getLogger("imeisync.api")

REQUESTS = Counter("imeisync_api_requests", "Requests to the police API and console",
                   ["area", "status"])
AUTH_FAILURES = Counter("imeisync_api_auth_failures",
                        "Failed authentications at the police API and console", ["channel"])
AUTH_THROTTLED = Counter("imeisync_api_auth_throttled",
                         "Authentication attempts refused by the failure rate limit", ["channel"])


class FailureLimiter:
    """At most ``max_failures`` failures per key within ``window`` seconds."""

    def __init__(self, max_failures: int = 10, window: float = 300.0, *,
                 max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, key: str) -> int | None:
        """Seconds until ``key`` may try again, or None if it may now."""
        with self._lock:
            times = self._failures.get(key)
            if not times:
                return None
            self._expire(times)
            if len(times) < self.max_failures:
                return None
            return max(1, int(times[0] + self.window - self.clock()) + 1)

    def fail(self, key: str) -> None:
        with self._lock:
            if key not in self._failures and len(self._failures) >= self.max_keys:
                self._prune()
            times = self._failures.setdefault(key, deque())
            self._expire(times)
            times.append(self.clock())

    def succeed(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)

    def _expire(self, times: deque[float]) -> None:
        limit = self.clock() - self.window
        while times and times[0] <= limit:
            times.popleft()

    def _prune(self) -> None:
        for key in list(self._failures):
            self._expire(self._failures[key])
            if not self._failures[key]:
                del self._failures[key]
        while len(self._failures) >= self.max_keys:  # still full: forget the oldest
            del self._failures[next(iter(self._failures))]


class Throttled(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"too many failed sign-in attempts; retry in {retry_after} s")
        self.retry_after = retry_after


class Gate:
    """Tokens plus the failure limit, shared by the API and the console of one app."""

    def __init__(self, tokens: Callable[[], TokenStore], limiter: FailureLimiter | None = None):
        self._tokens = tokens
        self.limiter = limiter or FailureLimiter()

    @property
    def tokens(self) -> TokenStore:
        return self._tokens()

    def check(self, presented: str | None, client: str, channel: str) -> TokenInfo | None:
        """The token's holder; None when it is wrong (counted); ``Throttled`` when the client
        or this token has failed too often lately."""
        keys = [f"client:{client}"]
        if presented:
            digest = hashlib.sha256(presented.encode("utf-8", "replace")).hexdigest()[:32]
            keys.append(f"token:{digest}")
        waits = [w for w in map(self.limiter.retry_after, keys) if w is not None]
        if waits:
            AUTH_THROTTLED.labels(channel).inc()
            raise Throttled(max(waits))
        info = self.tokens.authenticate(presented) if presented else None
        if info is None:
            AUTH_FAILURES.labels(channel).inc()
            for key in keys:
                self.limiter.fail(key)
            log.warning("%s: failed authentication from %s (%s)", channel, client,
                        "no token" if not presented else "unknown or revoked token")
        return info
