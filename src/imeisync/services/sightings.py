"""Sightings: which attach checks are recorded, and how. The one place of these rules.

The attach check queues raw facts (``adapters.sighting_queue``); the sighting writer of the
same process hands them here in batches, each written in ONE transaction. For every open
record covering the device (single records and ranges, ``store.ranges.covering``):

* OUR ``track`` record → a ``Sighting`` for its case (and a ``SightingAlert`` outbox row when
  ``[sightings] webhook_url`` is set);
* OUR ``block`` record, the answer BLACKLISTED and ``[sightings] blocked_attempts`` on → a
  ``Sighting`` (a stolen phone still trying);
* ANOTHER operator's ``track`` record → a ``SightingNotice`` (``sent``, pending) for its owner:
  device, time, us; no subscriber identity, no network node;
* anything else (another operator's block, no open record: a GREYLISTED answer by ``[eir]
  unknown_tac``, or a record closed meanwhile) → nothing (counted ``ignored``).

One sighting per (record, device, subscriber) per ``[sightings] dedupe``, and one notice per
(device, owner) per ``dedupe``, across every process: the check reads the store inside the
serialised write transaction, so two workers cannot both record the same one.

The subscriber: an IMSI of 6 to 15 digits (MCC, MNC, at least one MSIN digit, TS 23.003) is
kept only encrypted (``DataCipher``, context ``sighting:<sighting_id>``), with a keyed digest
for the dedupe; no IMSI sent, or a SUPI that is not an IMSI (``nai-``), is ``absent``; anything
else the attach check let through (``imsi-12345``) is ``malformed``, stored without it.

Sightings are not audited one by one: the audit trail is kept for ever, and a line per sighting
there would outlive ``[sightings] retention_days`` with the device's movements. The case's
history shows its sightings from this table; their purge is audited with counts.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote_plus

from sqlalchemy import and_, delete, func, insert, select

from imeisync.adapters.data_crypto import DataCipher
from imeisync.adapters.diameter import codec as c
from imeisync.adapters.sighting_queue import Observation
from imeisync.domain.errors import BadInput
from imeisync.domain.imei import parse_network
from imeisync.domain.times import rfc3339
from imeisync.services import audit
from imeisync.store.db import Database, rowcount
from imeisync.store.models import Record, Sighting, SightingAlert, SightingNotice
from imeisync.store.ranges import records_over

N5G_EIR, S13 = "n5g-eir", "s13"
DIGEST_PURPOSE = "sighting-imsi"


def imsi_context(sighting_id: str) -> str:
    """The AES-GCM context a sighting's IMSI is encrypted under: the ciphertext decrypts only
    as the IMSI of that sighting."""
    return f"sighting:{sighting_id}"


@dataclass(frozen=True)
class Facts:
    """One observation, parsed (off the hot path)."""

    at: datetime
    interface: str
    status: str
    imei_key: str
    svn: str | None
    node: str | None
    imsi_state: str  # present | absent | malformed
    imsi: str | None  # only when present


def subscriber(imsi: str | None) -> tuple[str, str | None]:
    """(``imsi_state``, the IMSI to keep or None).

    >>> subscriber("238010000000001"), subscriber(None), subscriber("12345")
    (('present', '238010000000001'), ('absent', None), ('malformed', None))
    """
    if imsi is None:
        return "absent", None
    if 6 <= len(imsi) <= 15 and imsi.isascii() and imsi.isdigit():
        return "present", imsi
    return "malformed", None


def facts_of(observation: Observation) -> Facts:
    """The facts of a queued observation: the software version and the asking node read from
    the raw query or ECR (a part that cannot be read is left out, never an error)."""
    at, interface, status, key, imsi, raw, client = observation
    if interface == S13 and isinstance(raw, bytes | bytearray):
        svn, node = _ecr_fields(bytes(raw))
    else:
        svn, node = _query_svn(str(raw)), _host_of(client)
    state, kept = subscriber(imsi)
    return Facts(at=datetime.fromtimestamp(at, UTC), interface=interface, status=status,
                 imei_key=f"{key:014d}", svn=svn, node=node, imsi_state=state, imsi=kept)


def _query_svn(query: str) -> str | None:
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if unquote_plus(name) == "pei":
            try:
                return parse_network(unquote_plus(value)).svn
            except BadInput:
                return None
    return None


def _host_of(client: str | None) -> str | None:
    """The AMF's address without the port (``10.0.0.1:4711`` → ``10.0.0.1``, ``[::1]:80`` →
    ``::1``)."""
    if not client:
        return None
    host, sep, port = client.rpartition(":")
    if not sep or not port.isdigit():
        host = client
    return host.strip("[]")[:255] or None


def _ecr_fields(raw: bytes) -> tuple[str | None, str | None]:
    """Software-Version and Origin-Host of an ECR the attach check accepted."""
    svn = node = None
    try:
        for avp in c.read_avps(raw, c.HEADER_LEN, len(raw)):
            if avp.code == c.ORIGIN_HOST and not avp.vendor:
                node = avp.value(raw).decode("utf-8", "replace")[:255] or None
            elif avp.code == c.TERMINAL_INFORMATION and avp.vendor == c.VENDOR_3GPP:
                for inner in c.read_grouped(raw, avp):
                    if inner.code == c.SOFTWARE_VERSION and inner.vendor == c.VENDOR_3GPP:
                        value = inner.value(raw)
                        if len(value) == 2 and value.isdigit():
                            svn = value.decode("ascii")
    except (c.AvpError, IndexError, ValueError):
        pass
    return svn, node


@dataclass
class BatchResult:
    recorded: int = 0
    noticed: int = 0
    deduplicated: int = 0
    ignored: int = 0
    malformed: int = 0


def rule(record: Any, status: str, operator_id: str, blocked_attempts: bool) -> str | None:
    """What an observation of a device under ``record`` becomes: ``sighting``, ``notice`` or
    None (the rules of the module's docstring)."""
    own = record.owner_id == operator_id
    if record.kind == "track":
        return "sighting" if own else "notice"
    if record.kind == "block" and own and blocked_attempts and status == "BLACKLISTED":
        return "sighting"
    return None


class SightingRecorder:
    """Writes batches of observations as sightings and notices (one transaction each)."""

    def __init__(self, db: Database, cipher: Callable[[], DataCipher], *, operator_id: str,
                 operator_country: str, dedupe: float, blocked_attempts: bool, alerts: bool,
                 in_range: Callable[[int], bool] = lambda key: True):
        self.db = db
        self.in_range = in_range  # may a range record cover this key (the attach index knows)
        self.cipher = cipher
        self.operator_id = operator_id
        self.operator_country = operator_country
        self.dedupe = timedelta(seconds=dedupe)
        self.blocked_attempts = blocked_attempts
        self.alerts = alerts

    def record(self, observations: Iterable[Observation]) -> BatchResult:
        result = BatchResult()
        facts = sorted((facts_of(o) for o in observations), key=lambda f: f.at)
        if not facts:
            return result
        cipher = self.cipher()  # before the transaction: a bad key file is not a DB error
        keys = sorted({f.imei_key for f in facts})
        with self.db.write() as session:
            records = _open_records(session, keys,
                                    [key for key in keys if self.in_range(int(key))])
            since = facts[0].at - self.dedupe
            last_sighting, last_notice = _recent(session, keys, since)
            sightings: list[dict[str, Any]] = []
            alerts: list[dict[str, Any]] = []
            notices: list[dict[str, Any]] = []
            for fact in facts:
                digest = (cipher.digest(fact.imsi, purpose=DIGEST_PURPOSE)
                          if fact.imsi is not None else None)
                acted = False
                for record in records.get(fact.imei_key, ()):
                    what = rule(record, fact.status, self.operator_id, self.blocked_attempts)
                    if what is None:
                        continue
                    acted = True
                    if what == "sighting":
                        seen = last_sighting.get((record.id, fact.imei_key, digest))
                    else:
                        seen = last_notice.get((fact.imei_key, record.owner_id))
                    if seen is not None and abs(fact.at - seen) < self.dedupe:
                        result.deduplicated += 1
                        continue
                    if what == "sighting":
                        last_sighting[(record.id, fact.imei_key, digest)] = fact.at
                        sightings.append(self._sighting(cipher, fact, record, digest))
                        if self.alerts and record.kind == "track":
                            alerts.append({"sighting_id": sightings[-1]["sighting_id"],
                                           "created_at": fact.at, "state": "pending",
                                           "attempts": 0, "next_attempt_at": fact.at})
                        result.recorded += 1
                        result.malformed += fact.imsi_state == "malformed"
                    else:
                        last_notice[(fact.imei_key, record.owner_id)] = fact.at
                        notices.append(self._notice(fact, record))
                        result.noticed += 1
                if not acted:
                    result.ignored += 1
            for model, rows in ((Sighting, sightings), (SightingAlert, alerts),
                                (SightingNotice, notices)):
                if rows:
                    session.execute(insert(model.__table__), rows)
        return result

    def _sighting(self, cipher: DataCipher, fact: Facts, record: Any,
                  digest: str | None) -> dict[str, Any]:
        sighting_id = uuid.uuid4().hex
        return {
            "sighting_id": sighting_id, "seen_at": fact.at, "interface": fact.interface,
            "status": fact.status, "imei_key": fact.imei_key, "svn": fact.svn,
            "node": fact.node, "imsi_state": fact.imsi_state,
            "imsi_enc": (cipher.encrypt(fact.imsi, context=imsi_context(sighting_id))
                         if fact.imsi is not None else None),
            "imsi_digest": digest, "record_id": record.id, "case_ref": record.case_ref,
        }

    def _notice(self, fact: Facts, record: Any) -> dict[str, Any]:
        # No record_id: the column names OUR record of a received notice; a foreign record
        # may be purged by foreign retention while the notice waits to be sent.
        return {
            "notice_id": uuid.uuid4().hex, "direction": "sent", "imei_key": fact.imei_key,
            "owner_id": record.owner_id, "reporter_id": self.operator_id,
            "reporter_country": self.operator_country, "seen_at": fact.at,
            "state": "pending", "attempts": 0,
        }


def _open_records(session: Any, keys: list[str], ranged: list[str]) -> dict[str, list[Any]]:
    """Open records covering each key (singles, and ranges for the ``ranged`` keys)."""
    return records_over(session, keys, (Record.id, Record.owner_id, Record.kind,
                                        Record.case_ref),
                        Record.closed_at.is_(None), ranged=ranged)


def _recent(session: Any, keys: list[str], since: datetime
            ) -> tuple[dict[tuple[int, str, str | None], datetime],
                       dict[tuple[str, str], datetime]]:
    """The last sighting per (record, device, digest) and the last sent notice per (device,
    owner) since ``since``: what the batch deduplicates against."""
    s, n = Sighting.__table__, SightingNotice.__table__
    sightings = {(row[0], row[1], row[2]): _aware(row[3]) for row in session.execute(
        select(s.c.record_id, s.c.imei_key, s.c.imsi_digest, func.max(s.c.seen_at))
        .where(s.c.imei_key.in_(keys), s.c.seen_at >= since)
        .group_by(s.c.record_id, s.c.imei_key, s.c.imsi_digest))}
    notices = {(row[0], row[1]): _aware(row[2]) for row in session.execute(
        select(n.c.imei_key, n.c.owner_id, func.max(n.c.seen_at))
        .where(and_(n.c.direction == "sent", n.c.imei_key.in_(keys), n.c.seen_at >= since))
        .group_by(n.c.imei_key, n.c.owner_id))}
    return sightings, notices


def _aware(value: Any) -> datetime:
    """``func.max`` bypasses the column type: SQLite hands back naive text or datetimes."""
    moment: datetime = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# -- retention ------------------------------------------------------------------------------

PURGE_BATCH = 1000


def purge_sightings(db: Database, retention_days: int, *, now: datetime | None = None,
                    batch: int = PURGE_BATCH) -> tuple[int, str]:
    """Delete sightings (and their alerts) seen more than ``retention_days`` ago; one audited
    transaction per batch (counts and the id range, no IMEI, no IMSI). Disclosures stay: they
    are the evidence of who learnt what, and hold no IMSI. Notices between operators (sent and
    received) and any alert are a device's trace too: they go by the same cut-off. Returns
    (sightings deleted, cut-off)."""
    if retention_days < 1:
        raise ValueError("retention_days must be at least 1")
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=retention_days)
    s, a = Sighting.__table__, SightingAlert.__table__
    done = 0
    while True:
        with db.write() as session:
            rows = session.execute(select(s.c.id, s.c.sighting_id).where(s.c.seen_at < cutoff)
                                   .order_by(s.c.id).limit(batch)).all()
            if not rows:
                break
            session.execute(delete(a).where(a.c.sighting_id.in_([r[1] for r in rows])))
            session.execute(delete(s).where(s.c.id.in_([r[0] for r in rows])))
            audit.append(session, [audit.Event(
                actor="retention", role="system", action="retention.sightings_purged",
                outcome="ok", at=now,
                detail={"sightings": len(rows), "seen_before": rfc3339(cutoff),
                        "first_sighting_row": rows[0][0], "last_sighting_row": rows[-1][0]})])
        done += len(rows)
        if len(rows) < batch:
            break
    _purge_notices(db, cutoff, now)
    return done, rfc3339(cutoff)


def _purge_notices(db: Database, cutoff: datetime, now: datetime) -> None:
    """Notices seen before ``cutoff`` and alerts created before it (a received notice's alert
    has no sighting to go with); one audited transaction."""
    n, a = SightingNotice.__table__, SightingAlert.__table__
    with db.write() as session:
        notices = rowcount(session.execute(delete(n).where(n.c.seen_at < cutoff)))
        alerts = rowcount(session.execute(delete(a).where(a.c.created_at < cutoff)))
        if notices or alerts:
            audit.append(session, [audit.Event(
                actor="retention", role="system", action="retention.sighting_notices_purged",
                outcome="ok", at=now, detail={"notices": notices, "alerts": alerts,
                                              "seen_before": rfc3339(cutoff)})])
