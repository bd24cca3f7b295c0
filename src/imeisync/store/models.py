"""The blocklist's tables. History is kept: a lift closes a record, nothing is deleted.

Every change to ``records`` or ``exceptions`` also appends a row to ``change_log``, whose
``seq`` only grows; the attach index and other readers follow it instead of rescanning.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
BigId = BigInteger().with_variant(Integer, "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on SQLite (which has no time zones) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use aware UTC times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if getattr(dialect, "name", "") == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    # Every model here maps one Table; saying so lets the Core statements (insert, update,
    # delete on Model.__table__) type-check instead of seeing the base's FromClause.
    __table__: ClassVar[Table]


class Record(Base):
    """One operator's claim that a device is blocked (or tracked), from open to close."""

    __tablename__ = "records"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    imei_key: Mapped[str] = mapped_column(String(14))
    # A range record (a shipment): keys imei_key..imei_key_last, both included, one TAC.
    imei_key_last: Mapped[str | None] = mapped_column(String(14))
    owner_id: Mapped[str] = mapped_column(String(64))
    owner_country: Mapped[str] = mapped_column(String(2))
    kind: Mapped[str] = mapped_column(String(8))  # block | track
    reason: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(String(16))  # order (ours) | registry (foreign)
    case_ref: Mapped[str | None] = mapped_column(String(64))  # own records only
    police_unit: Mapped[str | None] = mapped_column(String(128))
    note_enc: Mapped[str | None] = mapped_column(Text)  # AES-GCM, context "order:<opened_by>"
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime)
    opened_by: Mapped[str] = mapped_column(String(128))  # order_id, or the registry change_id
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    closed_by: Mapped[str | None] = mapped_column(String(128))
    close_reason: Mapped[str | None] = mapped_column(String(32))
    registry_seq: Mapped[int | None] = mapped_column(BigInteger)  # feed position, foreign only

    __table_args__ = (
        # One open record per device per owner: the database itself refuses a second one, so
        # two concurrent blocks of one IMEI cannot both open a record. Also serves the
        # "open records of this device" lookup (imei_key leads).
        Index("uq_records_open_owner", "imei_key", "owner_id", unique=True,
              sqlite_where=text("closed_at IS NULL"), postgresql_where=text("closed_at IS NULL")),
        Index("ix_records_key", "imei_key"),
    )


class AttachException(Base):
    """An IMSI allowed to use one blocked IMEI (the legitimate user of a cloned IMEI)."""

    __tablename__ = "exceptions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    imei_key: Mapped[str] = mapped_column(String(14))
    imsi: Mapped[str] = mapped_column(String(15))
    case_ref: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(128))
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    removed_by: Mapped[str | None] = mapped_column(String(128))

    __table_args__ = (
        Index("uq_exceptions_active", "imei_key", "imsi", unique=True,
              sqlite_where=text("removed_at IS NULL"), postgresql_where=text("removed_at IS NULL")),
    )


class ChangeLog(Base):
    """The change sequence: one row per change to records or exceptions, in commit order."""

    __tablename__ = "change_log"

    seq: Mapped[int] = mapped_column(BigId, primary_key=True)
    imei_key: Mapped[str] = mapped_column(String(14))  # "" for a TAC table change
    imei_key_last: Mapped[str | None] = mapped_column(String(14))  # a range record's last key
    subject: Mapped[str] = mapped_column(String(12))  # record | exception | tacs
    op: Mapped[str] = mapped_column(String(8))  # open | close
    kind: Mapped[str | None] = mapped_column(String(8))
    at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = ({"sqlite_autoincrement": True},)


class Order(Base):
    """Every police order received, accepted or refused, and who entered it."""

    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    order_id: Mapped[str | None] = mapped_column(String(128))
    kind: Mapped[str | None] = mapped_column(String(8))
    imei: Mapped[str | None] = mapped_column(String(15))
    imei_key: Mapped[str | None] = mapped_column(String(14))
    imei_key_last: Mapped[str | None] = mapped_column(String(14))  # a range order's last key
    case_ref: Mapped[str | None] = mapped_column(String(64))
    police_unit: Mapped[str | None] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(String(32))
    issued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    submitted_by: Mapped[str] = mapped_column(String(128))
    channel: Mapped[str] = mapped_column(String(16))  # cli | import | api | console
    signed_kid: Mapped[str | None] = mapped_column(String(64))  # None: unsigned staff block
    outcome: Mapped[str] = mapped_column(String(12))  # accepted | linked | refused
    refusal_code: Mapped[str | None] = mapped_column(String(40))
    refusal_message: Mapped[str | None] = mapped_column(Text)
    record_id: Mapped[int | None] = mapped_column(ForeignKey("records.id"))

    __table_args__ = (
        # A replayed order_id is refused: at most one accepted (or linked) order per id.
        Index("uq_orders_order_id_taken", "order_id", unique=True,
              sqlite_where=text("outcome <> 'refused'"),
              postgresql_where=text("outcome <> 'refused'")),
        Index("ix_orders_imei_key", "imei_key"),
    )


class OutboxChange(Base):
    """A change for the registry, written with the record it describes; sync pushes it."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    change_id: Mapped[str] = mapped_column(String(80), unique=True)
    order_id: Mapped[str] = mapped_column(String(128))
    record_id: Mapped[int] = mapped_column(ForeignKey("records.id"))
    action: Mapped[str] = mapped_column(String(8))  # insert | remove
    imei_key: Mapped[str] = mapped_column(String(14))
    imei_key_last: Mapped[str | None] = mapped_column(String(14))  # a range: imei_first..last
    kind: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    # pending → sent → accepted | duplicate | rejected (a rejection is never retried blindly)
    state: Mapped[str] = mapped_column(String(12), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    result_code: Mapped[str | None] = mapped_column(String(8))
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_outbox_state", "state", "id"),)


class AuditEvent(Base):
    """Append-only, hash-chained: each event holds the hash of the one before it."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(40))
    imei_key: Mapped[str | None] = mapped_column(String(14))
    case_ref: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(Text, default="{}")  # canonical JSON
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The chain's last event, so that removing events from the end is detected too."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    last_id: Mapped[int] = mapped_column(BigInteger)
    last_hash: Mapped[str] = mapped_column(String(64))


class SyncState(Base):
    """Small named values the sync keeps: feed cursor, last success of each step."""

    __tablename__ = "sync_state"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Dispute(Base):
    """A request that the owner of a record review it: filed by us about another operator's
    record, or received from the registry about one of ours (for liaison staff to act on)."""

    __tablename__ = "disputes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    dispute_id: Mapped[str] = mapped_column(String(80), unique=True)
    direction: Mapped[str] = mapped_column(String(8))  # filed (by us) | received (about ours)
    imei_key: Mapped[str] = mapped_column(String(14))
    filer_id: Mapped[str] = mapped_column(String(64))
    filer_country: Mapped[str] = mapped_column(String(2))
    owner_id: Mapped[str] = mapped_column(String(64))
    owner_country: Mapped[str] = mapped_column(String(2))
    case_ref: Mapped[str] = mapped_column(String(64))  # the filer's police case
    reason: Mapped[str] = mapped_column(Text)
    filed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    filed_by: Mapped[str | None] = mapped_column(String(128))  # our staff, when we filed it
    state: Mapped[str] = mapped_column(String(12))  # open | lifted | upheld
    answer_reason: Mapped[str | None] = mapped_column(Text)
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    answered_by: Mapped[str | None] = mapped_column(String(128))  # our staff, when we answered
    registry_seq: Mapped[int | None] = mapped_column(BigInteger)  # feed position last seen

    __table_args__ = (Index("ix_disputes_state", "direction", "state"),)


class ChangeReceipt(Base):
    """The registry's latest signed receipt for one of our changes: who applied it, who not."""

    __tablename__ = "receipts"

    change_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    applied: Mapped[int] = mapped_column(Integer)
    total: Mapped[int] = mapped_column(Integer)
    complete: Mapped[bool] = mapped_column(Boolean)
    recipients: Mapped[str] = mapped_column(Text)  # JSON, as in the receipt
    jws: Mapped[str] = mapped_column(Text)  # the registry-signed receipt, kept verbatim
    fetched_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class LiftNotice(Base):
    """A lift notice another operator signed during a registry outage, applied here: its
    record closed "lifted by notice, awaiting the registry" until the feed's remove comes."""

    __tablename__ = "lift_notices"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    notice_id: Mapped[str] = mapped_column(String(80), unique=True)  # a replay is refused
    issuer: Mapped[str] = mapped_column(String(64))
    order_id: Mapped[str] = mapped_column(String(128))
    imei_key: Mapped[str] = mapped_column(String(14))
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    applied_at: Mapped[datetime] = mapped_column(UTCDateTime)
    applied_by: Mapped[str] = mapped_column(String(128))
    record_id: Mapped[int] = mapped_column(ForeignKey("records.id"))
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # the feed's remove


class Tac(Base):
    """One TAC (type allocation code, the IMEI's first 8 digits) and the device it names.

    Replaced as a whole by ``imeisync tac import``; ``extra`` keeps the file's other columns
    (JSON), as GSMA's TAC export carries more than brand and model.
    """

    __tablename__ = "tacs"

    tac: Mapped[str] = mapped_column(String(8), primary_key=True)
    brand: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(Text)
    extra: Mapped[str | None] = mapped_column(Text)


class Sighting(Base):
    """A device under one of our open records (track, or block with ``[sightings]
    blocked_attempts``) seen by our attach check: personal data under a police case.

    The IMSI is kept only encrypted (``imsi_enc``, AES-GCM, context ``sighting:<sighting_id>``)
    and revealed only through a recorded disclosure; ``imsi_digest`` (a keyed hash) lets the
    writer deduplicate without decrypting. Rows are deleted after ``[sightings] retention_days``.
    """

    __tablename__ = "sightings"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sighting_id: Mapped[str] = mapped_column(String(40), unique=True)  # public, idempotency key
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    interface: Mapped[str] = mapped_column(String(8))  # n5g-eir | s13
    status: Mapped[str] = mapped_column(String(12))  # GREYLISTED | BLACKLISTED (the answer)
    imei_key: Mapped[str] = mapped_column(String(14))
    svn: Mapped[str | None] = mapped_column(String(2))  # IMEISV's software version, when sent
    node: Mapped[str | None] = mapped_column(String(255))  # AMF address or MME Origin-Host
    imsi_state: Mapped[str] = mapped_column(String(10))  # present | absent | malformed
    imsi_enc: Mapped[str | None] = mapped_column(Text)
    imsi_digest: Mapped[str | None] = mapped_column(String(64))
    record_id: Mapped[int] = mapped_column(ForeignKey("records.id"))
    case_ref: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        Index("ix_sightings_key_seen", "imei_key", "seen_at"),
        Index("ix_sightings_seen", "seen_at"),
    )


class SightingDisclosure(Base):
    """A sighting's IMSI revealed to one person on a court order: the evidence, kept after
    the sighting itself is purged (no IMSI here)."""

    __tablename__ = "sighting_disclosures"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sighting_id: Mapped[str] = mapped_column(String(40))
    imei_key: Mapped[str] = mapped_column(String(14))
    case_ref: Mapped[str | None] = mapped_column(String(64))
    court_order: Mapped[str] = mapped_column(String(128))
    court: Mapped[str] = mapped_column(String(128))
    disclosed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    disclosed_by: Mapped[str] = mapped_column(String(128))

    __table_args__ = (Index("ix_sighting_disclosures_sighting", "sighting_id"),)


class SightingAlert(Base):
    """A trace alert for the police unit's endpoint (``[sightings] webhook_url``), written with
    its sighting -- or with a received notice (our tracked device seen on another operator's
    network) -- and delivered at least once by the daemon (never from the attach check)."""

    __tablename__ = "sighting_alerts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # The idempotency key: a sighting's sighting_id, or a received notice's notice_id.
    sighting_id: Mapped[str] = mapped_column(String(80), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    state: Mapped[str] = mapped_column(String(12), default="pending")  # pending | delivered
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_sighting_alerts_due", "state", "next_attempt_at"),)


class SightingNotice(Base):
    """A minimal notice between operators through the registry (no subscriber, no node):
    ``sent`` -- another operator's tracked device seen on our network, to push to its owner;
    ``received`` -- one of our tracked devices seen on another operator's network."""

    __tablename__ = "sighting_notices"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    notice_id: Mapped[str] = mapped_column(String(80), unique=True)
    direction: Mapped[str] = mapped_column(String(8))  # sent | received
    imei_key: Mapped[str] = mapped_column(String(14))
    owner_id: Mapped[str] = mapped_column(String(64))  # the tracking record's owner
    reporter_id: Mapped[str] = mapped_column(String(64))  # whose network saw it
    reporter_country: Mapped[str] = mapped_column(String(2))
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # sent: pending → sent → accepted | rejected; received: received
    state: Mapped[str] = mapped_column(String(12))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    registry_seq: Mapped[int | None] = mapped_column(BigInteger)  # received: feed position
    record_id: Mapped[int | None] = mapped_column(ForeignKey("records.id"))  # received: ours

    __table_args__ = (Index("ix_sighting_notices_state", "direction", "state"),)
