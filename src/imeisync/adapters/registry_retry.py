"""How the registry client waits when the registry says "not now" (429, 502, 503, 504) — no
retry storms from a thousand operators' daemons:

- **Retry-After is respected**: never retry sooner than the registry asked (seconds or an HTTP
  date); a wait longer than ``retry_after_max`` is not waited out at all — the step gives up at
  once with the registry's wait in its message, and the next scheduled run tries again;
- **exponential back-off with jitter** when the registry names no wait (``backoff`` × 2^n, at
  most ``backoff_max``), and up to ``jitter`` (25 %) more on every wait, so that daemons told
  the same Retry-After do not come back in the same instant;
- **caps**: at most ``retries`` retries of one request, and at most ``budget`` retries in one
  sync run (push, pull, reconcile… — ``SyncService`` starts a run per step), whatever the number
  of requests the run makes.

Every wait taken is recorded in ``history`` (status, what the registry asked, what was waited)
for the logs, the metrics and the tests. Connection errors are retried by ``urllib3`` (a
registry that is down answers nothing, so there is nothing to honour).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import requests
from prometheus_client import Counter

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})

WAITS = Counter("imeisync_registry_retry_waits", "Waits before retrying a registry request",
                ["status"])


@dataclass(frozen=True)
class Retried:
    status: int
    asked: float | None  # the registry's Retry-After, in seconds
    waited: float


def parse_retry_after(value: str | None, now: Callable[[], datetime] = lambda: datetime.now(UTC)
                      ) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), None if absent or garbled."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(int(value[:9]))
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - now()).total_seconds())


class RetryPolicy:
    def __init__(self, *, retries: int = 3, backoff: float = 0.5, backoff_max: float = 10.0,
                 retry_after_max: float = 30.0, budget: int = 8, jitter: float = 0.25,
                 sleep: Callable[[float], None] = time.sleep,
                 rng: Callable[[], float] = random.random):
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.retry_after_max = retry_after_max
        self.budget = budget
        self.jitter = jitter
        self.sleep = sleep
        self.rng = rng
        self.history: list[Retried] = []  # this run's waits
        self._spent = 0

    def new_run(self) -> None:
        """A new sync run: a fresh budget (the history is kept for the last run only)."""
        self._spent = 0
        self.history = []

    def wait_for(self, status: int, retry_after: str | None, attempt: int) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``, or None: give up now."""
        if status not in RETRY_STATUSES or attempt >= self.retries or self._spent >= self.budget:
            return None
        asked = parse_retry_after(retry_after)
        if asked is not None and asked > self.retry_after_max:
            return None
        exponential = min(self.backoff_max, self.backoff * 2.0 ** attempt)
        wait = max(asked or 0.0, exponential) * (1.0 + self.jitter * self.rng())
        return float(max(asked or 0.0, min(wait, self.retry_after_max)))

    def send(self, request: Callable[[], requests.Response]) -> requests.Response:
        """``request()``, again after each wait the policy allows; the last answer."""
        for attempt in itertools.count():
            response = request()
            asked = response.headers.get("Retry-After")
            wait = self.wait_for(response.status_code, asked, attempt)
            if wait is None:
                return response
            response.close()
            self.pause(response.status_code, asked, wait)
        raise AssertionError("unreachable")

    def pause(self, status: int, retry_after: str | None, wait: float) -> None:
        self._spent += 1
        self.history.append(Retried(status, parse_retry_after(retry_after), wait))
        WAITS.labels(str(status)).inc()
        log.info("registry answered %d; retrying in %.1f s (%d of %d this run)", status, wait,
                 self._spent, self.budget)
        self.sleep(wait)
