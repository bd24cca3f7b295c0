"""Authentication for the police API and the web console: tokens, and a brake on guessing.

``Gate.check(presented, client)`` answers who holds a token, counting failures: after
``max_failures`` failed attempts from one client address — or with one presented token (a
revoked token a system keeps retrying) — further attempts from it are refused with 429 and
``Retry-After`` without looking at the token, one more allowed every ``window / max_failures``
seconds (10 and 300 s: one try every 30 s; ``adapters/rate_limit.py``).
``Gate.admit(name)`` then spends one of the holder's requests (``[api] token_rate``).
The counts live in the process's memory (each worker counts its own; a restart forgets them):
a brake on guessing, not an account lock-out — 256-bit tokens cannot be guessed anyway, the
brake keeps the attempts from costing anything and makes them visible in the log and metrics.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from imeisync.adapters.rate_limit import RateLimiter
from imeisync.adapters.tokens import TokenInfo, TokenStore
from imeisync.domain.errors import TooMany

log = logging.getLogger("imeisync.api")

REQUESTS = Counter("imeisync_api_requests", "Requests to the police API and console",
                   ["area", "status"])
AUTH_FAILURES = Counter("imeisync_api_auth_failures",
                        "Failed authentications at the police API and console", ["channel"])
AUTH_THROTTLED = Counter("imeisync_api_auth_throttled",
                         "Authentication attempts refused by the failure rate limit", ["channel"])
RATE_LIMITED = Counter("imeisync_api_rate_limited",
                       "Requests refused with 429 by a rate limit", ["channel", "limit"])


def failure_limiter(max_failures: int = 10, window: float = 300.0,
                    **options: Any) -> RateLimiter:
    """The brake on guessing: ``max_failures`` failures at once, then one more per
    ``window / max_failures`` seconds (the one limiter, ``adapters/rate_limit.py``)."""
    return RateLimiter(max_failures, window, **options)


def throttled(retry_after: int) -> TooMany:
    return TooMany("too many failed authentications from this client or with this token",
                   f"wait {retry_after} seconds, then use a valid token", retry_after,
                   code="too_many_failures")


class Gate:
    """Tokens plus the failure limit and the per-token rate, shared by the API and the
    console of one app."""

    def __init__(self, tokens: Callable[[], TokenStore], limiter: RateLimiter | None = None,
                 per_token: RateLimiter | None = None):
        self._tokens = tokens
        self.limiter = limiter or failure_limiter()
        self.per_token = per_token or RateLimiter(20, 1.0)

    def admit(self, name: str, channel: str) -> None:
        """Spend one of the token holder's requests; ``TooMany`` past ``[api] token_rate``
        (the token's requests are refused, other holders are not affected)."""
        wait = self.per_token.take(name)
        if wait is not None:
            RATE_LIMITED.labels(channel, "token").inc()
            raise TooMany(f"too many requests with the token {name!r}",
                          f"slow down: wait {wait} seconds; the limit is [api] token_rate "
                          f"({self.per_token.count} per {self.per_token.period:g} s)", wait)

    @property
    def tokens(self) -> TokenStore:
        return self._tokens()

    def check(self, presented: str | None, client: str, channel: str) -> TokenInfo | None:
        """The token's holder; None when it is wrong (counted); ``TooMany`` when the client
        or this token has failed too often lately. Tokens live in a file, not the database:
        a wrong or missing token never opens a database session."""
        keys = [f"client:{client}"]
        if presented:
            digest = hashlib.sha256(presented.encode("utf-8", "replace")).hexdigest()[:32]
            keys.append(f"token:{digest}")
        waits = [w for w in map(self.limiter.wait, keys) if w is not None]
        if waits:
            AUTH_THROTTLED.labels(channel).inc()
            raise throttled(max(waits))
        info = self.tokens.authenticate(presented) if presented else None
        if info is None:
            AUTH_FAILURES.labels(channel).inc()
            for key in keys:
                self.limiter.take(key)
            log.warning("%s: failed authentication from %s (%s)", channel, client,
                        "no token" if not presented else "unknown or revoked token")
        return info
