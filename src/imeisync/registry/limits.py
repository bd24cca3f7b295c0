"""The reference registry's limits under load, applied by ``registry.app`` before any database
work (each worker process counts its own):

- an address whose signatures keep failing (``FAILED_SIGNATURES`` per address and claimed
  keyid) gets 429 without its body being read or verified: a forged flood costs a dictionary
  look-up per request, and hurts only the member it claims to be, from its own address;
- each member at most ``[server] member_rate`` requests, counted only once its signature has
  been verified, so nobody can use up another member's allowance by claiming its keyid: 429;
- at most ``[server] max_snapshots`` snapshots streamed at once (each holds a read transaction
  and a database connection for as long as the member reads): 503.

Every refusal carries ``Retry-After``; the daemon's client honours it (``registry_client.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from imeisync.adapters.rate_limit import RateLimiter
from imeisync.entrypoints.http import Problem
from imeisync.registry.config import Member, RegistryConfig

FAILED_SIGNATURES = "20/m"
SNAPSHOT_RETRY_AFTER = 10  # seconds: a snapshot of a million records streams in a few


class Limits:
    def __init__(self, config: RegistryConfig):
        self.per_member = RateLimiter.parse(config.member_rate)
        self.failures = RateLimiter.parse(FAILED_SIGNATURES)
        self.max_snapshots = config.max_snapshots
        self._snapshots = 0
        self._lock = threading.Lock()

    def before_signature(self, address: str, claimed: Member | None) -> None:
        """Refuse at once, before the body is read or verified: an address (and claimed
        member) whose signatures keep failing, or a claimed member whose allowance is spent —
        only its own verified requests spend it, so refusing here costs a forger nothing
        it could use and saves verifying an over-rate member's flood."""
        wait = self.failures.wait(address)
        if wait is not None:
            raise Problem(429, "too many requests with bad signatures from this address",
                          "too_many_failures", f"wait {wait} seconds; sign each request with "
                          "your operator key (RFC 9421) and check your clock",
                          {"Retry-After": str(wait)})
        if claimed is not None:
            self._over_rate(claimed, self.per_member.wait(claimed.id))

    def bad_signature(self, address: str) -> None:
        self.failures.take(address)

    def admit(self, member: Member) -> None:
        self._over_rate(member, self.per_member.take(member.id))

    def _over_rate(self, member: Member, wait: int | None) -> None:
        if wait is not None:
            raise Problem(429, f"too many requests from {member.id}", "rate_limited",
                          f"wait {wait} seconds (the Retry-After header); the registry takes "
                          f"{self.per_member.count} requests per {self.per_member.period:g} s "
                          "from each member", {"Retry-After": str(wait)})

    def snapshot_slot(self, member: Member) -> Callable[[], None]:
        """Take one of the ``max_snapshots`` slots (503 when none is free); returns the
        function that frees it (calling it twice frees it once)."""
        with self._lock:
            if self._snapshots >= self.max_snapshots:
                raise Problem(503, "the registry is streaming as many snapshots as it allows",
                              "busy", f"retry in {SNAPSHOT_RETRY_AFTER} seconds (Retry-After); "
                              "the feed (GET /v1/changes) is served meanwhile",
                              {"Retry-After": str(SNAPSHOT_RETRY_AFTER)})
            self._snapshots += 1
        freed = threading.Event()

        def release() -> None:
            with self._lock:
                if not freed.is_set():
                    freed.set()
                    self._snapshots -= 1

        return release

    @property
    def snapshots(self) -> int:
        """Snapshots being streamed now."""
        return self._snapshots
