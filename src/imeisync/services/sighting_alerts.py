"""Trace alerts: the outbox ``sighting_alerts`` delivered to the police unit's endpoint.

The sighting writer puts one ``pending`` alert next to each sighting of our tracked records
(same transaction) when ``[sightings] webhook_url`` is set, and the feed's pull one next to each
received notice (our tracked device seen on another operator's network, ``type``
``seen_elsewhere``: reporter and country, no node, no subscriber); the daemon's leader runs
:meth:`AlertSender.run` every few seconds (``entrypoints/jobs.py``), never the attach check.

- **The request**: ``POST webhook_url`` with ``Content-Type: application/jose`` and the body a
  compact JWS (``alg`` Ed25519, ``kid`` our operator id, ``typ`` ``imeisync-sighting+jws``)
  signed with ``[sightings] webhook_key`` (``adapters/signed_documents.py``). Its payload:
  sighting id, operator, case reference, IMEI, time, interface, node, software version,
  answer — never the subscriber identity. Header ``Idempotency-Key: <sighting_id>``.
- **At least once**: the alert is marked ``delivered`` only after a 2xx; a crash between the
  answer and the mark sends it again, byte for byte the same (Ed25519 is deterministic) and with
  the same idempotency key, so the receiver can drop the copy.
- **Failures** (connection, timeout, any non-2xx) keep it ``pending`` with ``attempts``,
  ``last_error`` and ``next_attempt_at`` = now + min(``MAX_DELAY``, ``BASE_DELAY`` ·
  2^(attempts-1)) · a random factor in [0.5, 1] (jitter: many alerts after an outage do not
  retry in step).
- **Redirects are not followed**: a 3xx is a failure. The alert carries a police case's data
  and is signed for the configured endpoint; following a redirect would hand it to an address
  nobody configured (and turn the POST into a GET on 301-303), and a 3xx confirms no receipt.
- **Bounded**: each request has a connect and read ``TIMEOUT``; a run stops at its first
  failure (the endpoint is down: the other alerts wait for the next run instead of each waiting
  out a timeout) and after ``BATCH`` alerts, so a hanging endpoint holds only this job's thread.
- An alert whose sighting was purged before delivery is marked ``expired``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import Counter, Gauge
from sqlalchemy import func, select, update

from imeisync.adapters.signed_documents import sign_document
from imeisync.domain.imei import Imei
from imeisync.domain.imei import format as format_imei
from imeisync.domain.times import rfc3339
from imeisync.store.db import Database
from imeisync.store.models import Record, Sighting, SightingAlert, SightingNotice

ALERT_TYP = "imeisync-sighting+jws"
BASE_DELAY = 5.0  # seconds before the first retry
MAX_DELAY = 3600.0  # back-off cap
TIMEOUT = (3.0, 10.0)  # connect, read (seconds) per request
BATCH = 50  # alerts per run at most

DELIVERIES = Counter("imeisync_sighting_alert_deliveries",
                     "Sighting alert delivery attempts by result (delivered, failed, expired)",
                     ["result"])
PENDING = Gauge("imeisync_sighting_alerts_pending",
                "Sighting alerts not yet delivered (after the last run on this daemon)")


def backoff(attempts: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after the ``attempts``-th failure: exponential, capped, jittered."""
    delay = min(MAX_DELAY, BASE_DELAY * float(2 ** min(max(attempts - 1, 0), 20)))
    return float(delay * (0.5 + 0.5 * rand()))


def _alert_payload(session: Any, key: str, operator_id: str) -> dict[str, Any] | None:
    """The payload for an alert's key: a sighting here, else a received notice; None when it
    was purged."""
    sighting = session.execute(select(Sighting).where(Sighting.sighting_id == key)
                               ).scalar_one_or_none()
    if sighting is not None:
        return alert_payload(sighting, operator_id)
    found = session.execute(
        select(SightingNotice, Record.case_ref).join(Record, Record.id == SightingNotice.record_id)
        .where(SightingNotice.notice_id == key, SightingNotice.direction == "received")).first()
    return notice_payload(found[0], found[1], operator_id) if found else None


def notice_payload(notice: SightingNotice, case_ref: str | None, operator_id: str
                   ) -> dict[str, Any]:
    """Our tracked device seen on another operator's network: what that operator told the
    registry (no subscriber, no network node: it never had them to tell)."""
    return {"type": "seen_elsewhere", "sighting_id": notice.notice_id, "operator": operator_id,
            "case_ref": case_ref, "imei": format_imei(Imei(notice.imei_key), ""),
            "imei_key": notice.imei_key, "seen_at": rfc3339(notice.seen_at),
            "reporter": notice.reporter_id, "reporter_country": notice.reporter_country}


def alert_payload(sighting: Sighting, operator_id: str) -> dict[str, Any]:
    """What the police unit's endpoint is told: no subscriber identity."""
    return {"type": "sighting", "sighting_id": sighting.sighting_id, "operator": operator_id,
            "case_ref": sighting.case_ref, "imei": format_imei(Imei(sighting.imei_key), ""),
            "imei_key": sighting.imei_key, "seen_at": rfc3339(sighting.seen_at),
            "interface": sighting.interface, "node": sighting.node, "svn": sighting.svn,
            "status": sighting.status}


@dataclass
class AlertRun:
    delivered: int = 0
    failed: int = 0
    expired: int = 0
    pending: int = 0
    errors: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if not (self.delivered or self.failed or self.expired):
            return f"alerts: nothing due ({self.pending} pending)"
        text = (f"alerts: {self.delivered} delivered, {self.failed} failed, "
                f"{self.expired} expired; {self.pending} pending")
        return text + (f" (last error: {self.errors[-1]})" if self.errors else "")


class AlertSender:
    def __init__(self, db: Database, url: str, key: Callable[[], Ed25519PrivateKey], *,
                 kid: str, clock: Callable[[], datetime],
                 session: requests.Session | None = None,
                 timeout: tuple[float, float] = TIMEOUT,
                 after_send: Callable[[str], None] | None = None):
        self.db = db
        self.url = url
        self._key = key
        self.kid = kid
        self.clock = clock
        self.http = session or requests.Session()
        self.http.trust_env = False  # the configured endpoint, not a proxy from the environment
        self.timeout = timeout
        self._after_send = after_send  # tests: a crash between the answer and the mark

    def close(self) -> None:
        self.http.close()

    def run(self, batch: int = BATCH) -> AlertRun:
        """Deliver the due alerts, oldest first; stop at the first failure."""
        result = AlertRun()
        now = self.clock()
        with self.db.read() as session:
            due = session.execute(
                select(SightingAlert.id, SightingAlert.sighting_id, SightingAlert.attempts)
                .where(SightingAlert.state == "pending", SightingAlert.next_attempt_at <= now)
                .order_by(SightingAlert.next_attempt_at, SightingAlert.id).limit(batch)).all()
        key = self._key() if due else None
        for alert_id, sighting_id, attempts in due:
            with self.db.read() as session:
                payload = _alert_payload(session, sighting_id, self.kid)
            if payload is None:
                self._mark(alert_id, "expired", attempts, "the sighting was purged before "
                           "the alert could be delivered")
                result.expired += 1
                DELIVERIES.labels("expired").inc()
                continue
            assert key is not None
            error = self._send(sign_document(payload, key, self.kid, ALERT_TYP), sighting_id)
            if self._after_send is not None:
                self._after_send(sighting_id)
            if error is None:
                self._mark(alert_id, "delivered", attempts + 1, None)
                result.delivered += 1
                DELIVERIES.labels("delivered").inc()
                continue
            self._mark(alert_id, "pending", attempts + 1, error)
            result.failed += 1
            result.errors.append(error)
            DELIVERIES.labels("failed").inc()
            break
        result.pending = self.pending_count()
        PENDING.set(result.pending)
        return result

    def _send(self, token: str, sighting_id: str) -> str | None:
        """None when the endpoint took the alert (2xx), else why not (one line)."""
        try:
            with self.http.post(self.url, data=token.encode("ascii"), timeout=self.timeout,
                                allow_redirects=False, stream=True,
                                headers={"Content-Type": "application/jose",
                                         "Idempotency-Key": sighting_id}) as answer:
                status = answer.status_code
                where = answer.headers.get("location", "")
        except requests.Timeout:
            return f"no answer within {self.timeout[1]:g} s (timeout)"
        except requests.RequestException as exc:
            return f"cannot reach the endpoint ({type(exc).__name__}: {str(exc)[:200]})"
        if 200 <= status < 300:
            return None
        if 300 <= status < 400:
            return (f"HTTP {status} redirect to {where[:200]!r} not followed: configure the "
                    "final address as [sightings] webhook_url")
        return f"HTTP {status} from the endpoint"

    def _mark(self, alert_id: int, state: str, attempts: int, error: str | None) -> None:
        now = self.clock()
        values: dict[str, Any] = {"state": state, "attempts": attempts, "last_error": error}
        if state == "delivered":
            values["delivered_at"] = now
        elif state == "pending":
            values["next_attempt_at"] = now + timedelta(seconds=backoff(attempts))
        with self.db.write() as session:
            session.execute(update(SightingAlert).where(SightingAlert.id == alert_id)
                            .values(**values))

    def pending_count(self) -> int:
        with self.db.read() as session:
            return int(session.execute(select(func.count()).select_from(SightingAlert).where(
                SightingAlert.state == "pending")).scalar_one())


def alert_status(db: Database, limit: int = 10) -> dict[str, Any]:
    """For ``imeisync sighting alerts``: counts by state and the alerts still failing."""
    with db.read() as session:
        counts = dict(session.execute(select(SightingAlert.state, func.count())
                                      .group_by(SightingAlert.state)).all())
        failing = session.execute(select(SightingAlert).where(
            SightingAlert.state == "pending", SightingAlert.attempts > 0)
            .order_by(SightingAlert.id).limit(limit)).scalars().all()
        oldest = session.execute(select(func.min(SightingAlert.created_at)).where(
            SightingAlert.state == "pending")).scalar_one()
    return {"pending": counts.get("pending", 0), "delivered": counts.get("delivered", 0),
            "expired": counts.get("expired", 0), "oldest_pending": rfc3339(oldest),
            "failing": [{"sighting_id": a.sighting_id, "attempts": a.attempts,
                         "last_error": a.last_error,
                         "next_attempt_at": rfc3339(a.next_attempt_at)} for a in failing]}
