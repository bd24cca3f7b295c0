"""The registry's own tables (its own metadata and database; nothing shared with the daemon).

- ``registry_feed`` — the history: one row per accepted change, dispute and dispute answer, in
  ``seq`` order. Never updated, never deleted. Operators follow it with ``GET /v1/changes``.
- ``registry_records`` — the current state derived from the feed: one row per record from its
  insert to its remove (closed, never deleted); at most one open record per (device, owner).
- ``registry_submissions`` — every change_id each member sent and what became of it, so that a
  resent change gets the same answer (idempotency) and never a second feed entry.
- ``registry_disputes`` — one operator asking the owner of a record to review it.
- ``registry_sightings`` — every sighting notice a member sent (one of another member's tracked
  devices seen on its network) and what became of it (idempotency by notice id, as for changes);
  an accepted one is a ``sighting`` feed entry for each owner of an open track record.
- ``registry_acks`` / ``registry_ack_steps`` — how far each member has applied the feed, and
  when each position was reached (apply receipts, ``registry.receipts``).
- ``registry_canaries`` — the synthetic records planted for one member each
  (``registry.canaries``); their feed entries carry that member as ``audience``.

Times of changes are stored as the RFC 3339 text (UTC, ``Z``) the feed and snapshot send, so
streaming them costs no conversion.
"""

from __future__ import annotations

from typing import ClassVar

from sqlalchemy import BigInteger, Index, Integer, String, Table, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

BigId = BigInteger().with_variant(Integer, "sqlite")


class RegistryBase(DeclarativeBase):
    # Every model here maps one Table; saying so lets the Core statements (insert, update,
    # delete on Model.__table__) type-check instead of seeing the base's FromClause.
    __table__: ClassVar[Table]


class FeedEntry(RegistryBase):
    __tablename__ = "registry_feed"

    seq: Mapped[int] = mapped_column(BigId, primary_key=True)
    type: Mapped[str] = mapped_column(String(16))  # change | dispute | dispute_answer | sighting
    imei_key: Mapped[str] = mapped_column(String(14))
    imei_key_last: Mapped[str | None] = mapped_column(String(14))  # a range change
    owner_id: Mapped[str] = mapped_column(String(64))  # the record's owner
    owner_country: Mapped[str] = mapped_column(String(2))
    # change: the owner's change; dispute / answer: None (delivered to ``audience`` only)
    change_id: Mapped[str | None] = mapped_column(String(80))
    action: Mapped[str | None] = mapped_column(String(8))  # insert | remove
    kind: Mapped[str | None] = mapped_column(String(8))  # block | track
    reason: Mapped[str | None] = mapped_column(String(32))
    at: Mapped[str] = mapped_column(String(32))  # RFC 3339, as the operator stated it
    received_at: Mapped[str] = mapped_column(String(32))
    audience: Mapped[str | None] = mapped_column(String(64))  # disputes: the one member told
    dispute_id: Mapped[str | None] = mapped_column(String(80))
    # sighting: whose network saw the owner's tracked device (``at`` is when), and its notice id
    reporter_id: Mapped[str | None] = mapped_column(String(64))
    reporter_country: Mapped[str | None] = mapped_column(String(2))
    notice_id: Mapped[str | None] = mapped_column(String(80))

    __table_args__ = ({"sqlite_autoincrement": True},)


class RegistryRecord(RegistryBase):
    __tablename__ = "registry_records"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    imei_key: Mapped[str] = mapped_column(String(14))
    imei_key_last: Mapped[str | None] = mapped_column(String(14))  # a range: keys up to this
    owner_id: Mapped[str] = mapped_column(String(64))
    owner_country: Mapped[str] = mapped_column(String(2))
    kind: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str] = mapped_column(String(32))
    opened_seq: Mapped[int] = mapped_column(BigInteger)
    opened_at: Mapped[str] = mapped_column(String(32))
    opened_change_id: Mapped[str] = mapped_column(String(80))
    closed_seq: Mapped[int | None] = mapped_column(BigInteger)
    closed_at: Mapped[str | None] = mapped_column(String(32))
    closed_change_id: Mapped[str | None] = mapped_column(String(80))
    close_reason: Mapped[str | None] = mapped_column(String(32))

    __table_args__ = (
        # One open record per device per owner; also the snapshot's order (imei_key, owner_id).
        Index("uq_registry_records_open", "imei_key", "owner_id", unique=True,
              sqlite_where=text("closed_seq IS NULL"),
              postgresql_where=text("closed_seq IS NULL")),
        Index("ix_registry_records_key", "imei_key"),
    )


class Submission(RegistryBase):
    __tablename__ = "registry_submissions"

    operator_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    change_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))  # of the change's content
    result: Mapped[str] = mapped_column(String(12))  # accepted | rejected
    code: Mapped[str | None] = mapped_column(String(8))
    message: Mapped[str | None] = mapped_column(Text)
    seq: Mapped[int | None] = mapped_column(BigInteger)
    received_at: Mapped[str] = mapped_column(String(32))

    __table_args__ = (Index("ix_registry_submissions_change", "change_id"),)


class RegistryDispute(RegistryBase):
    __tablename__ = "registry_disputes"

    dispute_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    imei_key: Mapped[str] = mapped_column(String(14))
    filer_id: Mapped[str] = mapped_column(String(64))
    filer_country: Mapped[str] = mapped_column(String(2))
    owner_id: Mapped[str] = mapped_column(String(64))
    owner_country: Mapped[str] = mapped_column(String(2))
    case_ref: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    filed_at: Mapped[str] = mapped_column(String(32))
    filed_seq: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(12))  # open | lifted | upheld
    answer_reason: Mapped[str | None] = mapped_column(Text)
    answered_at: Mapped[str | None] = mapped_column(String(32))
    answer_seq: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_registry_disputes_record", "imei_key", "owner_id", "state"),)


class MemberAck(RegistryBase):
    """Each member's applied feed position (``POST /v1/acks``): how far it has applied the feed
    in its own committed transactions, when it last said so and when the position last moved."""

    __tablename__ = "registry_acks"

    member_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    applied_through: Mapped[int] = mapped_column(BigInteger)
    acked_at: Mapped[str] = mapped_column(String(32))
    moved_at: Mapped[str] = mapped_column(String(32))


class AckStep(RegistryBase):
    """Every move of a member's applied position: when a change was applied by that member is
    the time of its first step at or beyond the change's seq (one index lookup per member)."""

    __tablename__ = "registry_ack_steps"

    member_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    applied_through: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    at: Mapped[str] = mapped_column(String(32))


class RegistryCanary(RegistryBase):
    """A synthetic blocking record planted in one member's feed and snapshot only
    (``registry.canaries``): if that member's copy leaks, any one of them names it.

    Kept out of ``registry_records``, so that no member's insert, remove or dispute ever meets
    it: the owner it claims cannot lift it, nor learn of it by a refusal."""

    __tablename__ = "registry_canaries"

    imei_key: Mapped[str] = mapped_column(String(14), primary_key=True)  # one recipient per key
    recipient_id: Mapped[str] = mapped_column(String(64))
    draw: Mapped[int] = mapped_column(Integer)  # n: drawn as HMAC(member key, n)
    owner_id: Mapped[str] = mapped_column(String(64))  # the owner it claims
    owner_country: Mapped[str] = mapped_column(String(2))
    kind: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str] = mapped_column(String(32))
    at: Mapped[str] = mapped_column(String(32))
    change_id: Mapped[str] = mapped_column(String(80), unique=True)
    seq: Mapped[int] = mapped_column(BigInteger)  # its insert's feed position
    planted_at: Mapped[str] = mapped_column(String(32))

    __table_args__ = (Index("ix_registry_canaries_recipient", "recipient_id", "draw"),)


class RegistrySighting(RegistryBase):
    """A sighting notice as its reporter sent it, and the registry's answer. No subscriber and
    no network node: the notice has neither (``POST /v1/sightings`` refuses other fields)."""

    __tablename__ = "registry_sightings"

    reporter_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    notice_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))  # of the notice's content
    imei_key: Mapped[str | None] = mapped_column(String(14))  # None when malformed
    seen_at: Mapped[str | None] = mapped_column(String(32))
    result: Mapped[str] = mapped_column(String(12))  # accepted | rejected
    code: Mapped[str | None] = mapped_column(String(8))
    message: Mapped[str | None] = mapped_column(Text)
    owners: Mapped[str | None] = mapped_column(Text)  # accepted: the owners told, comma-separated
    received_at: Mapped[str] = mapped_column(String(32))
